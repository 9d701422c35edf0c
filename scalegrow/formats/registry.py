"""The checkpoint formats scalegrow reads and writes. Adding a format: one module that defines a
`Format` record, and one line below."""
from __future__ import annotations

from pathlib import Path

import torch

from scalegrow.core import arch
from scalegrow.core.model import GPT
from scalegrow.errors import InputError
from scalegrow.formats import deepspeed, megatron, torch_dist
from scalegrow.formats.base import Format, Reader
from scalegrow.formats.hf import format as hf

# In detection order: the first whose `detect` accepts a path reads it.
FORMATS: dict[str, Format] = {f.name: f for f in (
    deepspeed.FORMAT,
    torch_dist.FORMAT,
    hf.FORMAT,
    megatron.FORMAT,
)}
FALLBACK = megatron.FORMAT  # opens whatever nothing else recognised, to explain what is missing


def writable() -> tuple[str, ...]:
    """Names of the formats scalegrow can write (the choices of `--format` and `export.format`)."""
    return tuple(sorted(name for name, f in FORMATS.items() if f.writer is not None))


def default_output(src: str | Path) -> str:
    """The format an output takes when none is asked for: the source's, where scalegrow writes it
    (a DeepSpeed source gives Megatron legacy, `torch`)."""
    fmt = next((f for f in FORMATS.values() if f.detect(Path(src))), FALLBACK)
    return fmt.name if fmt.writer is not None else FALLBACK.name


def get(name: str, where: str = "--format") -> Format:
    """A writable format by name; an unknown one is bad input naming the valid ones."""
    fmt = FORMATS.get(name)
    if fmt is None or fmt.writer is None:
        raise InputError(f"{where}: unknown checkpoint format {name!r} (valid: {', '.join(writable())})")
    return fmt


def open_checkpoint(path: str | Path, validate: bool = True, quiet: bool = False) -> Reader:
    """A reader for whatever checkpoint is at `path`, its format detected from what is on disk.
    `validate=False` reads as little as the format allows (plans); `quiet` silences what the format's
    own library prints while reading."""
    path = Path(path)
    fmt = next((f for f in FORMATS.values() if f.detect(path)), FALLBACK)
    reader = fmt.open(path, validate)
    reader.quiet = quiet
    return reader


def load_model(path: str | Path) -> GPT:
    """The whole checkpoint as a reference GPT in fp32 (merges every TP/PP shard). The model is made
    without initialising it and filled one tensor at a time, so memory holds the fp32 model and one
    source tensor (a 3B model: 12.5 GB, not three copies of it)."""
    ckpt = open_checkpoint(path)
    with torch.device("meta"):
        model = GPT(ckpt.config)
    model = model.to_empty(device="cpu")
    state, specs = model.state_dict(), dict(arch.model_specs(ckpt.config))
    assert state.keys() == specs.keys(), sorted(state.keys() ^ specs.keys())
    with torch.no_grad():
        for key, spec in specs.items():
            state[key].copy_(ckpt.tensor(key, spec))
    ckpt.release()
    return model.eval()
