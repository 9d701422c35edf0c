"""Checkpoint formats. `open_checkpoint` picks the reader from what is on disk."""
from __future__ import annotations

from pathlib import Path

from scalegrow.checkpoint.megatron import MegatronCheckpoint, open_megatron


def open_checkpoint(path: str | Path) -> MegatronCheckpoint:
    return open_megatron(Path(path))
