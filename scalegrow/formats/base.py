"""What every checkpoint format offers: a `Reader` of full tensors, a `Writer` of full tensors, and
the `Format` record that the registry lists.

Readers and writers speak full (unsharded) tensors under megatron-core names; how those are sharded,
padded or renamed on disk is each format's own business. Also here: readers over memory and over
nothing (meta tensors, for plans), and a writer into memory.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from tqdm import tqdm

from scalegrow.core import arch
from scalegrow.core.arch import TensorSpec
from scalegrow.core.config import ModelConfig
from scalegrow.core.layout import Layout
from scalegrow.formats import optimizer
from scalegrow.formats.optimizer import AdamMoments
from scalegrow.formats.io import file_digest_line


@dataclass
class Reader:
    """A source: its config and layout, and full (unsharded) tensors on demand.
    Subclasses implement `tensor` (and `files`, `release` where they have files or caches)."""

    root: Path
    iteration: int | str
    args: argparse.Namespace | None  # Megatron-LM args carried over to Megatron outputs (None: defaults)
    config: ModelConfig
    layout: Layout
    dtype: torch.dtype

    format = ""
    on_disk = True  # False for readers over memory or over nothing
    quiet = False  # True: silence what a format's own library prints while reading

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    def tensor(self, key: str, spec: TensorSpec) -> torch.Tensor:
        """One full tensor by its global reference-model key."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        return []

    def release(self) -> None:
        """Drop whatever the reader keeps mapped or cached."""

    def embeddings(self) -> dict[str, torch.Tensor]:
        return {s.name: self.tensor(s.name, s) for s in arch.embedding_specs(self.config)}

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s tensors under their layer-relative names."""
        return {s.name: self.tensor(arch.layer_key(index, s.name), s) for s in arch.layer_specs(self.config, index)}

    def layers(self, progress: bool = False, desc: str = "layers") -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Every layer in order, one at a time (what a prepare step walks, e.g. calibration); the
        caches are released at the end."""
        try:
            for i in tqdm(range(self.config.num_layers), desc=desc, unit="layer", disable=not progress):
                yield i, self.layer(i)
        finally:
            self.release()

    def head(self) -> dict[str, torch.Tensor]:
        """Final norm plus the output weight under `output_layer.weight`: the word embeddings if tied."""
        out = {s.name: self.tensor(s.name, s) for s in arch.final_norm_specs(self.config)}
        out[arch.OUTPUT_LAYER] = self.tensor(arch.WORD_EMBEDDINGS if self.config.embedding.tied else arch.OUTPUT_LAYER,
                                             arch.OUTPUT_SPEC)
        return out

    @property
    def holds_optimizer_state(self) -> bool:
        return self.on_disk and (self.root / optimizer.FILE).is_file()

    def optimizer_state(self) -> AdamMoments | None:
        """Adam's state saved beside the weights (`optimizer_state.pt`, by `grow --optimizer-state`), or
        None; DeepSpeed checkpoints read theirs from their partitions."""
        path = self.root / optimizer.FILE
        return optimizer.load(path) if self.on_disk and path.is_file() else None

    def state_dict(self, clone: bool = True) -> dict[str, torch.Tensor]:
        """The whole model under reference-model names (TP1/PP1), for verify and training. `clone=False`
        keeps mmap-backed views where the reader has them."""
        copy = (lambda t: t.clone()) if clone else (lambda t: t)
        sd = {key: copy(self.tensor(key, spec)) for key, spec in arch.model_specs(self.config)}
        self.release()
        return sd

    def notes(self) -> dict:
        """What `inspect` should say about how this format stored the checkpoint (e.g. torch_dist's
        common state); nothing by default."""
        return {}

    def hf_origin(self) -> dict | None:
        """The Hugging Face family and config.json this checkpoint came from ({"model_type", "config"}),
        as the `details.hf` of its scalegrow.json records it; None when it never was HF."""
        meta = self.root / "scalegrow.json"
        if not self.on_disk or not meta.is_file():
            return None
        try:
            return json.loads(meta.read_text()).get("details", {}).get("hf")
        except (ValueError, AttributeError):
            return None

    def manifest_sha256(self) -> str:
        """sha256 over (path, size, sha256 of the first MiB) of every file under the checkpoint root."""
        lines = [file_digest_line(p, self.root) for p in sorted(self.root.rglob("*")) if p.is_file()]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class Writer(Protocol):
    """Takes full tensors under global keys, stage by stage in layer order. A writer meets its format's
    rules itself: sharding, vocabulary padding, whether a tied output layer is stored, file metadata."""

    layout: Layout

    def open_stage(self, stage: int) -> None: ...

    def write(self, key: str, tensor: torch.Tensor) -> None: ...

    def close_stage(self) -> None: ...

    def finish(self) -> None:
        """Everything written through this writer is in place; a writer not `restrict`ed to a share
        also completes the checkpoint."""

    def abort(self) -> None:
        """After a failure: release files and threads (what was written is discarded)."""


class SharedWriter(Writer, Protocol):
    """A writer that several workers and ranks can share a checkpoint with (`Format.work_units`)."""

    def restrict(self, units: frozenset, name: str) -> None:
        """Write only these work units (a worker's share); `name` ("{rank}_{worker}") tells this
        worker's files and records apart from the others'."""

    def complete(self) -> None:
        """Once every share is written: what the format writes once (tracker, index, metadata), from
        the records the shares left."""


@dataclass(frozen=True)
class Format:
    """A checkpoint format as the registry lists it. `open(path, validate)` may skip reading shards
    when `validate` is False (plans). Writable formats also have `writer(out_dir, cfg, layout, source,
    opts)`, `target_config(cfg, tp, vocab_size)` (their vocabulary rule) and `size(cfg, layout, dtype)`:
    the bytes of tensor data a checkpoint holds (replicated tensors counted once per copy stored).
    `parallel` is False for formats without TP/PP (one file set for the whole model); `planner` makes
    a writer that records the output files' tensors and writes nothing (None: Megatron's plan).
    `work_units` (formats with a `SharedWriter`) lets several worker processes and ranks write one
    checkpoint (`write/workers.py`): {unit: bytes}, a unit being a rank file (stage, EP rank, TP rank)
    where files are written in order, else a piece (stage, position) computed once (`piece_sizes`)."""

    name: str
    description: str
    detect: Callable[[Path], bool]
    open: Callable[[Path, bool], Reader]
    writer: Callable[..., Writer] | None = None
    target_config: Callable[[ModelConfig, int, int | None], ModelConfig] | None = None
    size: Callable[[ModelConfig, Layout, torch.dtype], int] | None = None
    parallel: bool = True
    planner: Callable[..., Writer] | None = None
    work_units: Callable[[ModelConfig, Layout, torch.dtype], dict] | None = None  # what workers divide


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def piece_sizes(cfg: ModelConfig, layout: Layout, dtype: torch.dtype) -> dict[tuple[int, int], int]:
    """(stage, position) -> tensor bytes, for formats that put each tensor in a planned place: the
    embeddings at -1, layer j at j, the final norm and output layer at num_layers."""
    def size(specs) -> int:
        return sum(nbytes(arch.full_shape(cfg, s), dtype) for s in specs)

    stages, last = layout.stages, cfg.num_layers
    out = {(0, -1): size(arch.embedding_specs(cfg))}
    out.update({(stages.locate(j)[0], j): size(arch.layer_specs(cfg, j)) for j in range(last)})
    out[(stages.pp - 1, last)] = size(arch.final_norm_specs(cfg) + ([] if cfg.embedding.tied else [arch.OUTPUT_SPEC]))
    return out


# ---- readers and writers without a format -----------------------------------------------------------
@dataclass
class MemoryReader(Reader):
    """A state dict in memory under reference-model names (TP1/PP1), e.g. a trained model to export."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    origin: dict | None = None  # what `hf_origin` answers (e.g. a training run's HF init)

    format = "memory"
    on_disk = False

    @classmethod
    def of(cls, state_dict: dict[str, torch.Tensor], config: ModelConfig, iteration: int | str = "release",
           args: argparse.Namespace | None = None, dtype: torch.dtype = torch.float32,
           origin: dict | None = None) -> "MemoryReader":
        return cls(Path("<memory>"), iteration, args, config, Layout.single(config.num_layers), dtype,
                   state_dict, origin)

    def hf_origin(self) -> dict | None:
        return self.origin

    def tensor(self, key: str, spec: TensorSpec) -> torch.Tensor:
        return self.tensors[key]


@dataclass
class MetaReader(Reader):
    """A source with a checkpoint's shapes and no data: tensors on the meta device (plans)."""

    origin: dict | None = None

    format = "meta"
    on_disk = False

    @classmethod
    def like(cls, source: Reader) -> "MetaReader":
        return cls(Path("<meta>"), source.iteration, source.args, source.config, source.layout, source.dtype,
                   source.hf_origin())

    def hf_origin(self) -> dict | None:
        return self.origin

    @classmethod
    def of(cls, config: ModelConfig, tp: int = 1, dtype: torch.dtype = torch.bfloat16) -> "MetaReader":
        """A `config`-shaped model stored at TP `tp` on one pipeline stage."""
        return cls(Path("<meta>"), "release", None, config, Layout(tp, Layout.single(config.num_layers).stages),
                   dtype)

    def tensor(self, key: str, spec: TensorSpec) -> torch.Tensor:
        return torch.empty(arch.full_shape(self.config, spec), dtype=self.dtype, device="meta")


class StateDictWriter:
    """Collects full tensors into a reference-model state dict (TP1/PP1); a tied model's output layer
    is its embedding, so it is not kept twice."""

    def __init__(self, cfg: ModelConfig):
        self.cfg, self.layout = cfg, Layout.single(cfg.num_layers)
        self.state: dict[str, torch.Tensor] = {}

    def open_stage(self, stage: int) -> None:
        pass

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if not (key == arch.OUTPUT_LAYER and self.cfg.embedding.tied):
            self.state[key] = tensor

    def close_stage(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass
