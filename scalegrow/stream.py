"""Layer-by-layer executor (plan -> stream -> write).

Target layers are produced in order. For each one the executor loads only the source layers the
operator asks for (TP-merged from mmap'd shards), applies the operator and hands the full tensors to
the writer of the target stage, which splits them for the target TP. Peak memory is a few layers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from tqdm import tqdm

from scalegrow import arch
from scalegrow.checkpoint.megatron import MegatronCheckpoint
from scalegrow.checkpoint.writer import MegatronWriter
from scalegrow.checkpoint.sharding import pad_vocab
from scalegrow.growth.base import GrowthOperator


class LayerCache:
    """The last few source layers, since consecutive target layers often read the same ones."""

    def __init__(self, load: Callable[[int], dict[str, torch.Tensor]], size: int = 2):
        self.load, self.size, self._layers = load, size, OrderedDict()

    def get(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._layers:
            self._layers[index] = self.load(index)
            while len(self._layers) > self.size:
                self._layers.popitem(last=False)
        self._layers.move_to_end(index)
        return self._layers[index]


def fit_vocab(tensors: dict[str, torch.Tensor], padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """Re-pad vocabulary rows for the target layout (Megatron pads per TP size)."""
    vocab = (arch.WORD_EMBEDDINGS, arch.OUTPUT_LAYER)
    spec = arch.TensorSpec(arch.WORD_EMBEDDINGS, "word_embeddings", 0, arch.VOCAB)
    return {k: pad_vocab(spec, v, padded_vocab_size) if k in vocab else v for k, v in tensors.items()}


def grow_checkpoint(src: MegatronCheckpoint, op: GrowthOperator, writer: MegatronWriter,
                    progress: bool = True) -> None:
    """Stream the grown model into `writer`, one target stage and one layer at a time."""
    dst, layout = writer.cfg, writer.layout
    reads = max(len(op.layer_sources(j)) for j in range(dst.num_layers))
    cache = LayerCache(src.layer, size=max(2, reads))  # e.g. LiGO: every target layer reads all sources
    bar = tqdm(total=dst.num_layers + 2, desc=f"grow/{op.name}", unit="layer", disable=not progress)
    for stage in range(layout.pp):
        writer.open_stage(stage)
        if stage == 0:
            _write(writer, fit_vocab(op.grow_embeddings(src.embeddings()), dst.padded_vocab_size))
            bar.update()
        first = layout.first_layer(stage)
        for j in range(first, first + layout.layers_per_stage[stage]):
            sources = {i: cache.get(i) for i in op.layer_sources(j)}
            grown = op.grow_layer(j, sources, arch.layer_specs(dst))
            _write(writer, {arch.layer_key(j, k): v for k, v in grown.items()})
            bar.update()
        if stage == layout.pp - 1:
            head = fit_vocab(op.grow_head(src.head()), dst.padded_vocab_size)
            if dst.tied and layout.pp == 1:
                head.pop(arch.OUTPUT_LAYER)  # tied at PP=1: the embedding is the output layer
            _write(writer, head)
            bar.update()
        writer.close_stage()
    bar.close()
    src.release()
    writer.finish()


def _write(writer: MegatronWriter, tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        writer.write(key, tensor)


def grow_state_dict(op: GrowthOperator, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Grow a full TP1/PP1 state dict in memory (reference-model names)."""
    src, dst = op.src, op.dst
    out = op.grow_embeddings({s.name: sd[s.name] for s in arch.embedding_specs(src)})
    layers = {i: {s.name: sd[arch.layer_key(i, s.name)] for s in arch.layer_specs(src)}
              for i in range(src.num_layers)}
    for j in range(dst.num_layers):
        grown = op.grow_layer(j, {i: layers[i] for i in op.layer_sources(j)}, arch.layer_specs(dst))
        out.update({arch.layer_key(j, k): v for k, v in grown.items()})
    head = {s.name: sd[s.name] for s in arch.head_specs(src) if s.name in sd}
    head.setdefault(arch.OUTPUT_LAYER, sd[arch.WORD_EMBEDDINGS])
    grown_head = op.grow_head(head)
    if dst.tied:
        grown_head.pop(arch.OUTPUT_LAYER)
    out.update(grown_head)
    return out
