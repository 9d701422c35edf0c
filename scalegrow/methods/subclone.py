"""Weight subcloning's prepare step: calibration (arXiv 2312.09299 §3), one layer at a time.

The large model runs on calibration tokens layer by layer (`methods/calibration.py`): only one
layer's weights and the calibration stream are in memory at once, on the prepare step's device. A
first pass gathers the statistics `Subclone.select` ranks by; a second measures the FFN-output rescale
of the kept neurons (§3.4, our rule; see `scalegrow.operators.subclone`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scalegrow.core import arch
from scalegrow.core.model import MoE, TransformerLayer
from scalegrow.data import batch
from scalegrow.formats.base import Reader
from scalegrow.methods.base import Context
from scalegrow.methods.calibration import Mean, Moments, spans, walk
from scalegrow.methods.options import option
from scalegrow.operators.subclone import CalibrationStats, Selection, Subclone


@dataclass(frozen=True)
class SubcloneOptions:
    """Subcloning's settings: `scalegrow shrink` flags."""

    tokens: int = option(16384, "calibration tokens", flag="--calib-tokens", minimum=1)
    rescale: bool = option(True, "rescale the kept MLP outputs (linear_fc2) for the neurons dropped beside them")


def calibration_tokens(ctx: Context, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens of the prepare data, as windows [n, s] (at least one window)."""
    n = max(1, min(ctx.stream.num_samples, tokens // ctx.stream.seq_length))
    return batch(ctx.stream, list(range(n)))[:, :-1]


def fit_selection(op: Subclone, opts: SubcloneOptions, ctx: Context) -> dict:
    """Calibrate on the first `opts.tokens` tokens of `ctx`'s data, select, and measure the rescale."""
    tokens = calibration_tokens(ctx, opts.tokens)
    op.select(calibrate(ctx.source, tokens, ctx.device, ctx.progress))
    if opts.rescale:
        op.sel.scales = mlp_output_scales(ctx.source, tokens, op.sel, ctx.device, ctx.progress)
    return {"calibration": {"data": ctx.data, "tokens": tokens.numel(), "rescale": opts.rescale}}


@dataclass
class LayerMeans:
    """One layer's statistics, summed over micro-batches (see `CalibrationStats`)."""

    input: Moments = field(default_factory=Moments)
    mlp: Moments = field(default_factory=Moments)
    gains: tuple = (None, None)  # input_layernorm's and pre_mlp_layernorm's
    heads: Mean = field(default_factory=Mean)
    neurons: Mean = field(default_factory=Mean)  # an MoE layer's: per expert, over its routed tokens
    shared: Mean | None = None
    change: Mean = field(default_factory=Mean)


@torch.no_grad()
def calibrate(source: Reader, tokens: torch.Tensor, device: torch.device = torch.device("cpu"),
              progress: bool = False) -> CalibrationStats:
    """Run `tokens` [b, s] through the checkpoint layer by layer, collecting statistics."""
    layers = [LayerMeans() for _ in range(source.config.num_layers)]
    x = walk(source, tokens, lambda i, layer, x, freqs: _layer_stats(layer, x, freqs, layers[i]), device, progress)
    final = Moments()
    for span in spans(x):
        final.add(x[span])
    norm = arch.final_norm_specs(source.config)[0]
    final_gain = source.config.norm.gain(source.tensor(norm.name, norm).double())
    return CalibrationStats(
        input_norms=[m.input.site(m.gains[0]) for m in layers], mlp_norms=[m.mlp.site(m.gains[1]) for m in layers],
        final_norm=final.site(final_gain),
        heads=[m.heads.value for m in layers], neurons=[m.neurons.value for m in layers],
        block_change=[float(m.change.value) for m in layers],
        shared={i: m.shared.value for i, m in enumerate(layers) if m.shared is not None}, tokens=tokens.numel())


def _layer_stats(layer: TransformerLayer, x: torch.Tensor, freqs, means: LayerMeans) -> torch.Tensor:
    """One micro-batch x [b, s, h] through one layer, its statistics added to `means`; the output."""
    tokens = x.shape[0] * x.shape[1]
    means.input.add(x)
    norm = layer.self_attention.cfg.norm  # the gains its two norm sites read through (none before OLMo 2's blocks)
    means.gains = tuple(norm.gain(n.weight.detach()) if norm.pre else None
                        for n in (layer.input_layernorm, layer.pre_mlp_layernorm))
    heads = layer.self_attention.heads(layer.input_layernorm(x), freqs)  # [b, s, np, hn]
    proj = layer.self_attention.linear_proj
    writes, attn = _head_writes(heads, proj.weight)
    means.heads.add(writes, tokens)
    mid = x + layer.post_self_attn_layernorm(attn if proj.bias is None else attn + proj.bias)
    means.mlp.add(mid)
    normed = layer.pre_mlp_layernorm(mid)
    if isinstance(layer.mlp, MoE):
        _, _, activity, routed = _expert_passes(layer.mlp, normed)
        means.neurons.add(activity, routed[:, None])  # each expert's over the tokens routed to it
        if layer.mlp.shared_experts is not None:
            means.shared = means.shared or Mean()
            means.shared.add(layer.mlp.shared_experts.hidden(normed).abs().sum(dim=(0, 1)), tokens)
        out = mid + layer.post_mlp_layernorm(layer.mlp(normed))
    else:
        hidden = layer.mlp.hidden(normed)
        means.neurons.add(hidden.abs().sum(dim=(0, 1)), tokens)
        out = mid + layer.post_mlp_layernorm(layer.mlp.linear_fc2(hidden))
    means.change.add(((out - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-12)).sum(), tokens)
    return out


def _head_writes(heads: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per q head, Σ over tokens of ‖W_o,h·head_h‖, what each head writes through linear_proj [np];
    and their sum, linear_proj's output without its bias [b, s, h] (one head at a time, so this costs
    what linear_proj does)."""
    hn, norms, out = heads.shape[-1], [], 0.0
    for h in range(heads.shape[2]):
        write = heads[:, :, h] @ proj[:, h * hn:(h + 1) * hn].T  # [b, s, h]
        norms.append(write.norm(dim=-1).sum())
        out = out + write
    return torch.stack(norms), out


@torch.no_grad()
def mlp_output_scales(source: Reader, tokens: torch.Tensor, sel: Selection,
                      device: torch.device = torch.device("cpu"), progress: bool = False) -> dict[int, float]:
    """For every kept block, the least-squares scalar that best maps the MLP without its dropped
    neurons onto the full MLP, both fed the same stream: s = <full, kept> / <kept, kept>, its two
    inner products summed over micro-batches. One layer at a time, like `calibrate`."""
    products = {j: [0.0, 0.0] for j in range(len(sel.layers))}

    def visit(i, layer, x, freqs):
        mid = layer.attention_residual(x, freqs)
        normed = layer.pre_mlp_layernorm(mid)
        mlp = layer.mlp(normed)
        if i in sel.layers:
            j = sel.layers.index(i)
            full, kept = _with_kept_neurons(layer, normed, mlp, sel.neurons[j])
            products[j][0] += float((full.double() * kept.double()).sum())
            products[j][1] += float((kept.double() ** 2).sum())
        return mid + layer.post_mlp_layernorm(mlp)

    walk(source, tokens, visit, device, progress, "rescale")
    return {j: num / den if den > 0 else 1.0 for j, (num, den) in products.items()}


def _with_kept_neurons(layer: TransformerLayer, normed: torch.Tensor, mlp: torch.Tensor,
                       neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the MLP's output without fc2's bias, the same from the kept `neurons` only: the dropped
    terms missing). An MoE layer's: the routed sum, each expert with its own kept neurons [E, F_T]."""
    if isinstance(layer.mlp, MoE):
        full, kept, _, _ = _expert_passes(layer.mlp, normed, neurons)
        return full, kept
    fc2 = layer.mlp.linear_fc2
    hidden = layer.mlp.hidden(normed)[..., neurons]
    bias = fc2.bias if fc2.bias is not None else 0.0
    return mlp - bias, F.linear(hidden, fc2.weight[:, neurons])


def _expert_passes(moe: MoE, x: torch.Tensor, neurons: torch.Tensor | None = None):
    """An MoE layer's routed output without fc2 biases, the same from only the `neurons` [E, F_T]
    each expert keeps (None: all), and, per expert, the sum of |activation| of its neurons over the
    tokens routed to it [E, F] and how many those were [E]."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, index = moe.router(flat)
    full, kept, activity, routed = torch.zeros_like(flat), torch.zeros_like(flat), [], []
    for e, expert in enumerate(moe.experts.local_experts):
        token, slot = (index == e).nonzero(as_tuple=True)
        hidden = expert.hidden(flat[token])  # [tokens routed to e, F]
        activity.append(hidden.abs().sum(0))
        routed.append(token.numel())
        w, fc2 = weights[token, slot, None], expert.linear_fc2.weight
        full.index_add_(0, token, F.linear(hidden, fc2) * w)
        if neurons is not None:
            kept.index_add_(0, token, F.linear(hidden[:, neurons[e]], fc2[:, neurons[e]]) * w)
    return full, kept, torch.stack(activity), torch.tensor(routed)
