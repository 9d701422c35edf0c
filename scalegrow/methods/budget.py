"""Shrinking to a parameter budget: `scalegrow shrink --params N` picks the target shape.

The rule follows Minitron (arXiv 2407.14679, §4 "Best practices" 1: at the same size, pruning width
beats pruning depth): keep every layer, and narrow the width by one factor w applied alike to the
hidden size, the FFN (and every expert's and shared expert's FFN), and the query groups (the heads per
group and the head size kept, so attention keeps its shape per group). Widths are rounded to
multiples of 8 (the hidden size to a multiple the heads divide; at least one group); w is the
largest, to 1/1000, whose model fits N parameters.
"""
from __future__ import annotations

import math
import re

from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import num_parameters
from scalegrow.errors import InputError

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
ROUND = 8


def parse(text: str, source_params: int) -> int:
    """'1.5B', '350M', '120000' (a count) or '0.5' (a fraction of the source's parameters)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*", text.upper())
    if not match:
        raise InputError(f"--params: not a parameter count: {text!r} (e.g. 1.5B, 350M, or a fraction like 0.5)")
    value, suffix = float(match.group(1)), match.group(2)
    params = value * SUFFIXES[suffix] if suffix else value * source_params if value <= 1 else value
    if not 0 < params < source_params:
        raise InputError(f"--params: {text} is {params:,.0f} parameters; the source has {source_params:,}, "
                         f"so the budget must be smaller (and above zero)")
    return int(params)


def _round(value: float, unit: int = ROUND) -> int:
    return max(unit, int(round(value / unit)) * unit)


def narrowed(src: ModelConfig, w: float, tp: int = 1) -> ModelConfig:
    """`src` with its width scaled by `w` (see the module docstring), every layer kept, splittable
    at tensor parallel size `tp` (query groups a multiple of it, the FFN too)."""
    groups = _round(src.attention.groups * w, tp)
    heads = groups * src.attention.per_group
    ffn = math.lcm(ROUND, tp)
    change = {"hidden_size": _round(src.hidden_size * w, math.lcm(ROUND, heads)),  # the heads divide it
              "ffn_hidden_size": _round(src.mlp.ffn_hidden_size * w, ffn), "num_query_groups": groups,
              "num_attention_heads": heads, "kv_channels": src.attention.head_dim}
    flat = src.to_dict()
    for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        if flat[key]:
            change[key] = _round(flat[key] * w, ffn)
    return src.replace(**change)


def shape_for(src: ModelConfig, params: int, tp: int = 1) -> ModelConfig:
    """The widest `narrowed(src, w, tp)` with at most `params` parameters."""
    for step in range(999, 0, -1):
        cfg = narrowed(src, step / 1000, tp)
        if num_parameters(cfg) <= params:
            return cfg
    raise InputError(f"--params: {params:,} parameters is below the narrowest model of this depth "
                     f"({num_parameters(narrowed(src, 0.001, tp)):,}); drop layers with --target instead")


def rule(src: ModelConfig, dst: ModelConfig, params: int) -> dict:
    """What `scalegrow.json` records about the choice."""
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
    chose = dst.to_dict()
    return {"params": params, "chose": {k: chose[k] for k in keys}, "params_chosen": num_parameters(dst),
            "rule": "Minitron (arXiv 2407.14679 §4): width over depth; every layer kept, hidden, FFN and "
                    "query groups narrowed by one factor"}
