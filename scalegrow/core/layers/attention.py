"""The reference model's self-attention: megatron-core's `SelfAttention` with its fused QKV in query
groups, rope (and a local rope on sliding-window layers), q/k norms, windows and soft-capping."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from scalegrow.core.config import ModelConfig
from scalegrow.core.layers.blocks import make_norm
from scalegrow.core.rope import attention_factor
from scalegrow.core.rope import rotary_freqs as rope_angles
from scalegrow.core.rope_config import Rope


class Rotary(NamedTuple):
    """Angle tables [seq, rot_dim] (megatron-core's RotaryEmbedding, non-interleaved: cat(freqs, freqs)):
    the model's rope, and the sliding-window layers' (Gemma 3's plain rope at its local base)."""

    full: torch.Tensor
    window: torch.Tensor | None  # None: the windowed layers use the model's rope too
    scale: float  # YaRN's attention factor on the model's rope (the local rope is plain)

    def of_layer(self, windowed: bool) -> tuple[torch.Tensor, float]:
        """(angles, cos/sin scale) of a layer."""
        return (self.window, 1.0) if windowed and self.window is not None else (self.full, self.scale)


def rotary_tables(cfg: ModelConfig, seq_len: int, device=None) -> Rotary | None:
    """The rotary tables of `cfg` over `seq_len` positions (None: learned positions, no rope)."""
    if cfg.embedding.position != "rope":
        return None
    dim = cfg.mla.qk_pos_emb_head_dim if cfg.mla else cfg.attention.head_dim  # MLA: rope's own channels
    full = rope_angles(cfg.rope, dim, seq_len, device)
    local = cfg.rope.local_base
    window = None if local is None else rope_angles(Rope(base=local, percent=cfg.rope.percent), dim, seq_len, device)
    return Rotary(full, window, attention_factor(cfg.rope))


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """t: [b, heads, s, hn]; rotates the first rot_dim channels (cos and sin times `scale`, YaRN's
    attention factor), passes the rest through."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = freqs.cos() * scale, freqs.sin() * scale
    t_rot = t_rot * cos.to(t.dtype) + rotated * sin.to(t.dtype)
    return torch.cat((t_rot, t_pass), dim=-1)


def window_mask(seq: int, left: int, device=None) -> torch.Tensor:
    """[seq, seq] True where query i may attend key j: j in [i - left, i] (megatron-core's sliding
    window (left, 0); transformers' sliding_window is left + 1)."""
    i = torch.arange(seq, device=device)
    offset = i[:, None] - i[None, :]  # i - j
    return (offset >= 0) & (offset <= left)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.cfg = cfg
        self.window = cfg.attention.window[0] if cfg.attention.windowed(index) else None  # keys before a query
        h, attn = cfg.hidden_size, cfg.attention
        self.linear_qkv = nn.Linear(h, attn.qkv_rows, bias=cfg.has_qkv_bias)
        self.linear_proj = nn.Linear(attn.proj_in, h, bias=cfg.add_bias_linear)
        # megatron-core's qk_layernorm: one norm over each head's dimension, shared by all heads; or
        # (OLMo 2) one over all q heads' dimensions together and one over all k's
        across = attn.qk_norm_across_heads
        self.q_layernorm = make_norm(cfg, attn.head_dim * (attn.heads if across else 1)) if attn.qk_norm else None
        self.k_layernorm = make_norm(cfg, attn.head_dim * (attn.groups if across else 1)) if attn.qk_norm else None

    def forward(self, x: torch.Tensor, freqs: Rotary | None) -> torch.Tensor:
        return self.linear_proj(self.heads(x, freqs).flatten(2))

    def _qk_norms(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.attention.qk_norm_across_heads:
            return _across(self.q_layernorm, q), _across(self.k_layernorm, k)
        return self.q_layernorm(q), self.k_layernorm(k)

    def heads(self, x: torch.Tensor, freqs: Rotary | None) -> torch.Tensor:
        """Each q head's attention output, [b, s, np, hn] (what linear_proj reads)."""
        cfg = self.cfg
        b, s, _ = x.shape
        ng, per_g, hn = cfg.attention.groups, cfg.attention.per_group, cfg.attention.head_dim
        # [b, s, ng*(per_g+2)*hn] -> [b, s, ng, per_g+2, hn]: each group's q heads, then k, then v
        qkv = self.linear_qkv(x).view(b, s, ng, per_g + 2, hn)
        q = qkv[:, :, :, :per_g].reshape(b, s, ng * per_g, hn).transpose(1, 2)  # [b, np, s, hn]
        k = qkv[:, :, :, per_g].transpose(1, 2)  # [b, ng, s, hn]
        v = qkv[:, :, :, per_g + 1].transpose(1, 2)
        if self.q_layernorm is not None:  # before rope, as megatron-core (and Qwen3) do
            q, k = self._qk_norms(q, k)
        if freqs is not None:
            table, scale = freqs.of_layer(self.window is not None)
            q, k = apply_rotary(q, table, scale), apply_rotary(k, table, scale)
        # GQA: group g serves the per_g consecutive q heads g*per_g .. g*per_g+per_g-1
        k = k.repeat_interleave(per_g, dim=1)
        v = v.repeat_interleave(per_g, dim=1)
        mask = window_mask(s, self.window, x.device) if self.window is not None else None
        return attend(q, k, v, mask, cfg.attention.scale, cfg.attention.softcap).transpose(1, 2)


def _across(norm: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """`norm` over every head of t [b, heads, s, hn] at once (heads in order, as HF's projections)."""
    b, n, s, hn = t.shape
    return norm(t.transpose(1, 2).reshape(b, s, n * hn)).view(b, s, n, hn).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           softcap: float | None) -> torch.Tensor:
    """Causal attention [b, np, s, hn] (within `mask` [s, s] where given); scores soft-capped to
    cap·tanh(scores/cap) first when `softcap` is set (Gemma 2), which the fused kernel cannot do."""
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    s = q.shape[-2]
    allowed = mask if mask is not None else torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).type_as(q), v)
