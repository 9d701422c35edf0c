"""Sliding-window attention as transformers' families spell it, and as megatron-core's `window_size`
(left, 0) with `window_attn_skip_freq` (which layers). transformers' `sliding_window` W lets a query
see W keys, itself included (`kv_idx > q_idx - W`): megatron-core's left is W - 1.

- Mistral: `sliding_window` on every layer (absent from config.json: transformers' default 4096;
  null: full attention; Mistral v0.2 and later say null).
- Qwen2/Qwen3: only with `use_sliding_window`; the layers from `max_window_layers` on, or those
  `layer_types` names "sliding_attention" (Qwen2.5's `sliding_window: 131072` with the flag off is
  full attention).
"""
from __future__ import annotations

from scalegrow.core.config import ModelConfig, compact_pattern
from scalegrow.formats.hf.family import Refusal

MISTRAL_DEFAULT = 4096  # MistralConfig's sliding_window when config.json leaves it out
LAYER_TYPES = ("full_attention", "sliding_attention")


def window_args(tokens: int | None, pattern: list[int] | None = None) -> dict:
    """The flat Megatron values of a window of `tokens` (None: none) on the layers `pattern` marks."""
    if not tokens:
        return dict(window_size=None, window_attn_skip_freq=None)
    return dict(window_size=[tokens - 1, 0], window_attn_skip_freq=compact_pattern(pattern) if pattern else None)


def tokens_of(cfg: ModelConfig) -> int | None:
    """transformers' sliding_window of a model (None: full attention)."""
    return cfg.attention.window[0] + 1 if cfg.attention.window is not None else None


def mistral_in(hf: dict) -> dict:
    return window_args(hf.get("sliding_window", MISTRAL_DEFAULT))


def mistral_requires(cfg: ModelConfig) -> dict:
    """Mistral has one window for every layer or none."""
    return {"window_attn_skip_freq": None}


def qwen_in(hf: dict) -> dict:
    if not (hf.get("use_sliding_window") and hf.get("sliding_window")):
        return window_args(None)
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                      "full_attention" for i in range(hf["num_hidden_layers"])]
    pattern = [int(t == "sliding_attention") for t in types]
    return window_args(hf["sliding_window"], pattern) if any(pattern) else window_args(None)


def qwen_out(cfg: ModelConfig, base: dict) -> dict:
    """Qwen's keys: the flag, the window, every layer's type; max_window_layers where the windowed
    layers are exactly those from some layer on (else layer_types alone says which)."""
    tokens, pattern = tokens_of(cfg), cfg.window_pattern()
    out = {"use_sliding_window": tokens is not None, "layer_types": [LAYER_TYPES[w] for w in pattern]}
    if tokens is not None:
        out["sliding_window"] = tokens
        first = pattern.index(True)
        if pattern == [i >= first for i in range(len(pattern))]:
            out["max_window_layers"] = first
    return out


LAYER_TYPES_REFUSAL = Refusal("layer_types", "full and sliding-window attention layers",
                              lambda v, hf: set(v) <= set(LAYER_TYPES), lambda hf: sorted(set(hf.get("layer_types") or [])))
