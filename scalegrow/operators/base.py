"""The operator interface: pure functions from a source model's tensors to a target model's.

An operator (growth, shrink, or identity) maps full (unsharded) tensors under megatron-core names,
one part of the model at a time: the embeddings, each target layer from the source layers it names,
and the head. It never sees TP/PP, files or data; the executor (`write/executor.py`) feeds it and
hands its results to a format's writer.
"""
from __future__ import annotations

from typing import Iterable

import torch

from scalegrow.core import arch
from scalegrow.core.arch import TensorSpec
from scalegrow.core.config import ModelConfig
from scalegrow.core.features import FEATURE, MoE


def require_equal(src: ModelConfig, dst: ModelConfig, key: str, why: str = "") -> None:
    """`key` (a Megatron-LM name) must be the same in the target as in the source."""
    require_same(key, src.to_dict()[key], dst.to_dict()[key], why)


def require_same(key: str, mine, theirs, why: str = "") -> None:
    if mine != theirs:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{key}: target {theirs!r} differs from source {mine!r}; growth cannot change it{reason}")


def require_not_smaller(src: ModelConfig, dst: ModelConfig, keys: Iterable[str] | None = None) -> None:
    """Every size in `keys` (default: every size both models have) at least the source's."""
    for key, mine, theirs in both_sizes(src, dst, keys):
        if theirs < mine:
            raise ValueError(f"{key}: target {theirs} is smaller than source {mine}; grow only grows "
                             f"(use `scalegrow shrink`)")


def require_not_larger(src: ModelConfig, dst: ModelConfig) -> None:
    """Every size both models have at most the source's."""
    for key, mine, theirs in both_sizes(src, dst):
        if theirs > mine:
            raise ValueError(f"{key}: target {theirs} is larger than source {mine}; shrink only shrinks "
                             f"(use `scalegrow grow`)")


def both_sizes(src: ModelConfig, dst: ModelConfig, keys: Iterable[str] | None = None):
    """(key, source's, target's) of the sizes in `keys` (default: all) that both models have."""
    mine, theirs = src.sizes(), dst.sizes()
    return [(key, mine[key], theirs[key]) for key in (keys if keys is not None else mine)
            if mine[key] is not None and theirs[key] is not None]


def moe_features() -> tuple[str, ...]:
    """The MoE record's features (flat names): how a token is routed, which experts an MoE layer has."""
    return tuple(key for key, (_, role) in MoE.flat_keys().items() if role == FEATURE)


def embedding_scale(src: ModelConfig, dst: ModelConfig) -> float:
    """√(D_S/D_T): what token embeddings carry when the model multiplies them by √hidden (Gemma) and the
    hidden size changes, so the stream keeps its values; 1 for every other model."""
    return (src.hidden_size / dst.hidden_size) ** 0.5 if src.embedding.scaled else 1.0


def times(t: torch.Tensor, c: float) -> torch.Tensor:
    """`t` (a tensor of the operator's own) times `c`, in place; untouched when c is 1 (an embedding
    is the largest tensor an operator holds: no second copy of it)."""
    return t if c == 1.0 else t.mul_(c)


OUTPUT_PROJECTIONS = ("self_attention.linear_proj.", "mlp.linear_fc2.")


def is_output_projection(name: str) -> bool:
    """linear_proj, linear_fc2 and every routed or shared expert's linear_fc2 (weights and biases)."""
    return name.startswith(OUTPUT_PROJECTIONS) or (
        name.startswith(("mlp.experts.", "mlp.shared_experts.")) and ".linear_fc2." in name)


def identity_block(cfg: ModelConfig, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer `index`'s tensors made an exact identity block. Under pre-LN: zero output projections
    (llama-pro's block; the stream passes unchanged). With post-norms: their gains 0 instead, since
    post(z) = 0·z/rms(z) = 0 for every z, while zero projections would leave their rounding residue
    rescaled by 1/√eps; the projections stay copies that train once the gain moves."""
    if not cfg.norm.post:
        return {k: torch.zeros_like(v) if is_output_projection(k) else v for k, v in tensors.items()}
    posts = {s.name for s in arch.layer_specs(cfg, index) if s.role == arch.Role.POST_NORM_WEIGHT}
    return {k: cfg.norm.stored(torch.zeros_like(v)) if k in posts else v for k, v in tensors.items()}


class Operator:
    """Subclasses set `name` and implement `layer_sources` and the `map_*` methods; `setup`
    precomputes whatever maps they share."""

    name = ""
    handles_moe = False  # an operator with rules for MoE layers (router, experts) sets this
    handles_mla = False  # ... and for multi-latent attention's projections and latent norms
    entrywise = True  # every target entry is a multiple of one source entry (copies, splits): Adam's state
    # can be grown exactly (write/moments.py); a learned operator that mixes entries (LiGO) is not

    def __init__(self, src: ModelConfig, dst: ModelConfig, seed: int = 0):
        if (src.moe or dst.moe) and not self.handles_moe:
            raise ValueError(f"num_moe_experts: {self.name} has no rules for MoE layers yet (lemon, upcycle, "
                             f"more-experts, subclone, drop-layers and prune-experts have)")
        if (src.mla or dst.mla) and not self.handles_mla:
            raise ValueError(f"multi_latent_attention: {self.name} has no rules for multi-latent attention yet "
                             f"(lemon, subclone and drop-layers have; convert, upcycle, more-experts and "
                             f"prune-experts pass it through)")
        self.src = src
        self.dst = self.resolve(src, dst)
        self.seed = seed
        self.setup()
        self.keep_layer_types()

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        """Every feature (what no width or depth operator changes: the norm, the activation, rope, ...)
        is the source's."""
        theirs = dst.features()
        for key, mine in src.features().items():
            require_same(key, mine, theirs[key])

    def resolve(self, src: ModelConfig, dst: ModelConfig) -> ModelConfig:
        """Validate the pair (ValueError naming the key) and return the final target config."""
        self.check(src, dst)
        return dst

    def setup(self) -> None:
        pass

    def origins(self) -> list[int] | None:
        """Per target layer, the source layer whose per-layer settings (its sliding window) it keeps:
        the first it reads (None: not known yet, e.g. before a calibration picks the layers)."""
        return [self.layer_sources(j)[0] for j in range(self.dst.num_layers)]

    def keep_layer_types(self) -> None:
        """Give each target layer its source layer's per-layer settings (which layers use the window)."""
        origins = self.origins()
        if origins is not None:
            self.dst = self.dst.with_layer_origins(self.src, origins)

    def identity_layers(self) -> frozenset[int]:
        """Target layers that are new identity blocks (zero or cancelling output projections), from a
        `depth_map` of (source layer, is new) where the operator has one. At the growth point such a
        block computes nothing, so no gradient reaches its other tensors (write/moments.py)."""
        depth = getattr(self, "depth_map", None) or []
        return frozenset(j for j, (_, new) in enumerate(depth) if new)

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
