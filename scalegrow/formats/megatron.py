"""Megatron-LM legacy (`torch`) checkpoints at any TP/PP, read and written.

    DIR/latest_checkpointed_iteration.txt               "1000" or "release"
    DIR/iter_0001000/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt     (_EEE: the expert-parallel rank)

Each file holds `args` (Megatron-LM's argparse Namespace), `checkpoint_version`, `iteration` and the
stage's `model` state dict, whose layer keys are local to the stage. Stage 0 holds the embeddings, the
last stage the final norm and the output layer, which a tied model stores only at PP > 1 (a copy of
the word embeddings). `MegatronReader` opens one lazily (mmap) and serves full, TP-merged tensors;
`MegatronWriter` streams any model into that layout. The rules both follow (and torch_dist shares)
are in `megatron_rules.py`.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalegrow.core import arch, sharding
from scalegrow.core.arch import TensorSpec
from scalegrow.core.config import ModelConfig
from scalegrow.core.layout import Layout, Stages
from scalegrow.errors import InputError
from scalegrow.formats.base import Format, Reader
from scalegrow.formats.io import StreamingTorchFile, TensorSlot, WriteQueue, drop_mapped_pages, safe_load
from scalegrow.formats import hybrid
from scalegrow.formats.megatron_args import config_from_args
from scalegrow.formats.options import OutputOptions
from scalegrow.formats.megatron_rules import (
    CHECKPOINT_VERSION,
    FILE_NAME,
    TRACKER,
    canonical,
    checkpoint_bytes,
    expert_owner,
    experts_per_rank,
    file_bytes,
    file_specs,
    iteration_dir_name,
    local_key,
    megatron_args,
    rank_dir_name,
    resolve_iteration_dir,
    stage_specs,
    stages_from_args,
    stored_tensor,
    target_config,
)

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


# ---- reading --------------------------------------------------------------------------------------------
@dataclass
class MegatronReader(Reader):
    """A legacy Megatron checkpoint, validated on open and read lazily afterwards."""

    iter_dir: Path = None
    _cache: dict = field(default_factory=dict, repr=False)

    format = "torch"

    def file(self, tp_rank: int, stage: int, ep_rank: int = 0) -> Path:
        return self.iter_dir / rank_dir_name(tp_rank, stage, self.pp, ep_rank, self.layout.ep) / FILE_NAME

    def files(self) -> list[Path]:
        return [self.file(t, p, r) for p in range(self.pp) for r in range(self.layout.ep) for t in range(self.tp)]

    def _stage_models(self, stage: int, ep_rank: int) -> list[dict[str, torch.Tensor]]:
        """The TP shards' `model` dicts of one stage and EP rank (mmap); other stages leave the cache."""
        if stage not in self._cache:
            self._cache.clear()
            self._cache[stage] = {}
        if ep_rank not in self._cache[stage]:
            self._cache[stage][ep_rank] = [canonical(safe_load(self.file(t, stage, ep_rank))["model"])
                                           for t in range(self.tp)]
        return self._cache[stage][ep_rank]

    def tensor(self, key: str, spec: TensorSpec) -> torch.Tensor:
        """One full (TP-merged) tensor by its global key, as a private copy: the mmap'd pages it
        came from leave RSS at once, so memory never holds a whole source stage."""
        parsed = arch.split_layer_key(key)
        if parsed is not None:
            stage = self.layout.stages.locate(parsed[0])[0]
        else:
            stage = 0 if key.startswith("embedding.") else self.pp - 1
        owner = expert_owner(self.config, self.layout.ep, key)
        models = self._stage_models(stage, owner[0] if owner else 0)
        shards = [m[local_key(key, self.layout.stages, experts_per_rank(self.config, self.layout))] for m in models]
        if spec.tp_axis is None:
            shards = shards[:1]  # replicated: rank 0's copy
        full = sharding.merge(spec, shards)
        full = full.clone() if full.data_ptr() == shards[0].data_ptr() else full
        drop_mapped_pages(shards)
        return full

    def release(self) -> None:
        self._cache.clear()


def open_megatron(path: str | Path, validate: bool = True) -> MegatronReader:
    """Open and validate every rank: files present, args consistent, tensor names and shapes as
    the args say. Errors are one-line `InputError`s naming the file, the key and both shapes.
    Without `validate`, only rank 0's args are read (its pickle; no tensor data) and the stage split
    is taken from them."""
    root, iter_dir, iteration = resolve_iteration_dir(Path(path))
    candidates = [iter_dir / name / FILE_NAME for name in ("mp_rank_00", "mp_rank_00_000", "mp_rank_00_000_000")]
    first_file = next((f for f in candidates if f.is_file()), None)
    if first_file is None:
        raise InputError(f"{iter_dir}: no rank 0 file ({rank_dir_name(0, 0, 1)}/{FILE_NAME})")
    state0 = safe_load(first_file)
    args = require_args(state0, first_file)
    if hybrid.pattern_of(args):  # as Megatron-LM's own gpt_hybrid_conversion: torch_dist only
        raise InputError(f"{first_file}: args.hybrid_layer_pattern {hybrid.pattern_of(args)!r}: a legacy checkpoint "
                         f"of a HybridModel run is not supported (save it as torch_dist)")
    config = read_config(args, first_file)
    tp, pp, ep = (int(getattr(args, f"{k}_model_parallel_size", 1) or 1) for k in ("tensor", "pipeline", "expert"))
    _check_rank_dirs(iter_dir, tp, pp, ep)
    if not validate:
        dtype = next((v.dtype for k, v in state0["model"].items() if torch.is_tensor(v) and not arch.always_fp32(k)),
                     torch.float32)
        return MegatronReader(root, iteration, args, config, Layout(tp, stages_from_args(args, config), ep), dtype,
                              iter_dir)
    shapes: dict[tuple[int, int, int], dict[str, tuple[int, ...]]] = {}
    dtypes: set[torch.dtype] = set()
    for stage, r, t in itertools.product(range(pp), range(ep), range(tp)):
        file = iter_dir / rank_dir_name(t, stage, pp, r, ep) / FILE_NAME
        state = state0 if (t, stage, r) == (0, 0, 0) else safe_load(file)
        _check_same_args(file, require_args(state, file), first_file, args)
        model = canonical(state["model"])
        shapes[t, stage, r] = {k: tuple(v.shape) for k, v in model.items() if torch.is_tensor(v)}
        dtypes.update(v.dtype for k, v in model.items() if torch.is_tensor(v) and not arch.always_fp32(k))
        del state, model
    del state0
    counts = [_count_layers(shapes[0, stage, 0], iter_dir / rank_dir_name(0, stage, pp, 0, ep)) for stage in range(pp)]
    stages = Stages(tuple(counts))
    if stages.num_layers != config.num_layers:
        raise InputError(f"{iter_dir}: stages hold {stages.num_layers} layers {counts}, args.num_layers "
                         f"says {config.num_layers}")
    if len(dtypes) > 1:
        raise InputError(f"{iter_dir}: mixed tensor dtypes {sorted(map(str, dtypes))}")
    reader = MegatronReader(root, iteration, args, config, Layout(tp, stages, ep),
                            dtypes.pop() if dtypes else torch.float32, iter_dir)
    _check_shapes(reader, shapes)
    return reader


def require_args(state, file: Path) -> argparse.Namespace:
    if not isinstance(state, dict) or "model" not in state:
        raise InputError(f"{file}: not a Megatron model checkpoint (no 'model' entry)")
    args = state.get("args")
    if not isinstance(args, argparse.Namespace):
        raise InputError(f"{file}: args: missing Megatron argparse.Namespace")
    return args


def read_config(args: argparse.Namespace, file: Path) -> ModelConfig:
    try:
        return config_from_args(args)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{file}: args: {exc}") from exc


def _check_rank_dirs(iter_dir: Path, tp: int, pp: int, ep: int) -> None:
    expected = {rank_dir_name(t, p, pp, r, ep) for t in range(tp) for p in range(pp) for r in range(ep)}
    present = {d.name for d in iter_dir.iterdir() if d.is_dir() and _RANK_DIR.match(d.name)}
    says = f"args say TP={tp}, PP={pp}" + (f", EP={ep}" if ep > 1 else "")
    for name in sorted(expected - present):
        raise InputError(f"{iter_dir / name}: missing rank directory ({says})")
    for name in sorted(present - expected):
        raise InputError(f"{iter_dir / name}: unexpected rank directory ({says})")
    for name in sorted(expected):
        if not (iter_dir / name / FILE_NAME).is_file():
            raise InputError(f"{iter_dir / name / FILE_NAME}: missing checkpoint file")


_ARGS_THAT_MUST_AGREE = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")


def _check_same_args(file: Path, args: argparse.Namespace, ref_file: Path, ref: argparse.Namespace) -> None:
    mine = {**config_from_args(args).to_dict(),
            **{k: getattr(args, k, None) for k in _ARGS_THAT_MUST_AGREE}}
    theirs = {**config_from_args(ref).to_dict(),
              **{k: getattr(ref, k, None) for k in _ARGS_THAT_MUST_AGREE}}
    for key, value in mine.items():
        if value != theirs[key]:
            raise InputError(f"{file}: args.{key} = {value!r} but {ref_file} has {theirs[key]!r}")


def _count_layers(keys, where: Path) -> int:
    indices = {p[0] for p in map(arch.split_layer_key, keys) if p is not None}
    if indices != set(range(len(indices))):
        raise InputError(f"{where}: layer indices are not contiguous from 0: {sorted(indices)[:8]}")
    return len(indices)


def _check_shapes(reader: MegatronReader, shapes: dict[tuple[int, int, int], dict[str, tuple]]) -> None:
    """Every expected key present with its shard shape; nothing unexpected besides `_extra_state`."""
    layout, per = reader.layout, experts_per_rank(reader.config, reader.layout)
    for stage, r in itertools.product(range(reader.pp), range(layout.ep)):
        expected = {local_key(k, layout.stages, per): s for k, s in file_specs(reader.config, layout, stage, r)}
        for t in range(reader.tp):
            file, model = reader.file(t, stage, r), shapes[t, stage, r]
            for key, spec in expected.items():
                want = sharding.shard_shape(spec, arch.full_shape(reader.config, spec), reader.tp)
                if key not in model:
                    raise InputError(f"{file}: {key}: missing tensor (expected shape {want})")
                if model[key] != want:
                    raise InputError(f"{file}: {key}: shape {model[key]} does not match {want} expected from args")
            for key in model:
                if key not in expected:
                    raise InputError(f"{file}: {key}: unexpected tensor for this model config")


def is_megatron(path: Path) -> bool:
    """A checkpoint root with a tracker file, or an `iter_*`/`release` directory (validated on open)."""
    return path.is_dir() and ((path / TRACKER).is_file() or path.name == "release"
                              or re.fullmatch(r"iter_\d{7}", path.name) is not None)


# ---- writing --------------------------------------------------------------------------------------------
class MegatronWriter:
    """Writes a target model stage by stage; each TP shard goes straight to its preallocated file,
    streamed tensor by tensor on a writer thread. The format's rules live here: vocabulary rows padded
    to the target's size, a tied output layer stored only at PP > 1, Megatron args and the tracker."""

    def __init__(self, out_dir: Path, cfg: ModelConfig, layout: Layout, source: Reader, opts=None):
        cfg.check_tp(layout.tp)
        self.out_dir, self.cfg, self.layout = out_dir, cfg, layout
        self.iteration, self.dtype = source.iteration, (opts or OutputOptions()).weights_dtype(source.dtype)
        self.args = megatron_args(cfg, source.args, layout, source.iteration)
        self._files: dict[int, list] = {}  # EP rank -> the open stage's files, one per TP rank
        self._specs: dict[str, TensorSpec] = {}
        self._queue = WriteQueue()
        self._per_rank = experts_per_rank(cfg, layout)
        self.owned: set[tuple[int, int, int]] | None = None  # (stage, EP, TP) files to write; None: all

    def restrict(self, files: frozenset[tuple[int, int, int]], name: str = "") -> None:
        """Write only `files` (a worker's share, `write/workers.py`); the tracker is left to `complete`."""
        self.owned = set(files)

    def _owns(self, stage: int, ep_rank: int, tp_rank: int) -> bool:
        return self.owned is None or (stage, ep_rank, tp_rank) in self.owned

    def file_path(self, tp_rank: int, stage: int, ep_rank: int = 0) -> Path:
        name = rank_dir_name(tp_rank, stage, self.layout.pp, ep_rank, self.layout.ep)
        return self.out_dir / iteration_dir_name(self.iteration) / name / FILE_NAME

    def file_shapes(self, stage: int, ep_rank: int = 0) -> dict[str, tuple[int, ...]]:
        """Local key -> shard shape of every tensor each TP rank of `stage` (and EP rank) holds."""
        return {local_key(key, self.layout.stages, self._per_rank):
                sharding.shard_shape(spec, arch.full_shape(self.cfg, spec), self.layout.tp)
                for key, spec in file_specs(self.cfg, self.layout, stage, ep_rank)}

    def open_stage(self, stage: int) -> None:
        assert not self._files, "close the previous stage first"
        self._specs = dict(stage_specs(self.cfg, self.layout.stages, stage))
        for r in range(self.layout.ep):
            shapes = self.file_shapes(stage, r)
            self._files[r] = [self._open_file(stage, t, r, shapes) if self._owns(stage, r, t) else None
                              for t in range(self.layout.tp)]

    def _open_file(self, stage: int, tp_rank: int, ep_rank: int, shapes: dict[str, tuple[int, ...]]):
        slots = {key: TensorSlot(shape, arch.stored_dtype(key, self.dtype)) for key, shape in shapes.items()}
        path = self.file_path(tp_rank, stage, ep_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = _extra_state_keys(self.cfg, self.layout.stages, stage, self._per_rank)
        obj = {"args": self.args, "checkpoint_version": CHECKPOINT_VERSION,
               "iteration": 0 if self.iteration == "release" else int(self.iteration), "model": {**slots, **extra}}
        return _StageFile(StreamingTorchFile(path, obj), slots)

    def write(self, key: str, full: torch.Tensor) -> None:
        """One full tensor under its global key; it must belong to the open stage. An expert goes to
        the files of the EP rank that owns it, everything else to every EP rank's."""
        stored = stored_tensor(self.cfg, self._specs, key, full)
        if stored is None:
            return
        spec, full = stored
        lkey = local_key(key, self.layout.stages, self._per_rank)
        owner = expert_owner(self.cfg, self.layout.ep, key)
        shards = sharding.split(spec, full.to(arch.stored_dtype(key, self.dtype)), self.layout.tp)
        for r in [owner[0]] if owner else range(self.layout.ep):
            for f, shard in zip(self._files[r], shards):
                if f is not None:
                    self._queue.submit(functools.partial(f.write, lkey, shard), f.path)

    def close_stage(self) -> None:
        self._queue.drain()
        for f in self._open_files():
            f.close()
        self._files = {}

    def _open_files(self) -> list["_StageFile"]:
        return [f for f in itertools.chain(*self._files.values()) if f is not None]

    def finish(self) -> None:
        assert not self._files
        self._queue.close()
        if self.owned is None:
            self.complete()

    def complete(self) -> None:
        """Every rank file is there: the tracker names the iteration."""
        (self.out_dir / TRACKER).write_text(str(self.iteration))

    def abort(self) -> None:
        self._queue.abort()
        for f in self._open_files():
            f.abort()
        self._files = {}


class _StageFile:
    """One rank's file of the open stage: tensors by local key."""

    def __init__(self, file, slots: dict[str, TensorSlot]):
        self.file, self.slots = file, slots
        self.path = file.path

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.file.write(self.slots[key], tensor)

    def close(self) -> None:
        self.file.close()

    def abort(self) -> None:
        self.file.abort()


def _extra_state_keys(cfg: ModelConfig, stages: Stages, stage: int, experts: int | None) -> dict[str, None]:
    """megatron-core's local spec carries an `_extra_state` (None) for every linear module (an MoE
    layer's file: for each of its `experts` local experts)."""
    keys = {local_key(arch.layer_key(i, name), stages): None for i in stages.layers(stage)
            for name in arch.layer_extra_state(cfg, i, range(experts or 0))}
    if stage == stages.pp - 1:
        keys[arch.OUTPUT_EXTRA_STATE] = None
    return keys


FORMAT = Format("torch", "Megatron legacy", is_megatron, open_megatron, MegatronWriter, target_config,
                checkpoint_bytes, work_units=file_bytes)
