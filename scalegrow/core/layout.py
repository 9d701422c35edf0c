"""Checkpoint layouts: how many layers each pipeline stage holds (`Stages`), and the whole partition
of a checkpoint (`Layout`: TP size, stages, EP size)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stages:
    """How `num_layers` transformer layers sit on pipeline stages."""

    layers_per_stage: tuple[int, ...]

    @property
    def pp(self) -> int:
        return len(self.layers_per_stage)

    @property
    def num_layers(self) -> int:
        return sum(self.layers_per_stage)

    def first_layer(self, stage: int) -> int:
        return sum(self.layers_per_stage[:stage])

    def layers(self, stage: int) -> range:
        """Global indices of the layers on `stage`."""
        first = self.first_layer(stage)
        return range(first, first + self.layers_per_stage[stage])

    def locate(self, layer: int) -> tuple[int, int]:
        """Global layer index -> (stage, index local to that stage)."""
        for stage, count in enumerate(self.layers_per_stage):
            if layer < count:
                return stage, layer
            layer -= count
        raise IndexError(f"layer {layer} beyond {self.num_layers} layers")

    @classmethod
    def build(cls, num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> "Stages":
        """Even split, or Megatron's uneven split with explicit first/last stage layer counts."""
        if pp < 1:
            raise ValueError(f"pipeline parallel size must be >= 1, got {pp}")
        counts = [None] * pp
        if first is not None:
            counts[0] = first
        if last is not None and pp > 1:
            counts[-1] = last
        fixed = sum(c for c in counts if c is not None)
        middle = [i for i, c in enumerate(counts) if c is None]
        rest = num_layers - fixed
        if rest < 0 or (middle and rest % len(middle)) or (not middle and rest):
            detail = (f" with first={first}, last={last}" if first or last else
                      " evenly (set --decoder-first/last-pipeline-num-layers for an uneven split)")
            raise ValueError(f"num_layers {num_layers} cannot be split over {pp} pipeline stages{detail}")
        for i in middle:
            counts[i] = rest // len(middle)
        if min(counts) < 1:
            raise ValueError(f"num_layers {num_layers} over {pp} pipeline stages leaves a stage empty: {counts}")
        return cls(tuple(counts))

    def megatron_args(self) -> dict[str, int | None]:
        """The `decoder_{first,last}_pipeline_num_layers` args that reproduce this split."""
        even = Stages.build(self.num_layers, self.pp) if self.num_layers % self.pp == 0 else None
        if even == self:
            return {"decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None}
        first, last = self.layers_per_stage[0], self.layers_per_stage[-1]
        return {"decoder_first_pipeline_num_layers": first,
                "decoder_last_pipeline_num_layers": last if self.pp > 1 else None}


@dataclass(frozen=True)
class Layout:
    """A checkpoint's parallel layout: tensor-parallel size, pipeline stages, and expert-parallel size
    (MoE: each EP rank's files hold E/EP of every MoE layer's experts, numbered from 0 there)."""

    tp: int
    stages: Stages
    ep: int = 1

    @property
    def pp(self) -> int:
        return self.stages.pp

    @classmethod
    def single(cls, num_layers: int) -> "Layout":
        """TP1/PP1: the whole model in one piece."""
        return cls(1, Stages((num_layers,)))
