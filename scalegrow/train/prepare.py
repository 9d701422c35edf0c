"""Turn the `data` section into ready token streams: tokenizer, indexed datasets, held-out split.

The main rank builds what is missing under `output.dir/data` (idempotent: a re-run or a resumed run
reuses it); the other ranks wait for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as torch_dist

from scalegrow.data import (
    EMBEDDED,
    TokenStream,
    build_indexed,
    load_documents,
    load_tokenizer,
    tokenizer_near,
    train_tokenizer,
)
from scalegrow.errors import InputError
from scalegrow.train.config import RunConfig


@dataclass
class PreparedData:
    train: TokenStream
    valid: TokenStream
    tokenizer: Path
    vocab_size: int


def _barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


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
