"""Expert pruning's prepare step: how much each MoE layer's router uses each expert on calibration
tokens, one layer at a time through the executor's layer iterator (like subcloning's calibration)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scalegrow.data import batch
from scalegrow.methods.base import Context
from scalegrow.methods.subclone import embed
from scalegrow.core.model import TransformerLayer, route
from scalegrow.operators.experts import PruneExperts


@dataclass(frozen=True)
class PruneExpertsOptions:
    tokens: int = 16384  # calibration tokens


def fit_experts(op: PruneExperts, opts: PruneExpertsOptions, ctx: Context) -> dict:
    seq = ctx.stream.seq_length
    n = max(1, min(ctx.stream.num_samples, opts.tokens // seq))
    tokens = batch(ctx.stream, list(range(n)))[:, :-1]
    op.select(routing_mass(ctx.source, tokens, ctx.progress))
    return {"calibration": {"data": ctx.data, "tokens": tokens.numel()}}


@torch.no_grad()
def routing_mass(source, tokens: torch.Tensor, progress: bool = False) -> dict[int, torch.Tensor]:
    """Per MoE layer [E]: the router weight each expert received, summed over the tokens that chose it."""
    cfg = source.config
    x, freqs = embed(source, cfg, tokens)
    mass = {}
    for i, tensors in source.layers(progress, "route"):
        layer = TransformerLayer(cfg, i)
        layer.load_state_dict({k: v.float() for k, v in tensors.items()})
        if cfg.is_moe_layer(i):
            mid = x + layer.self_attention(layer.input_layernorm(x), freqs)
            flat = layer.pre_mlp_layernorm(mid).flatten(0, 1)
            router = layer.mlp.router
            weights, index = route(torch.nn.functional.linear(flat, router.weight, router.bias), cfg.moe.topk,
                                   cfg.moe.pre_softmax)
            mass[i] = torch.zeros(cfg.moe.num_experts, dtype=torch.float64).index_add_(
                0, index.flatten(), weights.flatten().double())
        x = layer(x, freqs)
    return mass
