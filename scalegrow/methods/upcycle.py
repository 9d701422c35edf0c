"""Upcycling's options: the operator (scalegrow/operators/upcycle.py) needs no prepare step."""
from __future__ import annotations

from dataclasses import dataclass

from scalegrow.core.config import ModelConfig
from scalegrow.methods.options import option
from scalegrow.operators.upcycle import Upcycle


@dataclass(frozen=True)
class UpcycleOptions:
    noise: float = option(0.0, "relative noise on the expert copies; 0 keeps the function exactly", minimum=0)
    granularity: int = option(1, "split the FFN into G segments, each copied into E experts of ffn/G neurons; "
                              "--target counts all E·G experts and top-k·G", metavar="G")


def make_operator(src: ModelConfig, dst: ModelConfig, seed: int, options: UpcycleOptions) -> Upcycle:
    return Upcycle(src, dst, seed, noise=options.noise, granularity=options.granularity)
