"""Reference GPT in plain PyTorch with megatron-core `GPTModel` semantics (local layer spec).

State-dict names are exactly megatron-core's at TP=1, PP=1, so a Megatron checkpoint's merged `model`
dict loads here (minus `_extra_state`) and back. tests/test_parity.py pins the math to megatron-core.
Layout is [batch, seq, hidden]; megatron runs [seq, batch, hidden], which is the same arithmetic.
Its layers are in `core/layers/`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scalegrow.core.config import ModelConfig
from scalegrow.core.layers.attention import Rotary, SelfAttention, rotary_tables
from scalegrow.core.layers.blocks import MLP, make_norm
from scalegrow.core.layers.mla import MLASelfAttention
from scalegrow.core.layers.moe import MoE

__all__ = ["GPT", "Embedding", "MoE", "MLP", "Rotary", "SelfAttention", "TransformerLayer", "init_weights",
           "model_state_dict", "rotary_tables"]


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.position_embeddings = (nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
                                    if cfg.embedding.learned_positions else None)
        self.scale = cfg.hidden_size ** 0.5 if cfg.embedding.scaled else None  # Gemma's normaliser

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.scale is not None:  # in the weights' dtype, as transformers does (√640 is 25.25 in bf16)
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(tokens.shape[1], device=tokens.device))
        return x


class TransformerLayer(nn.Module):
    """Pre-LN block: x + attn(norm(x)), then + mlp(norm(x)); the mlp is an MoE in MoE layers, the
    attention within a sliding window in window layers. With post-norms (Gemma 2/3) each block's
    output is normalised again before the residual add: x + post(attn(norm(x))); OLMo 2 has only
    those: x + post(attn(x))."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        pre = (lambda: make_norm(cfg)) if cfg.norm.pre else nn.Identity  # Identity: no state-dict key
        post = (lambda: make_norm(cfg)) if cfg.norm.post else nn.Identity
        self.input_layernorm = pre()
        self.self_attention = SelfAttention(cfg, index) if cfg.mla is None else MLASelfAttention(cfg)
        self.post_self_attn_layernorm = post()
        self.pre_mlp_layernorm = pre()
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg)
        self.post_mlp_layernorm = post()

    def forward(self, x: torch.Tensor, freqs: Rotary | None) -> torch.Tensor:
        x = self.attention_residual(x, freqs)
        return x + self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(x)))

    def attention_residual(self, x: torch.Tensor, freqs: Rotary | None) -> torch.Tensor:
        """The stream after the attention block (what the MLP's norm reads)."""
        return x + self.post_self_attn_layernorm(self.self_attention(self.input_layernorm(x), freqs))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = make_norm(cfg)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg)
        self.decoder = Decoder(cfg)
        self.output_layer = (nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)
                             if not cfg.embedding.tied else None)

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm output [b, s, hidden] for token ids [b, s]."""
        x = self.embedding(tokens)
        freqs = rotary_tables(self.cfg, tokens.shape[1], tokens.device)
        for layer in self.decoder.layers:
            x = layer(x, freqs)
        return self.decoder.final_layernorm(x)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, s, padded_vocab_size]; with `labels` [b, s], the mean cross entropy instead
        (so a training engine's forward returns the loss), plus the MoE load-balancing loss times
        `moe_aux_loss_coeff` in training mode. Both parts are kept in `last_losses` for logging."""
        logits = F.linear(self.hidden_states(tokens), self.output_weight())
        if self.cfg.final_softcap is not None:  # Gemma 2: cap·tanh(logits/cap)
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        if labels is None:
            return logits
        lm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        aux = self.moe_aux_loss()
        if aux is None:
            return lm
        self.last_losses = {"lm": lm.item(), "moe_aux": aux.item()}
        return lm + self.cfg.moe.aux_loss_coeff * aux if self.training else lm

    def moe_aux_loss(self) -> torch.Tensor | None:
        """The MoE layers' load-balancing losses of the last forward, summed (None: dense)."""
        aux = [layer.mlp.aux_loss for layer in self.decoder.layers if isinstance(layer.mlp, MoE)]
        return torch.stack(aux).sum() if aux else None

    def balance_experts(self, all_reduce=None) -> None:
        """After an optimizer step: every expert-biased router's aux-loss-free update from the tokens
        its experts received since the last (summed over data-parallel ranks by `all_reduce`)."""
        for layer in self.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None and router.expert_bias is not None:
                if all_reduce is not None:
                    all_reduce(router.tokens_per_expert)
                router.update_expert_bias()

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy over token windows [b, s + 1] (+ the MoE aux loss in training)."""
        return self(tokens[:, :-1], tokens[:, 1:])


def init_weights(model: GPT, seed: int) -> None:
    """Megatron's default init: N(0, std) weights, std/sqrt(2L) on output projections, zero biases."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    out_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:  # a gain of 1: a zero-centred norm stores 0
                param.fill_(float(cfg.norm.stored(1.0)) if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                std = out_std if ("linear_proj" in name or "linear_fc2" in name) else cfg.init_method_std
                param.normal_(0.0, std, generator=gen)


def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Detached tensors under megatron-core names."""
    return {k: v.detach() for k, v in model.state_dict().items()}
