"""megatron-core `torch_dist` checkpoints, read and written one layer at a time.

    DIR/latest_checkpointed_iteration.txt
    DIR/iter_0001000/{metadata.json, common.pt, .metadata, __0_0.distcp}

The common state (args, iteration) is `common.pt`, as megatron-core 0.16 to 0.18 write and read it;
megatron-core 0.19 saves it inside the `.distcp` files instead, as the byte item `common_state/shard_0_1`
(a one-element list), and still reads `common.pt` (logging that it is deprecated). Both are read here;
`TorchDistOptions.common` chooses which is written (default: `common.pt`, which every one of them loads).

The format is layout-free: Megatron-LM re-shards it on load for any TP/PP, and the args in
`common.pt` only record the layout it was trained at. Its tensors are DCP chunks (`dcp.py`) under
the names megatron-core's `GPTModel.sharded_state_dict()` gives them:
- layer tensors are stacked over layers, `decoder.layers.{name}` of shape [num_layers, ...], one chunk
  per layer, the norms spelled the Transformer-Engine way (`linear_qkv.layer_norm_weight`); with
  dense and MoE layers mixed, megatron-core keeps one key per layer instead (`decoder.layers.{i}.{name}`);
- SequentialMLP experts are stacked over global experts, `decoder.layers.mlp.experts.experts.{name}`
  of shape [num_layers, num_moe_experts, ...] (layers mixed: [num_moe_experts, ...] per layer);
- SwiGLU's fc1 is stored as two chunks per layer, gate rows then up rows;
- each linear module's `_extra_state` is a byte item `decoder.layers.{module}._extra_state/shard_{i}_{L}`;
- a tied model stores no `output_layer.weight`.
tests/test_torch_dist.py holds this layout to megatron-core's own `dist_checkpointing.save`.
megatron-core 0.19's HybridModel names the same tensors otherwise (`hybrid.py`): read when the args
carry a `hybrid_layer_pattern`, written on request or from such a source (`TorchDistOptions.model`).
"""
from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalegrow.core import arch
from scalegrow.core.arch import TensorSpec
from scalegrow.core.config import ModelConfig
from scalegrow.core.layout import Layout
from scalegrow.errors import InputError
from scalegrow.formats import hybrid, receipts
from scalegrow.formats.base import Format, Reader, nbytes, piece_sizes
from scalegrow.formats.dcp import DATA_FILE, ChunkReader, ChunkWriter
from scalegrow.formats.io import WriteQueue, safe_load
from scalegrow.formats.megatron_args import config_from_args
from scalegrow.formats.megatron_rules import (
    CHECKPOINT_VERSION,
    TRACKER,
    iteration_dir_name,
    megatron_args,
    resolve_iteration_dir,
    stages_from_args,
    stored_tensor,
    target_config,
)
from scalegrow.formats.options import OutputOptions

METADATA_JSON = "metadata.json"
COMMON = "common.pt"
COMMON_STATE = "common_state/shard_0_1"  # megatron-core >= 0.19: the common state inside the .distcp files
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
COMMON_BACKEND = {"common_backend": "torch", "common_backend_version": 1}  # metadata.json's, with common.pt


EXPERT_STACK = "mlp.experts.experts."  # experts' tensors, stacked over global expert indices


def homogeneous(cfg: ModelConfig) -> bool:
    """Whether every layer holds the same tensors (megatron-core then stacks them over layers)."""
    return cfg.moe is None or cfg.moe.every_layer


def placement(cfg: ModelConfig, index: int, name: str,
              hybrid_model: bool = False) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(stored key, offsets, sizes of the leading axes) of layer `index`'s tensor `name`. Homogeneous
    models stack every layer tensor over layers, [L, ...] at (index,); mixed dense/MoE layers keep one
    key per layer, as HybridModel's layout does (at its own layer index, `hybrid.py`). An expert's
    tensor is stacked over the experts too: [(L,) E, ...] at ((index,) e)."""
    expert = arch.expert_of(name)
    local = arch.te_layer_name(cfg, index, name) if expert is None else EXPERT_STACK + expert[1]
    if hybrid_model:
        key, offsets, sizes = arch.layer_key(hybrid.layer_index(index, name), local), (), ()
    elif homogeneous(cfg):
        key, offsets, sizes = arch.LAYER_PREFIX + local, (index,), (cfg.num_layers,)
    else:
        key, offsets, sizes = arch.layer_key(index, local), (), ()
    if expert is not None:
        offsets, sizes = offsets + (expert[0],), sizes + (cfg.moe.num_experts,)
    return key, offsets, sizes


def extra_state_key(cfg: ModelConfig, index: int, module_state: str, hybrid_model: bool = False) -> str:
    """`decoder.layers.mlp.linear_fc1._extra_state/shard_3_8`; an expert's: `shard_3.5_8.16`
    (layer and expert offsets, then sizes); `shard_0_1` where nothing is stacked."""
    key, offsets, sizes = placement(cfg, index, module_state, hybrid_model)
    return f"{key}/shard_{'.'.join(map(str, offsets)) or 0}_{'.'.join(map(str, sizes)) or 1}"


def stored_tensors(cfg: ModelConfig, hybrid_model: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(key, global shape) of every tensor a torch_dist checkpoint of `cfg` stores."""
    out = {s.name: arch.full_shape(cfg, s) for s in arch.embedding_specs(cfg)}
    for i in range(1 if homogeneous(cfg) and not hybrid_model else cfg.num_layers):
        for spec in arch.layer_specs(cfg, i):
            key, _, sizes = placement(cfg, i, spec.name, hybrid_model)
            out[key] = sizes + arch.full_shape(cfg, spec)
    out.update({stored_key(s.name, hybrid_model): arch.full_shape(cfg, s) for s in arch.final_norm_specs(cfg)})
    if not cfg.embedding.tied:
        out[arch.OUTPUT_LAYER] = arch.full_shape(cfg, arch.OUTPUT_SPEC)
    return list(out.items())


def stored_key(key: str, hybrid_model: bool) -> str:
    """The stored key of a tensor outside the layers (HybridModel calls the final norm `final_norm`)."""
    return hybrid.final_norm_key(key) if hybrid_model else key


def is_torch_dist(path: Path) -> bool:
    try:
        _, iter_dir, _ = resolve_iteration_dir(path)
    except InputError:
        return False
    return (iter_dir / METADATA_JSON).is_file()


# ---- reading --------------------------------------------------------------------------------------------
@dataclass
class DistReader(Reader):
    """A torch_dist checkpoint, read one layer at a time."""

    iter_dir: Path = None
    _chunks: ChunkReader = field(repr=False, default=None)
    common: str = COMMON  # where its common state is: "common.pt" or "inline" (megatron-core >= 0.19)

    format = "torch_dist"

    @property
    def megatron_model(self) -> str:
        """Which megatron-core model saved it: "gpt" (GPTModel) or "hybrid" (HybridModel)."""
        return "hybrid" if hybrid.pattern_of(self.args) else "gpt"

    def notes(self) -> dict:
        notes = {"common_state": self.common, "megatron_model": self.megatron_model}
        if self.megatron_model == "hybrid":
            notes["hybrid_layer_pattern"] = hybrid.pattern_of(self.args)
        return notes

    def files(self) -> list[Path]:
        return sorted(p for p in self.iter_dir.iterdir() if p.is_file())

    def tensor(self, key: str, spec: TensorSpec) -> torch.Tensor:
        parsed, as_hybrid = arch.split_layer_key(key), self.megatron_model == "hybrid"
        if parsed is None:
            return self._chunks.read(stored_key(key, as_hybrid))
        stored, offsets, _ = placement(self.config, *parsed, as_hybrid)
        n, shape = len(offsets), self._chunks.shape(stored)  # [(L,) (E,) ...]
        box = self._chunks.read(stored, offsets + (0,) * (len(shape) - n), (1,) * n + shape[n:])
        return box.reshape(shape[n:])


def checkpoint_bytes(cfg: ModelConfig, layout: Layout, dtype: torch.dtype) -> int:
    return sum(nbytes(shape, dtype) for _, shape in stored_tensors(cfg))


def open_dist(path: Path, validate: bool = True) -> DistReader:
    root, iter_dir, iteration = resolve_iteration_dir(path)
    try:
        backend = json.loads((iter_dir / METADATA_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{iter_dir / METADATA_JSON}: unreadable ({exc})") from exc
    if backend.get("sharded_backend") != "torch_dist":
        raise InputError(f"{iter_dir / METADATA_JSON}: sharded_backend {backend.get('sharded_backend')!r} "
                         f"is not supported (only torch_dist)")
    chunks = ChunkReader(iter_dir)
    common, where, layout = read_common(iter_dir, chunks)
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise InputError(f"{where}: args: missing Megatron argparse.Namespace")
    try:
        config = config_from_args(args)
        stages = stages_from_args(args, config)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{where}: args: {exc}") from exc
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    for key, want in stored_tensors(config, hybrid.pattern_of(args) is not None):  # what the args imply
        if not chunks.has(key):
            raise InputError(f"{iter_dir}: {key}: missing tensor (expected shape {want})")
        if chunks.shape(key) != want:
            raise InputError(f"{iter_dir}: {key}: shape {chunks.shape(key)} does not match {want} expected from args")
    ep = int(getattr(args, "expert_model_parallel_size", 1) or 1) if config.moe else 1
    return DistReader(root, iteration, args, config, Layout(tp, stages, ep), chunks.dtype(arch.WORD_EMBEDDINGS),
                      iter_dir, chunks, layout)


def read_common(iter_dir: Path, chunks: ChunkReader) -> tuple[object, str, str]:
    """(the common state, where it was read, its layout): `common.pt`, else the byte item inside
    the `.distcp` files (megatron-core >= 0.19)."""
    if (iter_dir / COMMON).is_file():
        return safe_load(iter_dir / COMMON, mmap=False), str(iter_dir / COMMON), COMMON
    data = chunks.object_bytes(COMMON_STATE)
    if data is None:
        raise InputError(f"{iter_dir}: no common state: neither {COMMON} nor a {COMMON_STATE!r} item in its "
                         f".distcp files")
    where = f"{iter_dir}: {COMMON_STATE}"
    state = safe_load(where, data=data)
    return (state[0] if isinstance(state, list) and state else state), where, "inline"


# ---- writing --------------------------------------------------------------------------------------------
class DistWriter:
    """Streams a model into torch_dist, chunk by chunk on a writer thread, in megatron-core's names
    (GPTModel's, or HybridModel's: `TorchDistOptions.model`); `finish` writes the index (`.metadata`),
    the common state (args, iteration) and `metadata.json`. The args record `layout`; the tensors
    themselves are stored whole (layout-free). Several workers and ranks share one checkpoint
    (`restrict`): each appends its chunks to its own `__{rank}_{worker}.distcp` and leaves a receipt
    of them; `complete` indexes every receipt's chunks, as megatron-core's save does for its ranks."""

    def __init__(self, out_dir: Path, cfg: ModelConfig, layout: Layout, source: Reader,
                 opts: OutputOptions = OutputOptions()):
        cfg.check_tp(layout.tp)
        self.out_dir, self.cfg, self.layout, self.common = out_dir, cfg, layout, opts.torch_dist.common
        self.hybrid_model = output_model(cfg, source, opts.torch_dist.model) == "hybrid"
        self.iteration, self.dtype = source.iteration, opts.weights_dtype(source.dtype)
        args = megatron_args(cfg, source.args, layout, source.iteration)
        self.args = hybrid.hybrid_args(args, layout.stages, cfg.moe is not None) if self.hybrid_model else args
        self.iter_dir = out_dir / iteration_dir_name(source.iteration)
        self.iter_dir.mkdir(parents=True, exist_ok=True)  # by every worker
        self._specs = dict(arch.model_specs(cfg))
        self._chunks = self._chunk_writer(DATA_FILE)
        self._queue = WriteQueue()
        self._name: str | None = None  # a worker's ("{rank}_{worker}"), once restricted

    def _chunk_writer(self, data_file: str) -> ChunkWriter:
        chunks = ChunkWriter(self.iter_dir, data_file)
        for key, shape in stored_tensors(self.cfg, self.hybrid_model):
            chunks.declare(key, shape, arch.stored_dtype(key, self.dtype))
        return chunks

    def restrict(self, units: frozenset, name: str) -> None:
        """A worker's writer: the executor hands it only its pieces, stored in its own data file."""
        self._name, self._chunks = name, self._chunk_writer(f"__{name}.distcp")

    def open_stage(self, stage: int) -> None:
        pass

    def write(self, key: str, full: torch.Tensor) -> None:
        stored = stored_tensor(self.cfg, self._specs, key, full)
        if stored is None:
            return
        spec, full = stored
        for name, offsets, chunk in self._boxes(key, spec, full.to(arch.stored_dtype(key, self.dtype))):
            self._queue.submit(functools.partial(self._chunks.add_chunk, name, offsets, chunk), self._chunks.path)

    def _boxes(self, key: str, spec: TensorSpec, full: torch.Tensor):
        """(stored key, offsets, chunk) of one tensor: a layer's tensor is one box [(1,) (1,) ...] of
        its stored key at its layer (and expert) offsets; SwiGLU's fc1 is two, gate rows and up rows."""
        parsed = arch.split_layer_key(key)
        if parsed is None:
            yield stored_key(key, self.hybrid_model), (0,) * full.dim(), full
            return
        stored, offsets, _ = placement(self.cfg, *parsed, self.hybrid_model)
        halves = full.chunk(2, dim=0) if spec.packing == arch.SWIGLU else (full,)
        row = 0
        for half in halves:
            yield stored, offsets + (row,) + (0,) * (full.dim() - 1), half.reshape((1,) * len(offsets) + half.shape)
            row += half.shape[0]

    def close_stage(self) -> None:
        self._queue.drain()

    def abort(self) -> None:
        self._queue.abort()
        self._chunks.abort()

    def finish(self) -> None:
        self._queue.close()
        if self._name is not None:
            receipts.leave(self.iter_dir, self._name, self._chunks.records())
            return
        self._complete()

    def complete(self) -> None:
        """Every worker has left its receipt: the byte items, `.metadata` over every worker's chunks."""
        self._complete(receipts.collect(self.iter_dir))

    def _complete(self, others: list[list] = ()) -> None:
        chunks = self._chunks
        for i in range(self.cfg.num_layers):  # megatron-core saves each module's (empty) extra state as a list
            for module_state in arch.layer_extra_state(self.cfg, i):
                chunks.add_object(extra_state_key(self.cfg, i, module_state, self.hybrid_model), [None])
        if self.hybrid_model:  # HybridModel keeps the output layer's (GPTModel drops it), tied or not
            chunks.add_object(f"{arch.OUTPUT_EXTRA_STATE}/shard_0_1", [None])
        common = {"args": self.args, "checkpoint_version": CHECKPOINT_VERSION,
                  "iteration": 0 if self.iteration == "release" else int(self.iteration)}
        if self.common == "inline":  # as megatron-core 0.19's save: a one-element list, no common.pt
            chunks.add_object(COMMON_STATE, [common])
        chunks.finish(others)
        if self.common == COMMON:
            torch.save(common, self.iter_dir / COMMON)
        backend = BACKEND if self.common == "inline" else {**BACKEND, **COMMON_BACKEND}  # as 0.19 / as 0.16
        (self.iter_dir / METADATA_JSON).write_text(json.dumps(backend))
        (self.out_dir / TRACKER).write_text(str(self.iteration))


def output_model(cfg: ModelConfig, source: Reader, model: str | None) -> str:
    """The megatron-core model a torch_dist output is laid out for: as asked, else the source's
    (a HybridModel checkpoint stays one), else GPTModel's. HybridModel's needs every layer alike."""
    model = model or getattr(source, "megatron_model", "gpt")
    if model == "hybrid" and not homogeneous(cfg):
        raise InputError(f"--torch-dist-model hybrid: dense and MoE layers mixed (moe_layer_freq "
                         f"{cfg.to_dict()['moe_layer_freq']}) are not supported in HybridModel's layout")
    return model


FORMAT = Format("torch_dist", "megatron-core distributed", is_torch_dist, open_dist, DistWriter, target_config,
                checkpoint_bytes, work_units=piece_sizes)
