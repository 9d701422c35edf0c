"""LiGO: learning to grow pretrained models (Wang et al., ICLR 2023, arXiv 2303.00980).

The grown weights are a learned linear function of the small ones, M = L_depth · R_width (§3.1):
- Width (§3.2): every weight grows as W* = B · W · Aᵀ (a Kronecker-factored R_width), with the paper's
  tying. B_emb [D_T×D_S] is shared by the embeddings, the output layer, every norm and every block
  output (B^O = B^fc2 = B_emb); every block input reads through it (A^{Q,K,V} = A^fc1 = B_embᵀ).
  A^O = (B^V)ᵀ and A^fc2 = (B^fc1)ᵀ. Norms and biases take their output side's expansion.
  For megatron-core's GQA layout the Q/K/V maps act on *whole heads* (head dim kept, ⊗ I_hn) and keep
  query groups whole: a group map M_g moves K and V, and Q by M_g ⊗ M_h, M_h mapping the q heads within
  a group, so a group's q heads always travel with its K and V. proj's inputs (the attention output
  heads, one per q head) read through (M_g ⊗ M_h)ᵀ. Mixing whole heads commutes with rotary
  embeddings. SwiGLU's gate and up rows share the FFN map.
- Depth (§3.3): target layer i = Σ_j w_ij · (widened source layer j), one coefficient matrix
  [L_T×L_S] per module type (norm, qkv, proj, mlp norm, fc1, fc2), biases following their module.
- Initialisation (our choice, after the reference code): depth "StackBERT-noisy": one-hot at i mod L_S
  plus U(0, depth_noise), rows normalised to sum 1. Width "select": target unit j copies source unit
  j mod n (Net2Net-like) plus N(0, width_noise) to break the symmetry between copies; or "random":
  rows of N(0, 1) normalised to unit norm. With zero noise and equal sizes the operator is the identity.
Post-norms (Gemma, OLMo 2) take their block output's depth coefficients (proj's, fc2's); OLMo 2's q/k
norms over all heads map their per-head blocks by M_heads (M_g for k), as the heads move. A zero-centred
norm's gain 1 + w is what grows (w* = M(1 + w) − 1), and embeddings scaled by √D carry √(D_S/D_T)
(a tied output layer's final norm 1/√(D_S/D_T)), as LEMON's rules do, so the select start keeps the
stream's scale. The operator has O(width² + depth²) parameters, not O(model). It is trained for ~100 steps with the
LM loss through the large model computed from it (`scalegrow.methods.ligo`), then materialised into
plain weights by `LigoGrowth`. LiGO is not lossless: there is no norm correction.
"""
from __future__ import annotations

import torch
from torch import nn

from scalegrow.core import arch
from scalegrow.core.config import ModelConfig
from scalegrow.operators.base import Operator, embedding_scale, require_equal, require_not_smaller

DEPTH_TYPES = ("input_layernorm", "qkv", "proj", "pre_mlp_layernorm", "fc1", "fc2")


def module_type(name: str) -> str:
    for prefix, kind in (("input_layernorm.", "input_layernorm"), ("self_attention.linear_qkv.", "qkv"),
                         ("self_attention.q_layernorm.", "qkv"), ("self_attention.k_layernorm.", "qkv"),
                         ("self_attention.linear_proj.", "proj"), ("pre_mlp_layernorm.", "pre_mlp_layernorm"),
                         ("mlp.linear_fc1.", "fc1"), ("mlp.linear_fc2.", "fc2"),
                         ("post_self_attn_layernorm.", "proj"), ("post_mlp_layernorm.", "fc2")):
        if name.startswith(prefix):
            return kind
    raise AssertionError(name)


def _width_init(n_dst: int, n_src: int, kind: str, noise: float, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        m = torch.randn(n_dst, n_src, generator=gen)
        return m / m.norm(dim=1, keepdim=True)
    m = torch.zeros(n_dst, n_src)
    m[torch.arange(n_dst), torch.arange(n_dst) % n_src] = 1.0
    return m + noise * torch.randn(n_dst, n_src, generator=gen) if noise else m


def _depth_init(l_dst: int, l_src: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.zeros(l_dst, l_src)
    w[torch.arange(l_dst), torch.arange(l_dst) % l_src] = 1.0
    if noise:
        w = w + noise * torch.rand(l_dst, l_src, generator=gen)
    return w / w.sum(dim=1, keepdim=True)


class LigoOperator(nn.Module):
    """The learnable growth operator: width maps and per-module-type depth coefficients."""

    def __init__(self, src: ModelConfig, dst: ModelConfig, width_init: str = "select", width_noise: float = 0.01,
                 depth_noise: float = 0.03, seed: int = 0):
        super().__init__()
        self.src, self.dst = src, dst
        gen = torch.Generator().manual_seed(seed)

        def width(n_dst, n_src):
            return nn.Parameter(_width_init(n_dst, n_src, width_init, width_noise, gen))

        self.b_emb = width(dst.hidden_size, src.hidden_size)
        self.m_groups = width(dst.attention.groups, src.attention.groups)
        self.m_group_heads = width(dst.attention.per_group, src.attention.per_group)
        self.b_ffn = width(dst.mlp.ffn_hidden_size, src.mlp.ffn_hidden_size)
        self.depth = nn.ParameterDict({t: nn.Parameter(_depth_init(dst.num_layers, src.num_layers, depth_noise, gen))
                                       for t in DEPTH_TYPES})

    @staticmethod
    def expected_parameters(src: ModelConfig, dst: ModelConfig) -> int:
        return (dst.hidden_size * src.hidden_size + dst.attention.groups * src.attention.groups
                + dst.attention.per_group * src.attention.per_group + dst.mlp.ffn_hidden_size * src.mlp.ffn_hidden_size
                + len(DEPTH_TYPES) * dst.num_layers * src.num_layers)

    @property
    def m_heads(self) -> torch.Tensor:
        """The q-head map [np_T, np_S] = M_g ⊗ M_h (heads numbered group-major, as Megatron does)."""
        return torch.kron(self.m_groups, self.m_group_heads)

    # ---- width: stacked source layers [L, ...] -> [L, ...] at the target width ------------------------
    def widen(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """One layer tensor stacked over source layers, [L, *shape] -> [L, *target shape]."""
        s, e = self.src, self.b_emb
        if name.startswith(("self_attention.q_layernorm.", "self_attention.k_layernorm.")):
            if not s.attention.qk_norm_across_heads:
                return t  # over one head's dimension: heads are mixed whole, so it is kept
            units = self.m_heads if name.startswith("self_attention.q_") else self.m_groups  # OLMo 2: per head
            blocks = t.reshape(t.shape[0], units.shape[1], s.attention.head_dim)  # [L, n*hn] -> [L, n, hn]
            return torch.einsum("ts,lsk->ltk", units, blocks).flatten(1)
        if name.endswith("layernorm.weight") or name.endswith("layernorm.bias") or name.endswith(
                ("linear_proj.bias", "linear_fc2.bias")):
            return t @ e.T  # output side: B_emb
        if name.startswith("self_attention.linear_qkv."):
            return self._widen_qkv(t, weight=name.endswith("weight"))
        if name == "self_attention.linear_proj.weight":  # B_emb · W · (M_heads ⊗ I)ᵀ
            heads = t.reshape(t.shape[0], s.hidden_size, s.attention.heads, s.attention.head_dim)
            out = torch.einsum("ts,ldsk->ldtk", self.m_heads, heads).flatten(2)
            return torch.einsum("ed,ldx->lex", e, out)
        if name.startswith("mlp.linear_fc1."):  # gate and up rows share the FFN map
            halves = t.reshape(t.shape[0], 2 if s.mlp.gated else 1, s.mlp.ffn_hidden_size, *t.shape[2:])
            rows = torch.einsum("ts,lhs...->lht...", self.b_ffn, halves).flatten(1, 2)
            return rows @ e.T if name.endswith("weight") else rows
        if name == "mlp.linear_fc2.weight":  # B_emb · W · B_ffnᵀ
            return torch.einsum("ed,ldf,gf->leg", e, t, self.b_ffn)
        raise AssertionError(f"LiGO has no width rule for {name}")

    def _widen_qkv(self, t: torch.Tensor, weight: bool) -> torch.Tensor:
        s, d = self.src, self.dst
        per_s, per_d, hn = s.attention.per_group, d.attention.per_group, s.attention.head_dim
        # [L, ng*(per+2)*hn, ...] -> [L, ng, per+2, hn, ...]: q heads of each group, then k, then v
        blocks = t.reshape(t.shape[0], s.attention.groups, per_s + 2, hn, *t.shape[2:])
        q = blocks[:, :, :per_s].flatten(1, 2)  # [L, np_S, hn, ...]
        k, v = blocks[:, :, per_s], blocks[:, :, per_s + 1]  # [L, ng_S, hn, ...]
        q = torch.einsum("ts,ls...->lt...", self.m_heads, q)
        k, v = (torch.einsum("ts,ls...->lt...", self.m_groups, x) for x in (k, v))
        q = q.reshape(q.shape[0], d.attention.groups, per_d, *q.shape[2:])
        fused = torch.cat([q, k[:, :, None], v[:, :, None]], dim=2).flatten(1, 3)  # [L, rows_T, ...]
        return fused @ self.b_emb.T if weight else fused

    # ---- depth -----------------------------------------------------------------------------------------
    def mix(self, name: str, widened: torch.Tensor, layers: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_j w_ij · widened_j for target layers `layers` (default: all) -> [len(layers), ...]."""
        w = self.depth[module_type(name)]
        if layers is not None:
            w = w[layers]
        return torch.einsum("ts,s...->t...", w, widened)

    def grow_layers(self, name: str, stacked: torch.Tensor, layers: torch.Tensor | None = None) -> torch.Tensor:
        """A layer tensor stacked over source layers -> target layers `layers` (default: all)."""
        return self.stored(name, self.mix(name, self.widen(name, self.gain(name, stacked)), layers))

    def grow_global(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Embeddings, final norm and output layer through B_emb; embeddings scaled by √D carry
        c = √(D_S/D_T), and so does a tied output layer (it is the embedding), its final norm 1/c."""
        s, c = self.src, embedding_scale(self.src, self.dst)
        if name.startswith("decoder.final_layernorm."):
            return self.stored(name, self.gain(name, t) @ self.b_emb.T / (c if s.embedding.tied else 1.0))
        grown = t @ self.b_emb.T
        return grown if c == 1.0 or (name == arch.OUTPUT_LAYER and not s.embedding.tied) else grown * c

    def gain(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A zero-centred norm weight as its gain 1 + w (anything else as it is)."""
        return self.src.norm.gain(t) if name.endswith("layernorm.weight") else t

    def stored(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.dst.norm.stored(t) if name.endswith("layernorm.weight") else t

    def forward(self, small: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All large weights (reference-model names) from the small ones, differentiably."""
        s, d = self.src, self.dst
        big = {name: self.grow_global(name, small[name]) for name in (spec.name for spec in arch.embedding_specs(s))}
        for spec in arch.layer_specs(s, 0):
            stacked = torch.stack([small[arch.layer_key(i, spec.name)] for i in range(s.num_layers)])
            grown = self.grow_layers(spec.name, stacked)
            big.update({arch.layer_key(j, spec.name): grown[j] for j in range(d.num_layers)})
        head = [spec.name for spec in arch.final_norm_specs(s)] + ([] if s.embedding.tied else [arch.OUTPUT_LAYER])
        for name in head:  # final norm and (untied) output layer: B_emb
            big[name] = self.grow_global(name, small[name])
        return big


class LigoGrowth(Operator):
    """A trained LigoOperator behind the streaming executor's interface (materialisation)."""

    name = "ligo"
    entrywise = False  # its factors mix source entries

    def __init__(self, src: ModelConfig, dst: ModelConfig, seed: int = 0, operator: LigoOperator | None = None,
                 **init):
        self._operator, self._init = operator, init
        self._widened: dict[str, torch.Tensor] = {}
        super().__init__(src, dst, seed)

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        super().check(src, dst)
        require_equal(src, dst, "kv_channels", why="LiGO mixes whole heads")
        require_not_smaller(src, dst)
        if dst.num_layers != src.num_layers and len(set(src.window_pattern())) > 1:
            raise ValueError("window_attn_skip_freq: LiGO mixes every source layer into each new one, so layers "
                             "with and without the sliding window cannot keep their types; grow the depth with "
                             "lemon or stack")

    def origins(self) -> list[int]:
        """The stacking LiGO's depth maps start from; every layer has the same window when depth grows."""
        return [j % self.src.num_layers for j in range(self.dst.num_layers)]

    def setup(self) -> None:
        if self._operator is None:
            self._operator = LigoOperator(self.src, self.dst, seed=self.seed, **self._init)

    @property
    def operator(self) -> LigoOperator:
        return self._operator

    def use_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Continue with a fresh operator holding these trained weights."""
        operator = LigoOperator(self.src, self.dst, width_noise=0.0, depth_noise=0.0)
        operator.load_state_dict(state)
        self._operator, self._widened = operator, {}

    def layer_sources(self, index: int) -> tuple[int, ...]:
        return tuple(range(self.src.num_layers))  # every target layer mixes all source layers

    @torch.no_grad()
    def map_embeddings(self, tensors):
        return {k: self.operator.grow_global(k, v.float()) for k, v in tensors.items()}

    @torch.no_grad()
    def map_layer(self, index, sources):
        out, op = {}, self.operator
        for spec in self.layer_specs(index):
            if spec.name not in self._widened:  # widen each source tensor once, reuse for every target
                stacked = torch.stack([sources[i][spec.name].float() for i in range(self.src.num_layers)])
                self._widened[spec.name] = op.widen(spec.name, op.gain(spec.name, stacked))
            out[spec.name] = op.stored(spec.name, op.mix(spec.name, self._widened[spec.name], torch.tensor([index]))[0])
        return out

    @torch.no_grad()
    def map_head(self, tensors):
        return {k: self.operator.grow_global(k, v.float()) for k, v in tensors.items()}


def identity_like(src: ModelConfig) -> LigoOperator:
    """A same-size operator that reproduces the source exactly (tests, sanity)."""
    return LigoOperator(src, src, width_noise=0.0, depth_noise=0.0)

