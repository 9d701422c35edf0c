"""The growth-operator interface: pure functions on full (unsharded) per-layer tensors.

An operator never sees TP/PP or files. The executor (`scalegrow.stream`) hands it merged source
tensors under megatron-core names and shards whatever it returns.
"""
from __future__ import annotations

from typing import Iterable

import torch

from scalegrow.arch import TensorSpec
from scalegrow.config import ModelConfig

# Settings no width/depth operator changes: the target must match the source in each.
STRUCTURAL = ("normalization", "swiglu", "position_embedding_type", "rotary_base", "rotary_percent",
              "untie_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias",
              "padded_vocab_size", "max_position_embeddings")


def require_equal(src: ModelConfig, dst: ModelConfig, key: str, why: str = "") -> None:
    if getattr(src, key) != getattr(dst, key):
        reason = f" ({why})" if why else ""
        raise ValueError(f"{key}: target {getattr(dst, key)!r} differs from source "
                         f"{getattr(src, key)!r}; growth cannot change it{reason}")


def require_not_smaller(src: ModelConfig, dst: ModelConfig, keys: Iterable[str]) -> None:
    for key in keys:
        if getattr(dst, key) < getattr(src, key):
            raise ValueError(f"{key}: target {getattr(dst, key)} is smaller than source "
                             f"{getattr(src, key)}; grow only grows (use `scalegrow shrink`)")


class GrowthOperator:
    """Subclasses set `name` and implement the `grow_*` methods; `setup` precomputes maps."""

    name = ""

    def __init__(self, src: ModelConfig, dst: ModelConfig, seed: int = 0):
        self.src = src
        self.dst = self.resolve(src, dst)
        self.seed = seed
        self.setup()

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        for key in STRUCTURAL:
            require_equal(src, dst, key)

    def resolve(self, src: ModelConfig, dst: ModelConfig) -> ModelConfig:
        """Validate the pair (ValueError naming the key) and return the final target config."""
        self.check(src, dst)
        return dst

    def setup(self) -> None:
        pass

    def layer_sources(self, index: int) -> tuple[int, ...]:
        """Source layers that target layer `index` reads."""
        raise NotImplementedError

    def grow_embeddings(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def grow_layer(self, index: int, sources: dict[int, dict[str, torch.Tensor]],
                   specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
        """Target layer `index` from its source layers; returns every tensor in `specs`."""
        raise NotImplementedError

    def grow_head(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Final norm and output layer. For tied models the word embeddings come under the
        `output_layer.weight` name and the result is the target's tied output weight."""
        raise NotImplementedError
