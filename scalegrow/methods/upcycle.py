"""Upcycling's options: the operator (scalegrow/operators/upcycle.py) needs no prepare step."""
from __future__ import annotations

from dataclasses import dataclass

from scalegrow.core.config import ModelConfig
from scalegrow.operators.upcycle import Upcycle


@dataclass(frozen=True)
class UpcycleOptions:
    noise: float = 0.0  # relative Gaussian noise on the expert copies (0: the dense function exactly)
    granularity: int = 1  # G: E·G experts of ffn_hidden_size/G neurons (target num_moe_experts, topk count them all)


def make_operator(src: ModelConfig, dst: ModelConfig, seed: int, options: UpcycleOptions) -> Upcycle:
    if options.noise < 0:
        raise ValueError(f"noise: must be >= 0, got {options.noise}")
    return Upcycle(src, dst, seed, noise=options.noise, granularity=options.granularity)
