"""The layer-by-layer executor: read -> map -> write, one target layer at a time.

Target layers are produced in order, stage by stage. For each one the executor loads only the
source layers the operator names (full tensors from the reader), applies the operator and hands the
result to the writer, which shards, pads and stores it by its format's rules. Peak memory is a few
layers. The same loop serves every command (grow, shrink, convert, save) and in-memory growth.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from tqdm import tqdm

from scalegrow.core import arch
from scalegrow.formats.base import MemoryReader, Reader, StateDictWriter, Writer
from scalegrow.operators.base import Operator


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


def run(source: Reader, op: Operator, writer: Writer, progress: bool = True, desc: str | None = None,
        stages: list[int] | None = None, positions: frozenset[int] | None = None) -> None:
    """Stream `op` applied to `source` into `writer`, one target stage and one layer at a time
    (a worker's share, when given: only `stages`, and of them only `positions`: -1 the embeddings,
    j layer j, num_layers the head)."""
    try:
        _stream(source, op, writer, progress, desc or op.name, stages, positions)
    except BaseException:
        writer.abort()
        raise
    finally:
        source.release()


def _stream(source: Reader, op: Operator, writer: Writer, progress: bool, desc: str, only: list[int] | None,
            positions: frozenset[int] | None) -> None:
    stages, last = writer.layout.stages, op.dst.num_layers
    reads = max(len(op.layer_sources(j)) for j in range(op.dst.num_layers))
    cache = LayerCache(source.layer, size=max(2, reads))  # e.g. LiGO: every target layer reads all sources

    def mine(position: int) -> bool:
        return positions is None or position in positions

    bar = tqdm(total=op.dst.num_layers + 2, desc=desc, unit="layer", disable=not progress)
    for stage in range(stages.pp) if only is None else only:
        writer.open_stage(stage)
        if stage == 0 and mine(-1):
            _write(writer, op.map_embeddings(source.embeddings()))
            bar.update()
        for j in filter(mine, stages.layers(stage)):
            grown = op.map_layer(j, {i: cache.get(i) for i in op.layer_sources(j)})
            _write(writer, {arch.layer_key(j, k): v for k, v in grown.items()})
            bar.update()
        if stage == stages.pp - 1 and mine(last):
            _write(writer, op.map_head(source.head()))
            bar.update()
        writer.close_stage()
    bar.close()
    writer.finish()


def _write(writer: Writer, tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        writer.write(key, tensor)


def materialise(source: Reader, op: Operator) -> dict[str, torch.Tensor]:
    """`op` applied to `source`, into a state dict in memory (reference-model names)."""
    writer = StateDictWriter(op.dst)
    run(source, op, writer, progress=False)
    return writer.state


def apply(op: Operator, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`op` applied to a whole state dict in memory (reference-model names in and out)."""
    return materialise(MemoryReader.of(state_dict, op.src), op)
