"""Tensor-parallel rules by `TensorSpec`: a full tensor split into TP shards and merged back, the
shard shapes, and Megatron's vocabulary padding. The split axis and the packing of a spec say how a
full tensor maps onto TP ranks, so operators never see shards."""
from __future__ import annotations

import torch

from scalegrow.core.arch import SWIGLU, VOCAB, TensorSpec


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
