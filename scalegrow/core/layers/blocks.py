"""The reference model's norms and FFN (megatron-core's local spec: `WrappedTorchNorm`, `MLP`)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from scalegrow.core.config import ModelConfig

# Megatron-LM's activations: --swiglu gates SiLU, --openai-gelu is GELU's tanh approximation
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "silu": F.silu}


def make_norm(cfg: ModelConfig, size: int | None = None) -> nn.Module:
    """The model's norm over `size` features (default: the hidden size)."""
    size = cfg.hidden_size if size is None else size
    if cfg.norm.zero_centered:
        return ZeroCenteredNorm(cfg.norm.kind, size, cfg.norm.eps)
    if cfg.norm.kind == "RMSNorm":
        return nn.RMSNorm(size, eps=cfg.norm.eps)
    return nn.LayerNorm(size, eps=cfg.norm.eps)


class ZeroCenteredNorm(nn.Module):
    """A norm that scales by 1 + weight (stored zero-centred: Megatron-LM's --apply-layernorm-1p,
    Gemma's RMSNorm), computed in fp32 and cast back, as transformers' Gemma does."""

    def __init__(self, kind: str, size: int, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.zeros(size))
        self.bias = nn.Parameter(torch.zeros(size)) if kind == "LayerNorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.kind == "RMSNorm":
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            h = F.layer_norm(h, h.shape[-1:], eps=self.eps)
        h = h * (1.0 + self.weight.float())
        return (h if self.bias is None else h + self.bias.float()).type_as(x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_hidden_size: int | None = None):
        super().__init__()
        ffn = ffn_hidden_size or cfg.mlp.ffn_hidden_size  # an MoE expert's is moe_ffn_hidden_size
        self.gated, self.act = cfg.mlp.gated, ACTIVATIONS[cfg.mlp.activation]
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.mlp.rows(ffn), bias=cfg.add_bias_linear)
        self.linear_fc2 = nn.Linear(ffn, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN neurons' activations, [b, s, ffn_hidden_size] (what linear_fc2 reads)."""
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = torch.chunk(h, 2, dim=-1)  # fc1 rows are [gate; up]
            return self.act(gate) * up
        return self.act(h)
