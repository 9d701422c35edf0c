"""Reference GPT in plain PyTorch with megatron-core `GPTModel` semantics (local layer spec).

State-dict names are exactly megatron-core's at TP=1, PP=1, so a Megatron checkpoint's merged `model`
dict loads here (minus `_extra_state`) and back. tests/test_parity.py pins the math to megatron-core.
Layout is [batch, seq, hidden]; megatron runs [seq, batch, hidden], which is the same arithmetic.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from scalegrow.core.config import ModelConfig
from scalegrow.core.rope import attention_factor
from scalegrow.core.rope import rotary_freqs as rope_angles

# Megatron-LM's activations: --swiglu gates SiLU, --openai-gelu is GELU's tanh approximation
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "silu": F.silu}


def make_norm(cfg: ModelConfig, size: int | None = None) -> nn.Module:
    """The model's norm over `size` features (default: the hidden size)."""
    size = cfg.hidden_size if size is None else size
    if cfg.norm.kind == "RMSNorm":
        return nn.RMSNorm(size, eps=cfg.norm.eps)
    return nn.LayerNorm(size, eps=cfg.norm.eps)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.position_embeddings = (nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
                                    if cfg.embedding.learned_positions else None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(tokens.shape[1], device=tokens.device))
        return x


def rotary_freqs(cfg: ModelConfig, seq_len: int, device=None) -> torch.Tensor:
    """Megatron's RotaryEmbedding (non-interleaved): [seq, rot_dim] angles, cat(freqs, freqs)."""
    return rope_angles(cfg.rope, cfg.attention.head_dim, seq_len, device)


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
        # megatron-core's qk_layernorm: one norm over each head's dimension, shared by all heads
        self.q_layernorm = make_norm(cfg, attn.head_dim) if attn.qk_norm else None
        self.k_layernorm = make_norm(cfg, attn.head_dim) if attn.qk_norm else None

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        return self.linear_proj(self.heads(x, freqs).flatten(2))

    def heads(self, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
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
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if freqs is not None:
            scale = attention_factor(cfg.rope)
            q, k = apply_rotary(q, freqs, scale), apply_rotary(k, freqs, scale)
        # GQA: group g serves the per_g consecutive q heads g*per_g .. g*per_g+per_g-1
        k = k.repeat_interleave(per_g, dim=1)
        v = v.repeat_interleave(per_g, dim=1)
        if self.window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hn))
        else:
            mask = window_mask(s, self.window, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(hn))
        return out.transpose(1, 2)


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
    attention within a sliding window in window layers."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attention = SelfAttention(cfg, index)
        self.pre_mlp_layernorm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), freqs)
        return x + self.mlp(self.pre_mlp_layernorm(x))


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
        freqs = (rotary_freqs(self.cfg, tokens.shape[1], tokens.device)
                 if self.cfg.embedding.position == "rope" else None)
        for layer in self.decoder.layers:
            x = layer(x, freqs)
        return self.decoder.final_layernorm(x)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, s, padded_vocab_size]; with `labels` [b, s], the mean cross entropy instead
        (so a training engine's forward returns the loss), plus the MoE load-balancing loss times
        `moe_aux_loss_coeff` in training mode. Both parts are kept in `last_losses` for logging."""
        logits = F.linear(self.hidden_states(tokens), self.output_weight())
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
            if "layernorm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                std = out_std if ("linear_proj" in name or "linear_fc2" in name) else cfg.init_method_std
                param.normal_(0.0, std, generator=gen)


def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Detached tensors under megatron-core names."""
    return {k: v.detach() for k, v in model.state_dict().items()}
