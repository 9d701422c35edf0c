"""The reference model's multi-latent attention: megatron-core's `MLASelfAttention` (DeepSeek-V2,
arXiv 2405.04434, §2.1; the record and its names in `core/mla_config.py`).

    q      = up_q(norm_q(down_q(x)))                [b, s, heads, qk_head_dim + rope]  (or W_q x)
    c, k_r = down_kv(x)                             [b, s, kv_lora_rank], [b, s, rope]
    k, v   = up_kv(norm_kv(c))                      [b, s, heads, qk_head_dim], [..., v_head_dim]
    scores = [q_nope; rope(q_r)] · [k; rope(k_r)]   (k_r one for every head, §2.1.3)

Rope reads its channels as (even, odd) pairs, as DeepSeek's checkpoints lay them out: they are
gathered into [evens; odds] and rotated the usual way (megatron-core's `multi_latent_attention`
branch of `apply_rotary_pos_emb`, transformers' `rope_interleave`).
"""
from __future__ import annotations

import torch
from torch import nn

from scalegrow.core.config import ModelConfig
from scalegrow.core.layers.attention import Rotary, apply_rotary, attend
from scalegrow.core.layers.blocks import make_norm


def softmax_scale(cfg: ModelConfig) -> float:
    """What q·k is multiplied by: 1/√(qk_head_dim + rope), times YaRN's mscale² (DeepSeek's rule)."""
    if cfg.attention.softmax_scale is not None:
        return cfg.attention.softmax_scale
    mscale = cfg.rope.yarn.softmax_mscale() if cfg.rope.yarn is not None else 1.0
    return mscale * cfg.mla.q_head_dim ** -0.5


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """[..., (x0, x1), (x2, x3), ...] -> [..., x0, x2, ..., x1, x3, ...]: DeepSeek's rope pairs as rope's halves."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


class MLASelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, mla, heads, h = cfg, cfg.mla, cfg.attention.heads, cfg.hidden_size
        self.linear_proj = nn.Linear(cfg.proj_in, h, bias=cfg.add_bias_linear)
        if mla.q_lora_rank is None:
            self.linear_q_proj = nn.Linear(h, mla.q_rows(heads), bias=False)
        else:
            self.linear_q_down_proj = nn.Linear(h, mla.q_lora_rank, bias=False)
            self.linear_q_up_proj = nn.Linear(mla.q_lora_rank, mla.q_rows(heads), bias=False)
        self.linear_kv_down_proj = nn.Linear(h, mla.kv_down_rows, bias=False)
        self.linear_kv_up_proj = nn.Linear(mla.kv_lora_rank, mla.kv_up_rows(heads), bias=False)
        norms = cfg.attention.qk_norm  # megatron-core's qk_layernorm: the latents' norms
        self.q_layernorm = make_norm(cfg, mla.q_lora_rank) if norms and mla.q_lora_rank else nn.Identity()
        self.kv_layernorm = make_norm(cfg, mla.kv_lora_rank) if norms else nn.Identity()

    def forward(self, x: torch.Tensor, freqs: Rotary | None) -> torch.Tensor:
        return self.linear_proj(self.heads(x, freqs).flatten(2))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, heads * (qk_head_dim + rope)]"""
        if self.cfg.mla.q_lora_rank is None:
            return self.linear_q_proj(x)
        return self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))

    def heads(self, x: torch.Tensor, freqs: Rotary | None) -> torch.Tensor:
        """Each head's attention output, [b, s, heads, v_head_dim] (what linear_proj reads)."""
        mla, n = self.cfg.mla, self.cfg.attention.heads
        b, s, _ = x.shape
        q = self.query(x).view(b, s, n, mla.q_head_dim).transpose(1, 2)  # [b, n, s, qk + rope]
        q_nope, q_rope = q.split([mla.qk_head_dim, mla.qk_pos_emb_head_dim], dim=-1)
        latent, k_rope = self.linear_kv_down_proj(x).split([mla.kv_lora_rank, mla.qk_pos_emb_head_dim], dim=-1)
        kv = self.linear_kv_up_proj(self.kv_layernorm(latent)).view(b, s, n, mla.qk_head_dim + mla.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([mla.qk_head_dim, mla.v_head_dim], dim=-1)  # [b, n, s, ...]
        table, scale = freqs.of_layer(False)
        q_rope = apply_rotary(deinterleave(q_rope), table, scale)
        k_rope = apply_rotary(deinterleave(k_rope.unsqueeze(1)), table, scale).expand(b, n, s, -1)  # one for all
        q, k = torch.cat((q_nope, q_rope), dim=-1), torch.cat((k_nope, k_rope), dim=-1)
        return attend(q, k, v, None, softmax_scale(self.cfg), None).transpose(1, 2)
