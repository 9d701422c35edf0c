"""Expert pruning's prepare step: how much each MoE layer's router uses each expert on calibration
tokens, one layer at a time (`methods/calibration.py`, like subcloning's calibration)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scalegrow.formats.base import Reader
from scalegrow.methods.base import Context
from scalegrow.methods.calibration import walk
from scalegrow.methods.options import option
from scalegrow.methods.subclone import calibration_tokens
from scalegrow.operators.experts import PruneExperts


@dataclass(frozen=True)
class PruneExpertsOptions:
    tokens: int = option(16384, "calibration tokens", flag="--calib-tokens", minimum=1)


def fit_experts(op: PruneExperts, opts: PruneExpertsOptions, ctx: Context) -> dict:
    tokens = calibration_tokens(ctx, opts.tokens)
    op.select(routing_mass(ctx.source, tokens, ctx.device, ctx.progress))
    return {"calibration": {"data": ctx.data, "tokens": tokens.numel()}}


@torch.no_grad()
def routing_mass(source: Reader, tokens: torch.Tensor, device: torch.device = torch.device("cpu"),
                 progress: bool = False) -> dict[int, torch.Tensor]:
    """Per MoE layer [E]: the router weight each expert received, summed over the tokens that chose it."""
    cfg = source.config
    mass = {i: torch.zeros(cfg.moe.num_experts, dtype=torch.float64) for i in range(cfg.num_layers)
            if cfg.is_moe_layer(i)}

    def visit(i, layer, x, freqs):
        if i in mass:
            mid = layer.attention_residual(x, freqs)
            flat = layer.pre_mlp_layernorm(mid).flatten(0, 1)
            _, weights, index = layer.mlp.router(flat)
            mass[i].index_add_(0, index.flatten().cpu(), weights.flatten().double().cpu())
        return layer(x, freqs)

    walk(source, tokens, visit, device, progress, "route")
    return mass
