"""Build scalegrow's embedded corpus (`scalegrow/corpus/`): the Python standard library's own source
files, as CPython 3.11.7 ships them, so the default corpus (and with it the quickstart, the tests and
the figures in docs/RESULTS.md) is the same text on every Python.

    python3.11 tools/embedded_corpus.py    # writes scalegrow/corpus/stdlib.jsonl.xz, prints its sha256

Modules are taken in path order, tests, idlelib, lib2to3 and site-packages left out, until
`LIMIT` characters (what the run configs read at most, `data.max_corpus_bytes`). One JSON line a
module: {"path": ..., "text": ...}. The sha256 it prints goes into `scalegrow/corpus/__init__.py`.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import sys
import sysconfig
from pathlib import Path

LIMIT = 4_000_000
SKIP = {"test", "tests", "idlelib", "site-packages", "lib2to3"}
OUT = Path(__file__).resolve().parents[1] / "scalegrow" / "corpus" / "stdlib.jsonl.xz"


def modules():
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & SKIP:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        total += len(text)
        yield {"path": path.relative_to(root).as_posix(), "text": text}
        if total >= LIMIT:
            return


def main() -> None:
    if sys.version_info[:3] != (3, 11, 7):
        sys.exit(f"run me with CPython 3.11.7 (this is {sys.version.split()[0]}): the corpus is its standard library")
    lines = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in modules()).encode()
    OUT.write_bytes(lzma.compress(lines, preset=9 | lzma.PRESET_EXTREME))
    print(f"{OUT}: {len(lines)} bytes of JSON lines, {OUT.stat().st_size} compressed; sha256 "
          f"{hashlib.sha256(OUT.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
