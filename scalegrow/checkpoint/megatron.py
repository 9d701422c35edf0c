"""Megatron-LM legacy (`torch`) checkpoints at any TP/PP (DESIGN §4).

    DIR/latest_checkpointed_iteration.txt               "1000" or "release"
    DIR/iter_0001000/mp_rank_TT[_PPP]/model_optim_rng.pt

`MegatronCheckpoint` opens one lazily (mmap) and serves full, TP-merged tensors per layer;
`MetaCheckpoint` has the shapes and no data (plans). The writers are in `checkpoint/writer.py`.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalegrow import arch
from scalegrow.arch import TensorSpec
from scalegrow.checkpoint import sharding
from scalegrow.checkpoint.base import Checkpoint
from scalegrow.checkpoint.io import drop_mapped_pages, safe_load
from scalegrow.checkpoint.sharding import StageLayout
from scalegrow.config import ModelConfig
from scalegrow.errors import InputError

TRACKER = "latest_checkpointed_iteration.txt"
FILE_NAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def expected_specs(cfg: ModelConfig, layout: StageLayout, stage: int) -> list[tuple[str, TensorSpec]]:
    """(global key, spec) of every tensor a stage holds, in megatron-core's state-dict order."""
    out = []
    if stage == 0:
        out += [(s.name, s) for s in arch.embedding_specs(cfg)]
    first = layout.first_layer(stage)
    for i in range(first, first + layout.layers_per_stage[stage]):
        out += [(arch.layer_key(i, s.name), s) for s in arch.layer_specs(cfg)]
    if stage == layout.pp - 1:
        out += [(s.name, s) for s in arch.head_specs(cfg, layout.pp)]
    return out


def full_shape(cfg: ModelConfig, spec: TensorSpec) -> tuple[int, ...]:
    """The unsharded shape of a tensor under `cfg` (from the reference model's parameter shapes)."""
    h = cfg.hidden_size
    shapes = {
        "norm_weight": (h,), "norm_bias": (h,), "final_norm_weight": (h,), "final_norm_bias": (h,),
        "out_bias": (h,), "qkv_weight": (cfg.qkv_rows, h), "qkv_bias": (cfg.qkv_rows,),
        "proj_weight": (h, cfg.num_attention_heads * cfg.kv_channels),
        "fc1_weight": (cfg.fc1_rows, h), "fc1_bias": (cfg.fc1_rows,),
        "fc2_weight": (h, cfg.ffn_hidden_size),
        "word_embeddings": (cfg.padded_vocab_size, h), "output_layer": (cfg.padded_vocab_size, h),
        "position_embeddings": (cfg.max_position_embeddings, h),
    }
    return shapes[spec.role]


def local_key(key: str, layout: StageLayout) -> str:
    """Global layer index -> the stage-local index Megatron stores."""
    parsed = arch.split_layer_key(key)
    if parsed is None:
        return key
    stage, local = layout.locate(parsed[0])
    return arch.layer_key(local, parsed[1])


@dataclass
class MegatronCheckpoint(Checkpoint):
    """A legacy Megatron checkpoint, validated on open and read lazily afterwards."""

    iter_dir: Path = None
    _cache: dict = field(default_factory=dict, repr=False)

    format = "torch"

    def file(self, tp_rank: int, stage: int) -> Path:
        return self.iter_dir / rank_dir_name(tp_rank, stage, self.pp) / FILE_NAME

    def files(self) -> list[Path]:
        return [self.file(t, p) for p in range(self.pp) for t in range(self.tp)]

    # ---- lazy tensor access ------------------------------------------------------------------
    def _stage_models(self, stage: int) -> list[dict[str, torch.Tensor]]:
        """The TP shards' `model` dicts of one stage (mmap); other stages are dropped from the cache."""
        if stage not in self._cache:
            self._cache.clear()
            self._cache[stage] = [_canonical(safe_load(self.file(t, stage))["model"]) for t in range(self.tp)]
        return self._cache[stage]

    def tensor(self, key: str, spec: TensorSpec) -> torch.Tensor:
        """One full (TP-merged) tensor by its global key, as a private copy: the mmap'd pages it
        came from leave RSS at once, so memory never holds a whole source stage."""
        parsed = arch.split_layer_key(key)
        if parsed is not None:
            stage, _ = self.layout.locate(parsed[0])
        else:
            stage = 0 if key.startswith("embedding.") else self.pp - 1
        lkey = local_key(key, self.layout)
        shards = [m[lkey] for m in self._stage_models(stage)]
        if spec.tp_axis is None:
            shards = shards[:1]  # replicated: rank 0's copy
        full = sharding.merge(spec, shards)
        full = full.clone() if full.data_ptr() == shards[0].data_ptr() else full
        drop_mapped_pages(shards)
        return full

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return {s.name: self.tensor(arch.layer_key(index, s.name), s) for s in arch.layer_specs(self.config)}

    def embeddings(self) -> dict[str, torch.Tensor]:
        return {s.name: self.tensor(s.name, s) for s in arch.embedding_specs(self.config)}

    def head(self) -> dict[str, torch.Tensor]:
        """Final norm plus the output weight under `output_layer.weight` (word embeddings if tied)."""
        out = {s.name: self.tensor(s.name, s) for s in arch.head_specs(self.config) if s.role != "output_layer"}
        out_spec = TensorSpec(arch.OUTPUT_LAYER, "output_layer", 0, arch.VOCAB)
        if self.config.tied:
            out[arch.OUTPUT_LAYER] = self.tensor(arch.WORD_EMBEDDINGS, out_spec)
        else:
            out[arch.OUTPUT_LAYER] = self.tensor(arch.OUTPUT_LAYER, out_spec)
        return out

    def release(self) -> None:
        self._cache.clear()


def _canonical(model: dict) -> dict:
    """Read Transformer-Engine spellings as the local spec's names; drop `_extra_state`."""
    out = {}
    for key, value in model.items():
        if key.endswith("_extra_state"):
            continue
        parsed = arch.split_layer_key(key)
        if parsed is not None:
            key = arch.layer_key(parsed[0], arch.canonical_layer_name(parsed[1]))
        out[key] = value
    return out


def resolve_iteration_dir(path: Path) -> tuple[Path, Path, int | str]:
    """(root, iteration dir, iteration) for a checkpoint root or an `iter_*`/`release` directory."""
    if not path.is_dir():
        raise InputError(f"{path}: no such checkpoint directory")
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise InputError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
        iteration: int | str = text if text == "release" else int(text)
        iter_dir = path / iteration_dir_name(iteration)
        if not iter_dir.is_dir():
            raise InputError(f"{iter_dir}: iteration directory named by {TRACKER} is missing")
        return path, iter_dir, iteration
    match = re.fullmatch(r"iter_(\d{7})", path.name)
    if match or path.name == "release":
        return path.parent, path, "release" if path.name == "release" else int(match.group(1))
    raise InputError(f"{path}: not a Megatron checkpoint (no {TRACKER} and not an iter_*/release directory)")


def open_megatron(path: str | Path) -> MegatronCheckpoint:
    """Open and validate every rank: files present, args consistent, tensor names and shapes as
    the args say. Errors are one-line `InputError`s naming the file, the key and both shapes."""
    root, iter_dir, iteration = resolve_iteration_dir(Path(path))
    first_file = iter_dir / rank_dir_name(0, 0, 1) / FILE_NAME
    if not first_file.is_file():
        first_file = iter_dir / rank_dir_name(0, 0, 2) / FILE_NAME
    if not first_file.is_file():
        raise InputError(f"{iter_dir}: no rank 0 file ({rank_dir_name(0, 0, 1)}/{FILE_NAME})")
    state0 = safe_load(first_file)
    args = _require_args(state0, first_file)
    config = _config_from_args(args, first_file)
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    _check_rank_dirs(iter_dir, tp, pp)
    shapes: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
    dtypes: set[torch.dtype] = set()
    for stage in range(pp):
        for t in range(tp):
            file = iter_dir / rank_dir_name(t, stage, pp) / FILE_NAME
            state = state0 if (t, stage) == (0, 0) else safe_load(file)
            _check_same_args(file, _require_args(state, file), first_file, args)
            model = _canonical(state["model"])
            shapes[t, stage] = {k: tuple(v.shape) for k, v in model.items() if torch.is_tensor(v)}
            dtypes.update(v.dtype for v in model.values() if torch.is_tensor(v))
            del state, model
    del state0
    counts = [_count_layers(shapes[0, stage], iter_dir / rank_dir_name(0, stage, pp)) for stage in range(pp)]
    layout = StageLayout(tuple(counts))
    if layout.num_layers != config.num_layers:
        raise InputError(f"{iter_dir}: stages hold {layout.num_layers} layers {counts}, args.num_layers "
                         f"says {config.num_layers}")
    if len(dtypes) > 1:
        raise InputError(f"{iter_dir}: mixed tensor dtypes {sorted(map(str, dtypes))}")
    ckpt = MegatronCheckpoint(root, iteration, args, config, tp, layout, dtypes.pop() if dtypes else torch.float32,
                              iter_dir)
    _check_shapes(ckpt, shapes)
    return ckpt


def _require_args(state, file: Path) -> argparse.Namespace:
    if not isinstance(state, dict) or "model" not in state:
        raise InputError(f"{file}: not a Megatron model checkpoint (no 'model' entry)")
    args = state.get("args")
    if not isinstance(args, argparse.Namespace):
        raise InputError(f"{file}: args: missing Megatron argparse.Namespace")
    return args


def _config_from_args(args: argparse.Namespace, file: Path) -> ModelConfig:
    try:
        return ModelConfig.from_megatron_args(args)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{file}: args: {exc}") from exc


def _check_rank_dirs(iter_dir: Path, tp: int, pp: int) -> None:
    expected = {rank_dir_name(t, p, pp) for t in range(tp) for p in range(pp)}
    present = {d.name for d in iter_dir.iterdir() if d.is_dir() and _RANK_DIR.match(d.name)}
    for name in sorted(expected - present):
        raise InputError(f"{iter_dir / name}: missing rank directory (args say TP={tp}, PP={pp})")
    for name in sorted(present - expected):
        raise InputError(f"{iter_dir / name}: unexpected rank directory (args say TP={tp}, PP={pp})")
    for name in sorted(expected):
        if not (iter_dir / name / FILE_NAME).is_file():
            raise InputError(f"{iter_dir / name / FILE_NAME}: missing checkpoint file")


_ARGS_THAT_MUST_AGREE = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


def _check_same_args(file: Path, args: argparse.Namespace, ref_file: Path, ref: argparse.Namespace) -> None:
    mine = {**ModelConfig.from_megatron_args(args).to_dict(),
            **{k: getattr(args, k, None) for k in _ARGS_THAT_MUST_AGREE}}
    theirs = {**ModelConfig.from_megatron_args(ref).to_dict(),
              **{k: getattr(ref, k, None) for k in _ARGS_THAT_MUST_AGREE}}
    for key, value in mine.items():
        if value != theirs[key]:
            raise InputError(f"{file}: args.{key} = {value!r} but {ref_file} has {theirs[key]!r}")


def _count_layers(keys, where: Path) -> int:
    indices = {p[0] for p in map(arch.split_layer_key, keys) if p is not None}
    if indices != set(range(len(indices))):
        raise InputError(f"{where}: layer indices are not contiguous from 0: {sorted(indices)[:8]}")
    return len(indices)


def _check_shapes(ckpt: MegatronCheckpoint, shapes: dict[tuple[int, int], dict[str, tuple]]) -> None:
    """Every expected key present with its shard shape; nothing unexpected besides `_extra_state`."""
    for stage in range(ckpt.pp):
        expected = {local_key(k, ckpt.layout): s for k, s in expected_specs(ckpt.config, ckpt.layout, stage)}
        for t in range(ckpt.tp):
            file, model = ckpt.file(t, stage), shapes[t, stage]
            for key, spec in expected.items():
                want = sharding.shard_shape(spec, full_shape(ckpt.config, spec), ckpt.tp)
                if key not in model:
                    raise InputError(f"{file}: {key}: missing tensor (expected shape {want})")
                if model[key] != want:
                    raise InputError(f"{file}: {key}: shape {model[key]} does not match {want} expected from args")
            for key in model:
                if key not in expected:
                    raise InputError(f"{file}: {key}: unexpected tensor for this model config")


class MetaCheckpoint(Checkpoint):
    """A source with a checkpoint's shapes and no data: tensors on the meta device."""

    format = "meta"

    def __init__(self, config: ModelConfig, tp: int = 1, layout: StageLayout | None = None,
                 dtype: torch.dtype = torch.float32, args: argparse.Namespace | None = None,
                 iteration: int | str = "release"):
        layout = layout or StageLayout((config.num_layers,))
        args = args if args is not None else config.to_megatron_args(tp=tp, pp=layout.pp)
        super().__init__(Path("<meta>"), iteration, args, config, tp, layout, dtype)

    def _meta(self, specs) -> dict[str, torch.Tensor]:
        return {s.name: torch.empty(full_shape(self.config, s), dtype=self.dtype, device="meta") for s in specs}

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return self._meta(arch.layer_specs(self.config))

    def embeddings(self) -> dict[str, torch.Tensor]:
        return self._meta(arch.embedding_specs(self.config))

    def head(self) -> dict[str, torch.Tensor]:
        out = self._meta([s for s in arch.head_specs(self.config) if s.role != "output_layer"])
        out[arch.OUTPUT_LAYER] = self._meta([TensorSpec(arch.OUTPUT_LAYER, "output_layer", 0, arch.VOCAB)])[arch.OUTPUT_LAYER]
        return out

