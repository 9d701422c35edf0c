"""Reference GPT in plain PyTorch with megatron-core `GPTModel` semantics (local layer spec).

State-dict names are exactly megatron-core's at TP=1, PP=1, so a Megatron checkpoint's merged `model`
dict loads here (minus `_extra_state`) and back. tests/test_parity.py pins the math to megatron-core.
Layout is [batch, seq, hidden]; megatron runs [seq, batch, hidden], which is the same arithmetic.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from scalegrow.core.config import ModelConfig
from scalegrow.core.rope import attention_factor
from scalegrow.core.rope import rotary_freqs as rope_angles
from scalegrow.core.rope_config import Rope

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
    full = rope_angles(cfg.rope, cfg.attention.head_dim, seq_len, device)
    local = cfg.rope.local_base
    window = None if local is None else rope_angles(Rope(base=local, percent=cfg.rope.percent),
                                                    cfg.attention.head_dim, seq_len, device)
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


def route(logits: torch.Tensor, topk: int, pre_softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's softmax top-k routing: (weights, expert indices), each [tokens, topk]. The
    softmax runs over the k chosen logits (weights sum to 1), or over all experts first."""
    if pre_softmax:
        return torch.softmax(logits.float(), dim=-1).type_as(logits).topk(topk, dim=-1)
    top, index = logits.topk(topk, dim=-1)
    return torch.softmax(top.float(), dim=-1).type_as(logits), index


def load_balancing_loss(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """megatron-core's switch load-balancing loss (before its coefficient): E / (k·T²) ·
    Σ_e (Σ_t p_te)·n_e, with p the softmax over all experts and n_e the tokens routed to expert e.
    It is 1 when routing is uniform and grows as tokens crowd onto few experts."""
    tokens, experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    counts = torch.bincount(index.flatten(), minlength=experts).to(probs.dtype)
    return (probs.sum(0) * counts).sum() * experts / (index.shape[1] * tokens * tokens)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.moe.num_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.empty(cfg.moe.num_experts)) if cfg.add_bias_linear else None


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.local_experts = nn.ModuleList(MLP(cfg, cfg.moe.ffn_hidden_size) for _ in range(cfg.moe.num_experts))


class SharedExpert(MLP):
    """megatron-core's SharedExpertMLP: an FFN every token passes through, its output optionally
    times sigmoid(x · gate_weight)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.moe.shared_size)
        self.gate_weight = nn.Parameter(torch.empty(1, cfg.hidden_size)) if cfg.moe.shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.gate_weight is None else out * torch.sigmoid(F.linear(x, self.gate_weight))


class MoE(nn.Module):
    """megatron-core's MoELayer with SequentialMLP experts: each token goes to its top-k experts, and
    their outputs (fc2 bias included) are summed with the routing weights, plus the shared expert's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.pre_softmax = cfg.moe.topk, cfg.moe.pre_softmax
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = SharedExpert(cfg) if cfg.moe.shared_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [b*s, h]
        logits = F.linear(flat, self.router.weight, self.router.bias)
        weights, index = route(logits, self.topk, self.pre_softmax)
        self.aux_loss = load_balancing_loss(logits, index)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts.local_experts):
            token, slot = (index == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view_as(x) + (self.shared_experts(x) if self.shared_experts is not None else 0)


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
        self.self_attention = SelfAttention(cfg, index)
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
