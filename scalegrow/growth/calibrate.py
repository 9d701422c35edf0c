"""Calibration statistics for weight subcloning, gathered one layer at a time.

The large model runs on calibration tokens layer by layer: only one layer's weights (read from any
checkpoint reader) and the activations of the calibration batch are in memory at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scalegrow.config import ModelConfig
from scalegrow.model import Embedding, TransformerLayer, rotary_freqs


@dataclass
class NormSite:
    """Per-dimension moments of one norm's input (the residual stream there), over calibration tokens."""

    mean: torch.Tensor  # E[x_d]
    mean_sq: torch.Tensor  # E[x_d²]
    mean_abs: torch.Tensor  # E[|x_d|]

    @classmethod
    def of(cls, x: torch.Tensor) -> "NormSite":
        flat = x.reshape(-1, x.shape[-1]).double()
        return cls(flat.mean(0), (flat ** 2).mean(0), flat.abs().mean(0))


@dataclass
class CalibrationStats:
    """What subcloning ranks by (arXiv 2312.09299 §3): magnitudes of residual dimensions, heads and
    FFN neurons, and how much each block changes its input."""

    input_norms: list[NormSite] = field(default_factory=list)  # per layer: input_layernorm's input
    mlp_norms: list[NormSite] = field(default_factory=list)  # per layer: pre_mlp_layernorm's input
    final_norm: NormSite | None = None
    heads: list[torch.Tensor] = field(default_factory=list)  # per layer: E|head output| per q head [np]
    neurons: list[torch.Tensor] = field(default_factory=list)  # per layer: E|activation| per neuron [F]
    block_change: list[float] = field(default_factory=list)  # per layer: E ‖block(x) − x‖ / ‖x‖
    tokens: int = 0

    def residual_importance(self) -> torch.Tensor:
        """One global ranking of residual dimensions: E|x_d| averaged over every norm site."""
        sites = self.input_norms + self.mlp_norms + [self.final_norm]
        return torch.stack([s.mean_abs for s in sites]).mean(0)


@torch.no_grad()
def calibrate(reader, cfg: ModelConfig, tokens: torch.Tensor) -> CalibrationStats:
    """Run `tokens` [b, s] through the checkpoint `reader` layer by layer, collecting statistics."""
    stats = CalibrationStats(tokens=tokens.numel())
    x, freqs = _embed(reader, cfg, tokens)
    layer = TransformerLayer(cfg)
    for i in range(cfg.num_layers):
        layer.load_state_dict({k: v.float() for k, v in reader.layer(i).items()})
        x = _layer_stats(layer, x, freqs, stats)
    stats.final_norm = NormSite.of(x)
    reader.release()
    return stats


def _embed(reader, cfg: ModelConfig, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual stream entering layer 0 [b, s, h], and the rotary table (None without rope)."""
    embedding = Embedding(cfg)
    embedding.load_state_dict({k.removeprefix("embedding."): v.float() for k, v in reader.embeddings().items()})
    freqs = rotary_freqs(cfg, tokens.shape[1]) if cfg.position_embedding_type == "rope" else None
    return embedding(tokens), freqs


def _layer_stats(layer: TransformerLayer, x: torch.Tensor, freqs, stats: CalibrationStats) -> torch.Tensor:
    stats.input_norms.append(NormSite.of(x))
    heads = layer.self_attention.heads(layer.input_layernorm(x), freqs)  # [b, s, np, hn]
    stats.heads.append(heads.abs().mean(dim=(0, 1, 3)).double())
    mid = x + layer.self_attention.linear_proj(heads.flatten(2))
    stats.mlp_norms.append(NormSite.of(mid))
    hidden = layer.mlp.hidden(layer.pre_mlp_layernorm(mid))
    stats.neurons.append(hidden.abs().mean(dim=(0, 1)).double())
    out = mid + layer.mlp.linear_fc2(hidden)
    change = (out - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-12)
    stats.block_change.append(change.mean().item())
    return out


@torch.no_grad()
def mlp_output_scales(reader, cfg: ModelConfig, tokens: torch.Tensor, op) -> dict[int, float]:
    """Second pass for subcloning's rescale: for every kept block, the least-squares scalar that best
    maps the MLP without its dropped neurons onto the full MLP, both fed the same stream. One layer at
    a time, like `calibrate`."""
    x, freqs = _embed(reader, cfg, tokens)
    big = TransformerLayer(cfg)
    scales = {}
    for i in range(cfg.num_layers):
        tensors = {k: v.float() for k, v in reader.layer(i).items()}
        big.load_state_dict(tensors)
        mid = x + big.self_attention(big.input_layernorm(x), freqs)
        mlp = big.mlp(big.pre_mlp_layernorm(mid))
        if i in op.sel.layers:
            j = op.sel.layers.index(i)
            hidden = big.mlp.hidden(big.pre_mlp_layernorm(mid))[..., op.sel.neurons[j]]
            kept = F.linear(hidden, big.mlp.linear_fc2.weight[:, op.sel.neurons[j]])  # the dropped terms missing
            scales[j] = _fit(mlp - _bias(big.mlp.linear_fc2), kept)
        x = mid + mlp
    reader.release()
    return scales


def _bias(linear) -> torch.Tensor | float:
    return linear.bias if linear.bias is not None else 0.0


def _fit(target: torch.Tensor, approx: torch.Tensor) -> float:
    """The scalar s minimising ‖target − s·approx‖² (least squares): <target, approx> / <approx, approx>."""
    denom = float((approx.double() ** 2).sum())
    return float((target.double() * approx.double()).sum()) / denom if denom > 0 else 1.0
