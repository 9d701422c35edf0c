"""Multi-head latent attention's record (DeepSeek-V2, arXiv 2405.04434, §2.1): `ModelConfig.mla`,
None for the usual attention. Its fields are megatron-core's `MLATransformerConfig` names.

Each layer compresses the stream into a KV latent of `kv_lora_rank` channels (and, with
`q_lora_rank`, a query latent), normalises the latents (`qk_layernorm`: q_layernorm, kv_layernorm),
and expands them per head into a no-rope part of `qk_head_dim` channels for q and k, and v of
`v_head_dim`; rope ("decoupled", §2.1.3) acts on `qk_pos_emb_head_dim` more channels: every q head's
own, and one key part shared by all heads, projected from the stream beside the KV latent. Heads are
`Attention.heads` (no query groups). The rope's channels are taken in even/odd pairs (DeepSeek's
layout: transformers' `rope_interleave`, what megatron-core's MLA rotates), and YaRN's mscale enters
the softmax scale, mscale(factor, mscale_all_dim)² / √(qk_head_dim + qk_pos_emb_head_dim).
"""
from __future__ import annotations

from dataclasses import dataclass

from scalegrow.core.features import FEATURE, SIZE, Record, megatron, positive


@dataclass(frozen=True)
class MLA(Record):
    q_lora_rank: int | None = megatron("q_lora_rank", None, SIZE)  # None: q projected from the stream (V2-Lite)
    kv_lora_rank: int = megatron("kv_lora_rank", 512, SIZE)
    qk_head_dim: int = megatron("qk_head_dim", 128, SIZE)  # q and k channels per head without rope
    qk_pos_emb_head_dim: int = megatron("qk_pos_emb_head_dim", 64, FEATURE)  # ... and with rope
    v_head_dim: int = megatron("v_head_dim", 128, SIZE)

    @classmethod
    def flat_keys(cls):
        return {**super().flat_keys(), "multi_latent_attention": (bool, FEATURE)}

    def to_flat(self):
        return {**super().to_flat(), "multi_latent_attention": True}

    @classmethod
    def absent_flat(cls):
        """What a model without MLA spells for these keys."""
        return {**{key: None for key in super().flat_keys()}, "multi_latent_attention": False}

    @property
    def q_head_dim(self) -> int:
        return self.qk_head_dim + self.qk_pos_emb_head_dim

    def q_rows(self, heads: int) -> int:
        """Rows of linear_q_up_proj (linear_q_proj without a q latent): [heads, qk_head_dim + rope] flattened."""
        return heads * self.q_head_dim

    def kv_up_rows(self, heads: int) -> int:
        """Rows of linear_kv_up_proj: [heads, qk_head_dim + v_head_dim] flattened."""
        return heads * (self.qk_head_dim + self.v_head_dim)

    @property
    def kv_down_rows(self) -> int:
        """Rows of linear_kv_down_proj: [kv latent; the shared rope key]."""
        return self.kv_lora_rank + self.qk_pos_emb_head_dim

    def validate(self) -> None:
        if self.q_lora_rank is not None:
            positive("q_lora_rank", self.q_lora_rank)
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            positive(name, getattr(self, name))
        if self.qk_pos_emb_head_dim % 2:
            raise ValueError(f"qk_pos_emb_head_dim: rope turns channel pairs, got {self.qk_pos_emb_head_dim}")
