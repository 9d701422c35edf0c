"""Weight subcloning's prepare step: calibration (arXiv 2312.09299 §3), one layer at a time.

The large model runs on calibration tokens layer by layer, walking the source through the executor's
layer iterator: only one layer's weights and the calibration batch's activations are in memory at once.
A first pass gathers the statistics `Subclone.select` ranks by; a second measures the FFN-output
rescale of the kept neurons (§3.4, our rule; see `scalegrow.operators.subclone`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scalegrow.core.config import ModelConfig
from scalegrow.data import batch
from scalegrow.formats.base import Reader
from scalegrow.methods.base import Context
from scalegrow.core.model import Embedding, MoE, TransformerLayer, rotary_freqs, route
from scalegrow.operators.subclone import CalibrationStats, NormSite, Selection, Subclone


@dataclass(frozen=True)
class SubcloneOptions:
    """Subcloning's settings; these defaults serve `scalegrow shrink`."""

    tokens: int = 16384  # calibration tokens
    rescale: bool = True  # rescale each kept linear_fc2 for the neurons dropped beside it


def fit_selection(op: Subclone, opts: SubcloneOptions, ctx: Context) -> dict:
    """Calibrate on the first `opts.tokens` tokens of `ctx`'s data, select, and measure the rescale."""
    seq = ctx.stream.seq_length
    n = max(1, min(ctx.stream.num_samples, opts.tokens // seq))
    tokens = batch(ctx.stream, list(range(n)))[:, :-1]
    op.select(calibrate(ctx.source, tokens, ctx.progress))
    if opts.rescale:
        op.sel.scales = mlp_output_scales(ctx.source, tokens, op.sel, ctx.progress)
    return {"calibration": {"data": ctx.data, "tokens": tokens.numel(), "rescale": opts.rescale}}


@torch.no_grad()
def calibrate(source: Reader, tokens: torch.Tensor, progress: bool = False) -> CalibrationStats:
    """Run `tokens` [b, s] through the checkpoint layer by layer, collecting statistics."""
    cfg = source.config
    stats = CalibrationStats(tokens=tokens.numel())
    x, freqs = embed(source, cfg, tokens)
    modules = {}
    for i, tensors in source.layers(progress, "calibrate"):
        x = _layer_stats(_load_layer(cfg, i, tensors, modules), x, freqs, stats)
    stats.final_norm = NormSite.of(x)
    return stats


def embed(source: Reader, cfg: ModelConfig, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual stream entering layer 0 [b, s, h], and the rotary table (None without rope)."""
    embedding = Embedding(cfg)
    embedding.load_state_dict({k.removeprefix("embedding."): v.float() for k, v in source.embeddings().items()})
    freqs = rotary_freqs(cfg, tokens.shape[1]) if cfg.embedding.position == "rope" else None
    return embedding(tokens), freqs


def _load_layer(cfg: ModelConfig, index: int, tensors: dict[str, torch.Tensor],
                modules: dict[bool, TransformerLayer]) -> TransformerLayer:
    """Layer `index` with its weights, in a module reused for every layer of its kind (dense or MoE)."""
    moe = cfg.is_moe_layer(index)
    if moe not in modules:
        modules[moe] = TransformerLayer(cfg, index)
    modules[moe].load_state_dict({k: v.float() for k, v in tensors.items()})
    return modules[moe]


def _layer_stats(layer: TransformerLayer, x: torch.Tensor, freqs, stats: CalibrationStats) -> torch.Tensor:
    stats.input_norms.append(NormSite.of(x))
    heads = layer.self_attention.heads(layer.input_layernorm(x), freqs)  # [b, s, np, hn]
    stats.heads.append(heads.abs().mean(dim=(0, 1, 3)).double())
    mid = x + layer.self_attention.linear_proj(heads.flatten(2))
    stats.mlp_norms.append(NormSite.of(mid))
    normed = layer.pre_mlp_layernorm(mid)
    if isinstance(layer.mlp, MoE):
        _, _, activity = _expert_passes(layer.mlp, normed)
        stats.neurons.append(activity)
        if layer.mlp.shared_experts is not None:
            shared = layer.mlp.shared_experts.hidden(normed)
            stats.shared[len(stats.neurons) - 1] = shared.abs().mean(dim=(0, 1)).double()
        out = mid + layer.mlp(normed)
    else:
        hidden = layer.mlp.hidden(normed)
        stats.neurons.append(hidden.abs().mean(dim=(0, 1)).double())
        out = mid + layer.mlp.linear_fc2(hidden)
    change = (out - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-12)
    stats.block_change.append(change.mean().item())
    return out


@torch.no_grad()
def mlp_output_scales(source: Reader, tokens: torch.Tensor, sel: Selection, progress: bool = False) -> dict[int, float]:
    """For every kept block, the least-squares scalar that best maps the MLP without its dropped
    neurons onto the full MLP, both fed the same stream. One layer at a time, like `calibrate`."""
    cfg = source.config
    x, freqs = embed(source, cfg, tokens)
    scales, modules = {}, {}
    for i, tensors in source.layers(progress, "rescale"):
        big = _load_layer(cfg, i, tensors, modules)
        mid = x + big.self_attention(big.input_layernorm(x), freqs)
        normed = big.pre_mlp_layernorm(mid)
        mlp = big.mlp(normed)
        if i in sel.layers:
            j = sel.layers.index(i)
            if isinstance(big.mlp, MoE):  # one scale for every expert's fc2: fitted on the routed sum
                full, kept, _ = _expert_passes(big.mlp, normed, sel.neurons[j])
                scales[j] = _fit(full, kept)
            else:
                hidden = big.mlp.hidden(normed)[..., sel.neurons[j]]
                kept = F.linear(hidden, big.mlp.linear_fc2.weight[:, sel.neurons[j]])  # the dropped terms missing
                scales[j] = _fit(mlp - _bias(big.mlp.linear_fc2), kept)
        x = mid + mlp
    return scales


def _expert_passes(moe: MoE, x: torch.Tensor, neurons: torch.Tensor | None = None):
    """An MoE layer's routed output without fc2 biases, the same from only the `neurons` [E, F_T]
    each expert keeps (None: all), and E|activation| of each expert's neurons over the tokens routed
    to it [E, F] (zero for an expert no token reaches)."""
    flat = x.reshape(-1, x.shape[-1])
    weights, index = route(F.linear(flat, moe.router.weight, moe.router.bias), moe.topk, moe.pre_softmax)
    full, kept, activity = torch.zeros_like(flat), torch.zeros_like(flat), []
    for e, expert in enumerate(moe.experts.local_experts):
        token, slot = (index == e).nonzero(as_tuple=True)
        hidden = expert.hidden(flat[token])  # [tokens routed to e, F]
        activity.append(hidden.abs().mean(0) if token.numel() else hidden.new_zeros(hidden.shape[-1]))
        w, fc2 = weights[token, slot, None], expert.linear_fc2.weight
        full.index_add_(0, token, F.linear(hidden, fc2) * w)
        if neurons is not None:
            kept.index_add_(0, token, F.linear(hidden[:, neurons[e]], fc2[:, neurons[e]]) * w)
    return full, kept, torch.stack(activity).double()


def _bias(linear) -> torch.Tensor | float:
    return linear.bias if linear.bias is not None else 0.0


def _fit(target: torch.Tensor, approx: torch.Tensor) -> float:
    """The scalar s minimising ‖target − s·approx‖² (least squares): <target, approx> / <approx, approx>."""
    denom = float((approx.double() ** 2).sum())
    return float((target.double() * approx.double()).sum()) / denom if denom > 0 else 1.0
