"""The embedded corpus: CPython 3.11.7's standard library modules (`stdlib.jsonl.xz`, built by
tools/embedded_corpus.py; the PSF license beside it), the default `data.corpus` of every command and
run. It ships inside the package and is checked by its sha256, so every Python reads the same text:
the tokenizer, the split and the losses it gives are the same on 3.10 to 3.13. Standard library only
(no torch), so any interpreter can read it."""
from __future__ import annotations

import hashlib
import io
import json
import lzma
from pathlib import Path
from typing import Iterator

FILE = Path(__file__).with_name("stdlib.jsonl.xz")
SHA256 = "5cc72278235817b658ace03a6e87e28708cf61fe25b421c4baad2234b608ccc6"
CHARS = 4_000_000  # about what it holds: a larger cap reads all of it


class CorpusError(RuntimeError):
    """The shipped corpus is not the one scalegrow was built with (a damaged install)."""


def documents(max_chars: int) -> Iterator[str]:
    """Its modules in path order, until `max_chars` characters have been read (the module that
    crosses the cap included)."""
    data = FILE.read_bytes()
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise CorpusError(f"{FILE}: sha256 {hashlib.sha256(data).hexdigest()} is not the embedded corpus's "
                          f"{SHA256}; reinstall scalegrow")
    total = 0
    with lzma.open(io.BytesIO(data), "rt", encoding="utf-8") as lines:
        for line in lines:
            text = json.loads(line)["text"]
            total += len(text)
            yield text
            if total >= max_chars:
                return
