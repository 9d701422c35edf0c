"""The embedded corpus is the same text on every Python: it ships inside the package (CPython 3.11.7's
standard library) and is checked by its sha256, so tokenizers, splits and losses reproduce across
stacks (it used to be read from the running interpreter's own library)."""
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from scalegrow import corpus
from scalegrow.data import embedded_documents
from scalegrow.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PYENV = Path.home() / ".pyenv" / "versions"
DIGEST = "import hashlib, scalegrow.corpus as c; print(hashlib.sha256(''.join(c.documents({n})).encode()).hexdigest())"


def interpreters() -> list[Path]:
    """Other Pythons on this machine (pyenv's 3.10, 3.12, 3.13), to read the corpus with."""
    found = [p for v in ("3.10", "3.12", "3.13") for p in sorted(PYENV.glob(f"{v}.*/bin/python{v}"))]
    return found or pytest.skip(f"no other Python under {PYENV} (pyenv's 3.10, 3.12 or 3.13) to compare with")


def test_every_python_reads_the_same_documents():
    here = hashlib.sha256("".join(corpus.documents(corpus.CHARS)).encode()).hexdigest()
    for python in interpreters():
        out = subprocess.run([str(python), "-c", DIGEST.format(n=corpus.CHARS)], env={"PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == here, python


def test_it_is_cpython_3_11_7s_standard_library_in_path_order():
    docs = list(embedded_documents(corpus.CHARS))
    assert len(docs) == 233 and sum(map(len, docs)) >= corpus.CHARS
    assert docs[0].startswith('"""Record of phased-in incompatible language changes.')  # __future__.py
    assert len(list(embedded_documents(300_000))) == 13  # a smaller cap: a prefix of the same list
    assert list(embedded_documents(300_000)) == docs[:13]


def test_a_damaged_corpus_is_refused_by_name(tmp_path, monkeypatch):
    damaged = tmp_path / "stdlib.jsonl.xz"
    shutil.copyfile(corpus.FILE, damaged)
    data = bytearray(damaged.read_bytes())
    data[1000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(corpus, "FILE", damaged)
    with pytest.raises(InputError, match=f"^{damaged}: sha256 [0-9a-f]{{64}} is not the embedded corpus's .*reinstall"):
        next(embedded_documents(1000))
