"""megatron-core `torch_dist` checkpoints (DESIGN §4), through `megatron.core.dist_checkpointing`.

    DIR/latest_checkpointed_iteration.txt
    DIR/iter_0001000/{metadata.json, common.pt, .metadata, __R_W.distcp}

The format is layout-free: Megatron-LM re-shards it on load for any TP/PP. Names and shardings come
from megatron-core's own `GPTModel.sharded_state_dict()`, built on the meta device as a template, so
the keys, the SwiGLU factory and the `_extra_state` sharded objects are exactly what Megatron expects.
Reading goes one layer at a time; every pickle is checked against an allow-list before any loader
sees it.
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalegrow import arch
from scalegrow.checkpoint import mcore
from scalegrow.checkpoint.io import safe_load
from scalegrow.checkpoint.base import Checkpoint
from scalegrow.checkpoint.megatron import CHECKPOINT_VERSION, MegatronCheckpoint, resolve_iteration_dir
from scalegrow.checkpoint.sharding import StageLayout
from scalegrow.config import ModelConfig
from scalegrow.errors import InputError

METADATA_JSON = "metadata.json"
TE_NAMES = {local: te for te, local in arch.TE_ALIASES.items()}  # local-spec name -> torch_dist name
COMMON = "common.pt"


def is_torch_dist(iter_dir: Path) -> bool:
    return (iter_dir / METADATA_JSON).is_file()


# ---- the allow-list for torch.distributed.checkpoint's `.metadata` pickle -------------------------
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only DCP's metadata dataclasses/enums, torch.Size, dtypes and layouts."""

    def find_class(self, module: str, name: str):
        import importlib

        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING":
                return obj
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_dcp_metadata(path: Path):
    """torch.distributed.checkpoint's `.metadata`, unpickled through the allow-list above."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise InputError(f"{path}: missing torch_dist metadata file") from None
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: refused to unpickle {exc}: not in the allow-list of checkpoint types") from exc
    except Exception as exc:  # truncated or garbage
        raise InputError(f"{path}: unreadable torch_dist metadata ({type(exc).__name__}: {exc})") from exc


class ChunkReader:
    """Reads any box of a stored tensor from the DCP chunks that overlap it (torch.load per chunk,
    weights_only), so a layer of a [num_layers, ...] stacked tensor costs one layer of memory."""

    def __init__(self, iter_dir: Path):
        self.iter_dir = iter_dir
        self.meta = read_dcp_metadata(iter_dir / ".metadata")
        stored = {(i.fqn, tuple(i.offset)): info for i, info in self.meta.storage_data.items()
                  if i.offset is not None}  # byte items (`_extra_state`) have no offset
        self._chunks: dict[str, list] = {}  # key -> [(offsets, sizes, storage info)]
        for key, md in self.meta.state_dict_metadata.items():
            for chunk in getattr(md, "chunks", ()):
                at = tuple(chunk.offsets)
                self._chunks.setdefault(key, []).append((at, tuple(chunk.sizes), stored.get((key, at))))

    def has(self, key: str) -> bool:
        return key in self.meta.state_dict_metadata

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.meta.state_dict_metadata[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.meta.state_dict_metadata[key].properties.dtype

    def read(self, key: str, offsets: tuple[int, ...] | None = None,
             sizes: tuple[int, ...] | None = None) -> torch.Tensor:
        """The box [offsets, offsets + sizes) of tensor `key` (default: all of it)."""
        shape = self.shape(key)
        offsets = offsets or (0,) * len(shape)
        sizes = sizes or shape
        out = torch.empty(sizes, dtype=self.dtype(key))
        covered = 0
        for chunk_offsets, chunk_sizes, info in self._chunks.get(key, []):
            lo = [max(a, c) for a, c in zip(offsets, chunk_offsets)]
            hi = [min(a + n, c + m) for a, n, c, m in zip(offsets, sizes, chunk_offsets, chunk_sizes)]
            if any(h <= l for l, h in zip(lo, hi)) or info is None:
                continue
            data = self._load_chunk(key, info)
            src = data[tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, chunk_offsets))]
            out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))] = src
            covered += src.numel()
        if covered != out.numel():
            raise InputError(f"{self.iter_dir}: {key}: stored chunks cover {covered} of {out.numel()} "
                             f"elements of the requested slice")
        return out

    def _load_chunk(self, key: str, info) -> torch.Tensor:
        if getattr(info, "transform_descriptors", None):
            raise InputError(f"{self.iter_dir / info.relative_path}: {key}: stored with transforms "
                             f"{info.transform_descriptors}, which scalegrow cannot read")
        with open(self.iter_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{self.iter_dir / info.relative_path}: {key}: unreadable chunk ({exc})") from exc


# ---- the megatron-core template ---------------------------------------------------------------------
def template(cfg: ModelConfig) -> dict:
    """megatron-core's sharded state dict for `cfg` at TP1/PP1, on the meta device (no memory)."""
    with torch.device("meta"):
        model = mcore.build_gpt(cfg)
    return model.sharded_state_dict()


def _is_tensor_item(item) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return isinstance(item, (ShardedTensor, ShardedTensorFactory))


@dataclass
class DistCheckpoint(Checkpoint):
    """A torch_dist checkpoint, read one layer at a time."""

    iter_dir: Path = None
    _reader: ChunkReader = field(repr=False, default=None)

    format = "torch_dist"

    def files(self) -> list[Path]:
        return sorted(p for p in self.iter_dir.iterdir() if p.is_file())

    def _key(self, name: str) -> str:
        """torch_dist spells norms the Transformer-Engine way in both specs."""
        return TE_NAMES.get(name, name)

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        out = {}
        for spec in arch.layer_specs(self.config):
            key = "decoder.layers." + self._key(spec.name)
            shape = self._reader.shape(key)  # [num_layers, ...]
            out[spec.name] = self._reader.read(key, (index,) + (0,) * (len(shape) - 1), (1,) + shape[1:])[0]
        return out

    def embeddings(self) -> dict[str, torch.Tensor]:
        return {s.name: self._reader.read(s.name) for s in arch.embedding_specs(self.config)}

    def head(self) -> dict[str, torch.Tensor]:
        specs = [s for s in arch.head_specs(self.config) if s.role != "output_layer"]
        out_key = arch.WORD_EMBEDDINGS if self.config.tied else arch.OUTPUT_LAYER
        return {**{s.name: self._reader.read(s.name) for s in specs}, arch.OUTPUT_LAYER: self._reader.read(out_key)}


def open_dist(path: Path) -> DistCheckpoint:
    root, iter_dir, iteration = resolve_iteration_dir(path)
    try:
        meta = json.loads((iter_dir / METADATA_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{iter_dir / METADATA_JSON}: unreadable ({exc})") from exc
    if meta.get("sharded_backend") != "torch_dist":
        raise InputError(f"{iter_dir / METADATA_JSON}: sharded_backend {meta.get('sharded_backend')!r} "
                         f"is not supported (only torch_dist)")
    reader = ChunkReader(iter_dir)
    common = safe_load(iter_dir / COMMON, mmap=False)
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise InputError(f"{iter_dir / COMMON}: args: missing Megatron argparse.Namespace")
    try:
        config = ModelConfig.from_megatron_args(args)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{iter_dir / COMMON}: args: {exc}") from exc
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    layout = StageLayout.build(config.num_layers, pp, getattr(args, "decoder_first_pipeline_num_layers", None),
                               getattr(args, "decoder_last_pipeline_num_layers", None))
    _check_keys(reader, config, iter_dir)
    return DistCheckpoint(root, iteration, args, config, tp, layout, reader.dtype(arch.WORD_EMBEDDINGS),
                          iter_dir, reader)


def _check_keys(reader: ChunkReader, cfg: ModelConfig, iter_dir: Path) -> None:
    """Every tensor the args imply is stored, with the global shape they imply."""
    from scalegrow.checkpoint.megatron import full_shape

    expected = [(s.name, full_shape(cfg, s)) for s in arch.embedding_specs(cfg)]
    expected += [("decoder.layers." + TE_NAMES.get(s.name, s.name), (cfg.num_layers, *full_shape(cfg, s)))
                 for s in arch.layer_specs(cfg)]
    expected += [(s.name, full_shape(cfg, s)) for s in arch.head_specs(cfg)]
    for key, want in expected:
        if not reader.has(key):
            raise InputError(f"{iter_dir}: {key}: missing tensor (expected shape {want})")
        if reader.shape(key) != want:
            raise InputError(f"{iter_dir}: {key}: shape {reader.shape(key)} does not match {want} expected from args")


def write_torch_dist(source: MegatronCheckpoint, out_iter_dir: Path, args: argparse.Namespace,
                     iteration: int | str) -> None:
    """Save a (TP1/PP1, mmap'd) legacy checkpoint's tensors as torch_dist into `out_iter_dir`."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    sd = source.state_dict(clone=False)
    with mcore.single_process_group():
        sharded = template(source.config)
        for key, item in sharded.items():
            if _is_tensor_item(item):
                item.data = sd[key]
        out_iter_dir.mkdir(parents=True)
        state = {"model": sharded, "args": args, "checkpoint_version": CHECKPOINT_VERSION,
                 "iteration": 0 if iteration == "release" else int(iteration)}
        with mcore.cpu_fallbacks_without_cuda(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dist_checkpointing.save(state, str(out_iter_dir),
                                    sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1))
