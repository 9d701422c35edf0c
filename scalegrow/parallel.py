"""Parallel layouts: tensor-parallel split/merge by `TensorSpec`, and pipeline stages.

A `Layout` is how a checkpoint is partitioned: its TP size and its pipeline `Stages` (how many
layers each stage holds). Everything here works from a `TensorSpec`: the split axis and the packing
say how a full tensor maps onto TP ranks, so operators never see shards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scalegrow.arch import SWIGLU, VOCAB, TensorSpec


def split(spec: TensorSpec, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Full tensor -> `tp` contiguous shards, rank order."""
    if spec.tp_axis is None or tp == 1:
        return [full] * tp
    if spec.packing == SWIGLU:
        # [gate; up] -> rank r holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return [torch.cat(pair, dim=0) for pair in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]
    if full.shape[spec.tp_axis] % tp:
        raise ValueError(f"{spec.name}: dim {spec.tp_axis} of shape {tuple(full.shape)} is not "
                         f"divisible by tensor parallel size {tp}")
    return [s.contiguous() for s in full.chunk(tp, dim=spec.tp_axis)]


def merge(spec: TensorSpec, shards: list[torch.Tensor]) -> torch.Tensor:
    """TP shards, rank order -> the full tensor. Replicated tensors come from rank 0."""
    if spec.tp_axis is None or len(shards) == 1:
        return shards[0]
    if spec.packing == SWIGLU:
        halves = [s.chunk(2, dim=0) for s in shards]  # each rank: [gate_r; up_r]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=spec.tp_axis)


def shard_shape(spec: TensorSpec, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    if spec.tp_axis is None:
        return tuple(shape)
    out = list(shape)
    out[spec.tp_axis] //= tp
    return tuple(out)


def pad_vocab(spec: TensorSpec, full: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Trim or zero-extend the vocabulary rows of an embedding/output tensor to `padded_vocab_size`."""
    assert spec.packing == VOCAB
    rows = full.shape[0]
    if rows >= padded_vocab_size:
        return full[:padded_vocab_size]
    pad = full.new_zeros((padded_vocab_size - rows, *full.shape[1:]))
    return torch.cat([full, pad], dim=0)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: round the tokenizer's vocabulary up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


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
