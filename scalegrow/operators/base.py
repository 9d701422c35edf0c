"""The operator interface: pure functions from a source model's tensors to a target model's.

An operator (growth, shrink, or identity) maps full (unsharded) tensors under megatron-core names,
one part of the model at a time: the embeddings, each target layer from the source layers it names,
and the head. It never sees TP/PP, files or data; the executor (`scalegrow.executor`) feeds it and
hands its results to a format's writer.
"""
from __future__ import annotations

from typing import Iterable

import torch

from scalegrow import arch
from scalegrow.arch import TensorSpec
from scalegrow.config import ModelConfig

# Settings no width/depth operator changes: the target must match the source in each.
STRUCTURAL = ("normalization", "swiglu", "openai_gelu", "position_embedding_type", "rotary_base", "rotary_percent",
              "untie_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
              "padded_vocab_size", "max_position_embeddings")
MOE = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq", "moe_router_pre_softmax",
       "moe_aux_loss_coeff", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate")


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


class Operator:
    """Subclasses set `name` and implement `layer_sources` and the `map_*` methods; `setup`
    precomputes whatever maps they share."""

    name = ""
    handles_moe = False  # an operator with rules for MoE layers (router, experts) sets this

    def __init__(self, src: ModelConfig, dst: ModelConfig, seed: int = 0):
        if (src.num_moe_experts or dst.num_moe_experts) and not self.handles_moe:
            raise ValueError(f"num_moe_experts: {self.name} has no rules for MoE layers yet (lemon, upcycle, "
                             f"more-experts, subclone, drop-layers and prune-experts have)")
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

    def details(self) -> dict:
        """What this operator decided, for `scalegrow.json` (e.g. which layers a shrink kept)."""
        return {}

    def layer_specs(self, index: int) -> list[TensorSpec]:
        """The tensors target layer `index` must have."""
        return arch.layer_specs(self.dst, index)

    def layer_sources(self, index: int) -> tuple[int, ...]:
        """Source layers that target layer `index` reads."""
        raise NotImplementedError

    def map_embeddings(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def map_layer(self, index: int, sources: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Target layer `index` from its source layers (by source index); every tensor of `layer_specs`."""
        raise NotImplementedError

    def map_head(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Final norm and output layer. For tied models the word embeddings come under the
        `output_layer.weight` name and the result is the target's tied output weight."""
        raise NotImplementedError


class LayerwiseOperator(Operator):
    """Target layer i comes from source layer i alone; embeddings and head pass through (identity,
    upcycling, expert copies and pruning)."""

    def layer_sources(self, index: int) -> tuple[int, ...]:
        return (index,)

    def map_embeddings(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)

    def map_head(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)
