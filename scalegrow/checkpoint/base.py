"""What every checkpoint reader offers, whatever its format (legacy, torch_dist, DeepSpeed, meta)."""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from scalegrow import arch
from scalegrow.checkpoint.io import file_digest_line
from scalegrow.checkpoint.sharding import StageLayout
from scalegrow.config import ModelConfig


@dataclass
class Checkpoint:
    """A source: its config and layout, and full (unsharded) tensors per layer on demand.
    Subclasses implement `layer`, `embeddings`, `head` and `files`."""

    root: Path
    iteration: int | str
    args: argparse.Namespace
    config: ModelConfig
    tp: int
    layout: StageLayout
    dtype: torch.dtype

    format = ""

    @property
    def pp(self) -> int:
        return self.layout.pp

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def embeddings(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def head(self) -> dict[str, torch.Tensor]:
        """Final norm plus the output weight under `output_layer.weight` (word embeddings if tied)."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        raise NotImplementedError

    def release(self) -> None:
        """Drop whatever the reader keeps mapped or cached."""

    def state_dict(self, clone: bool = True) -> dict[str, torch.Tensor]:
        """The whole model under reference-model names (TP1/PP1), for verify/export. `clone=False`
        keeps mmap-backed views where the reader has them."""
        copy = (lambda t: t.clone()) if clone else (lambda t: t)
        sd = {k: copy(v) for k, v in self.embeddings().items()}
        for i in range(self.config.num_layers):
            sd.update({arch.layer_key(i, k): copy(v) for k, v in self.layer(i).items()})
        head = self.head()
        if self.config.tied:
            head.pop(arch.OUTPUT_LAYER)
        sd.update({k: copy(v) for k, v in head.items()})
        self.release()
        return sd

    def manifest_sha256(self) -> str:
        """sha256 over (path, size, sha256 of the first MiB) of every file under the checkpoint root."""
        lines = [file_digest_line(p, self.root) for p in sorted(self.root.rglob("*")) if p.is_file()]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
