"""Checkpoint formats. `open_checkpoint` picks the reader from what is on disk."""
from __future__ import annotations

from pathlib import Path

from scalegrow.checkpoint.megatron import MegatronCheckpoint, open_megatron, resolve_iteration_dir


def open_checkpoint(path: str | Path):
    """A reader for a Megatron legacy (`torch`) or `torch_dist` checkpoint directory, or a DeepSpeed
    checkpoint directory written by scalegrow training."""
    from scalegrow.checkpoint.deepspeed import is_deepspeed, open_deepspeed
    from scalegrow.checkpoint.dist import is_torch_dist, open_dist

    path = Path(path)
    if path.is_dir() and is_deepspeed(path):
        return open_deepspeed(path)
    _, iter_dir, _ = resolve_iteration_dir(path)
    if is_torch_dist(iter_dir):
        return open_dist(path)
    return open_megatron(path)


__all__ = ["MegatronCheckpoint", "open_checkpoint"]
