"""Turn the `data` section into ready token streams: tokenizer, indexed datasets, held-out split.

The main rank builds what is missing under `output.dir/data` (idempotent: a re-run or a resumed run
reuses it); the other ranks wait for it.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch.distributed as torch_dist

from scalegrow.errors import InputError
from scalegrow.train.config import RunConfig
from scalegrow.train.data import (EMBEDDED, TokenStream, build_indexed, load_documents, load_tokenizer,
                                  train_tokenizer)


@dataclass
class PreparedData:
    train: TokenStream
    valid: TokenStream
    tokenizer: Path
    vocab_size: int


def _barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def tokenizer_near(checkpoint: str | Path) -> Path | None:
    """The tokenizer.model shipped with a checkpoint (an export, or a run's checkpoints/data dir)."""
    root = Path(checkpoint)
    for candidate in (root / "tokenizer.model", root.parent / "export" / "tokenizer.model",
                      root.parent / "data" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def prepare_data(cfg: RunConfig, dist) -> PreparedData:
    d = cfg.data
    data_dir = Path(cfg.output.dir) / "data"
    preprocessed = d.corpus != EMBEDDED and Path(f"{d.corpus}_train.idx").is_file()
    tokenizer = Path(d.tokenizer) if d.tokenizer else (tokenizer_near(cfg.init.from_) if cfg.init.from_ else None)
    if preprocessed and tokenizer is None:
        raise InputError(f"data.tokenizer: needed for the preprocessed dataset {d.corpus}")
    tokenizer = tokenizer or data_dir / "tokenizer.model"
    prefix = Path(d.corpus) if preprocessed else data_dir / "corpus"
    if dist.is_main and not preprocessed:
        if not tokenizer.is_file():
            train_tokenizer(load_documents(d.corpus, d.max_corpus_bytes), data_dir / "tokenizer", d.vocab_size)
        done = data_dir / "corpus.done"
        if not done.is_file():
            counts = build_indexed(load_documents(d.corpus, d.max_corpus_bytes), load_tokenizer(tokenizer),
                                   prefix, d.valid_fraction)
            done.write_text(f"{counts}\n")
    _barrier()
    train, valid = (TokenStream(f"{prefix}_{s}", d.seq_length) for s in ("train", "valid"))
    need = cfg.train.micro_batch_size * dist.world_size
    for name, stream in (("train", train), ("valid", valid)):
        if stream.num_samples < need:
            raise InputError(f"data: the {name} split holds {stream.num_samples} windows of {d.seq_length} "
                             f"tokens, fewer than one batch ({need}); use more data or a larger valid_fraction")
    return PreparedData(train, valid, tokenizer, load_tokenizer(tokenizer).get_piece_size())


@contextlib.contextmanager
def corpus_streams(data: str, tokenizer: Path, seq_length: int, valid_fraction: float = 0.05,
                   max_bytes: int = 4_000_000) -> Iterator[tuple[TokenStream, TokenStream]]:
    """(train, valid) token streams of `data`: a preprocessed .bin/.idx prefix as it is, or any corpus
    (including 'embedded') tokenized into a temporary indexed dataset for the duration."""
    if data != EMBEDDED and Path(f"{data}_train.idx").is_file():
        yield TokenStream(f"{data}_train", seq_length), TokenStream(f"{data}_valid", seq_length)
        return
    with tempfile.TemporaryDirectory(prefix="scalegrow-data-") as tmp:
        prefix = Path(tmp) / "corpus"
        build_indexed(load_documents(data, max_bytes), load_tokenizer(tokenizer), prefix, valid_fraction)
        yield TokenStream(f"{prefix}_train", seq_length), TokenStream(f"{prefix}_valid", seq_length)


def source_tokenizer(src_path, tokenizer: str | None) -> Path:
    """--tokenizer, else the tokenizer.model that ships with the checkpoint."""
    found = Path(tokenizer) if tokenizer else tokenizer_near(src_path)
    if found is None or not found.is_file():
        raise InputError(f"--tokenizer: {src_path} ships no tokenizer.model; pass the source's tokenizer")
    return found
