"""Writers of Megatron legacy checkpoints at any TP/PP (DESIGN §4).

`MegatronWriter` takes full tensors in layer order, splits them for the target TP and streams each
shard into its rank's file on a background thread; `PlanWriter` records the same plan and writes
nothing (`--dry-run`, meta-device plans at real model sizes).
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from scalegrow import arch
from scalegrow.arch import TensorSpec
from scalegrow.checkpoint import sharding
from scalegrow.checkpoint.io import StreamingTorchFile, TensorSlot, WriteQueue
from scalegrow.checkpoint.megatron import (CHECKPOINT_VERSION, FILE_NAME, TRACKER, expected_specs, full_shape,
                                           iteration_dir_name, local_key, rank_dir_name)
from scalegrow.checkpoint.sharding import StageLayout
from scalegrow.config import ModelConfig


class MegatronWriter:
    """Writes a target model stage by stage; each TP shard goes straight to its preallocated file."""

    def __init__(self, out_dir: Path, cfg: ModelConfig, args: argparse.Namespace, tp: int,
                 layout: StageLayout, iteration: int | str, dtype: torch.dtype):
        cfg.check_tp(tp)
        self.out_dir, self.cfg, self.tp, self.layout, self.iteration = out_dir, cfg, tp, layout, iteration
        self.dtype = dtype
        self.args = cfg.to_megatron_args(args, tp=tp, pp=layout.pp)
        for key, value in layout.megatron_args().items():
            setattr(self.args, key, value)
        if iteration != "release":
            self.args.iteration = int(iteration)
        self._stage: int | None = None
        self._files: list = []
        self._specs: dict[str, TensorSpec] = {}
        self._queue = WriteQueue()

    def file_path(self, tp_rank: int, stage: int) -> Path:
        return (self.out_dir / iteration_dir_name(self.iteration) / rank_dir_name(tp_rank, stage, self.layout.pp)
                / FILE_NAME)

    def stage_plan(self, stage: int) -> dict[str, tuple[int, ...]]:
        """Local key -> shard shape of every tensor each TP rank of `stage` holds (the same on all)."""
        return {local_key(gkey, self.layout): sharding.shard_shape(spec, full_shape(self.cfg, spec), self.tp)
                for gkey, spec in expected_specs(self.cfg, self.layout, stage)}

    def open_stage(self, stage: int) -> None:
        assert self._stage is None, "close the previous stage first"
        self._stage = stage
        self._specs = dict(expected_specs(self.cfg, self.layout, stage))
        plan = self.stage_plan(stage)
        self._files = [self._open_file(stage, t, plan) for t in range(self.tp)]

    def _open_file(self, stage: int, tp_rank: int, plan: dict[str, tuple[int, ...]]):
        slots = {key: TensorSlot(shape, self.dtype) for key, shape in plan.items()}
        model = {**slots, **_extra_state_keys(self.cfg, self.layout, stage)}
        path = self.file_path(tp_rank, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = {"args": self.args, "checkpoint_version": CHECKPOINT_VERSION,
               "iteration": 0 if self.iteration == "release" else int(self.iteration), "model": model}
        return _StageFile(StreamingTorchFile(path, obj), slots)

    def write(self, key: str, full: torch.Tensor) -> None:
        """One full tensor under its global key; it must belong to the open stage."""
        spec = self._specs[key]
        want = full_shape(self.cfg, spec)
        assert tuple(full.shape) == want, f"{key}: operator produced {tuple(full.shape)}, expected {want}"
        lkey = local_key(key, self.layout)
        for f, shard in zip(self._files, sharding.split(spec, full.to(self.dtype), self.tp)):
            self._queue.submit(functools.partial(f.write, lkey, shard))

    def close_stage(self) -> None:
        self._queue.drain()
        for f in self._files:
            f.close()
        self._files, self._stage = [], None

    def finish(self) -> None:
        assert self._stage is None
        self._queue.close()
        (self.out_dir / TRACKER).write_text(str(self.iteration))

    def write_all(self, stage: int, tensors: dict[str, torch.Tensor]) -> None:
        """Convenience for small in-memory models: write one whole stage."""
        self.open_stage(stage)
        for key in self._specs:
            self.write(key, tensors[key])
        self.close_stage()


class _StageFile:
    """One rank's file of the open stage: tensors by local key."""

    def __init__(self, file: StreamingTorchFile, slots: dict[str, TensorSlot]):
        self.file, self.slots = file, slots

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.file.write(self.slots[key], tensor)

    def close(self) -> None:
        self.file.close()


class PlanWriter(MegatronWriter):
    """Writes nothing: records every output shard's keys, shapes and dtypes (`--dry-run`, and the
    meta-device plan tests at real model sizes), and checks what the operator hands over."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan: dict[str, dict[str, tuple[int, ...]]] = {}

    def _open_file(self, stage: int, tp_rank: int, plan: dict[str, tuple[int, ...]]):
        name = str(self.file_path(tp_rank, stage).relative_to(self.out_dir))
        self.plan[name] = dict(plan)
        return _PlanFile(name, plan, self.dtype)

    def finish(self) -> None:
        assert self._stage is None
        self._queue.close()


class _PlanFile:
    def __init__(self, name: str, plan: dict[str, tuple[int, ...]], dtype: torch.dtype):
        self.name, self._todo, self.dtype = name, dict(plan), dtype

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want = self._todo.pop(key)
        assert tuple(tensor.shape) == want and tensor.dtype == self.dtype, (self.name, key, tensor.shape, want)

    def close(self) -> None:
        assert not self._todo, f"{self.name}: tensors never written: {sorted(self._todo)[:3]}"


def _extra_state_keys(cfg: ModelConfig, layout: StageLayout, stage: int) -> dict[str, None]:
    """megatron-core's local spec carries an `_extra_state` (None) for every linear module."""
    keys = {arch.layer_key(i, name): None for i in range(layout.layers_per_stage[stage])
            for name in arch.LAYER_EXTRA_STATE}
    if stage == layout.pp - 1:
        keys[arch.OUTPUT_EXTRA_STATE] = None
    return keys
