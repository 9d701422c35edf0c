"""LEMON: lossless model expansion (Wang et al., ICLR 2024, arXiv 2310.07999).

Implemented, by section of the paper:
- §4.1 width, residual stream: average expansion x* = [x × k, mean(x)·1_r] applied once, globally, to
  embeddings, positions, every block output (proj/fc2 rows and biases) and every norm.
- §4.1 LayerNorm: γ* = √s·[γ × k, γ_r], β* = [β × k, 0_r], eps* = s·eps, s = k·D_S/D_T; the norm then
  outputs [LN(x) × k, 0_r]. RMSNorm (our derivation): zero residue instead of the mean, same γ and eps.
- §4.2 MHA/MLP width: heads (head dim kept) and FFN neurons replicated circularly; with GQA a query
  group moves with all its q heads. Fan-in weights (Q/K/V/fc1 input columns, proj/fc2 input columns,
  untied output layer) split asymmetrically: copies sum to the original, random cancelling noise.
- §4.3 depth: new blocks interleaved in the upper part of the stack, each a copy of the block below
  with zero-sum ("cancelling") output projections, so under pre-LN it is an exact identity; at most 2×
  per application, larger targets by repeating it.
- Tied output layer: the logits of [E × k, ·]·[y × k, 0] come out k× larger, so the final norm's γ, β
  carry 1/k (the reference code's `scale_for_bert`).
- Gemma's features (our derivations):
  * a zero-centred norm (gain 1 + w) follows the same rules on its gain: w* = γ* − 1;
  * post-norms (a norm on each block's output, before the residual add) read a block output, which is
    expanded like the stream, [o × k, 0_r]; the RMSNorm rule above then gives [post(o) × k, 0_r], which
    is what the stream expects, so they take the pre-norms' γ* and eps*. A new block's post-norm gains
    are 0 instead of its output projections (`identity_block`): still an exact identity;
  * q/k norms (Qwen3, Gemma 3, OLMo 2) share the model's eps, which the stream's rule makes s·eps;
    q and k rows (and biases) are scaled by √s so they keep their output exactly:
    √s·q/√(s·ms(q) + s·eps) = q/√(ms(q) + eps);
  * OLMo 2's q/k norms over all heads at once: each head's block of γ moves with its head, and
    when every head is copied equally often (query groups and q heads per group each a multiple of
    the source's) the mean square over all heads is unchanged, so the norm is too (refused otherwise);
    with no norm before a block (OLMo 2), attention and the MLP read [x × k, 0_r] through the same
    fan-in splits;
  * embeddings scaled by √D (Gemma's normaliser): the grown model multiplies by √D_T, so E* =
    √(D_S/D_T)·[E × k, 0_r] puts √D_S·[E × k, 0_r] on the stream, as before; a tied output layer then
    reads logits k·√(D_S/D_T) times too large, so the final norm carries 1/(k·√(D_S/D_T)).
- Mixture-of-Experts (our extension of §4.2-4.3): the router reads the normed stream like fc1, so its
  input columns split the same way and every logit is kept, hence the same routing and weights; each
  expert is an FFN whose neurons (moe_ffn_hidden_size) expand like the dense FFN's; a new MoE block
  zeroes every expert's fc2, so its output is zero whatever the router picks. Expert count, top-k and
  the router's softmax order stay as they are; dense and MoE layers keep their types. DeepSeek's
  routing bias only ranks experts, whose logits are kept: it is copied.
- Multi-latent attention (our derivation; the record in `core/mla_config.py`): the down projections
  read the normed stream, so their input columns split like fc1's. Heads replicate with their q and
  kv up-projection rows (q's rope part with it), linear_proj's columns split over the copies (v_head_dim
  each); the shared rope key, one for all heads, keeps its rows. A latent c of rank r widens to r'
  as the stream does, c* = √(s/s_c)·[c × k_c, 0] with k_c = r' // r and s_c = k_c·r/r': its mean
  square is then s·ms(c), so under the model's eps* = s·eps its norm gives
  c*/√(s·(ms(c) + eps)) = [ĉ × k_c, 0]/√s_c; the gain γ* = √s_c·[γ × k_c, ·] returns [γĉ × k_c, 0],
  and the up projection's columns split over the k_c copies, reading γĉ exactly. (r' = r: the
  down rows are times √s, as for Qwen3's q/k norms.) Head dims and the rope's stay the source's.
"""
from __future__ import annotations

import torch

from scalegrow.core.arch import MLA_ROLES, Role
from scalegrow.core.config import ModelConfig
from scalegrow.operators.base import (
    Operator,
    embedding_scale,
    identity_block,
    moe_features,
    require_equal,
    require_not_smaller,
    times,
)
from scalegrow.operators.maps import Noise, ResidualMap, UnitMap, seeded_generator


def depth_map(src_layers: int, dst_layers: int) -> list[tuple[int, bool]]:
    """Per target layer: (source layer it comes from, is it a new identity block).

    One application grows n -> m <= 2n: the first 2n - m layers map 1:1, then each remaining layer is
    followed by a new one. A new block after the last layer is fine: it is an identity before the final
    norm, and it copies the layer below it since there is none above.
    """
    layers = [(i, False) for i in range(src_layers)]
    while len(layers) < dst_layers:
        n = len(layers)
        m = min(2 * n, dst_layers)
        keep = 2 * n - m
        grown = layers[:keep]
        for entry in layers[keep:]:
            grown += [entry, (entry[0], True)]
        layers = grown
    return layers


def qkv_block_map(src: ModelConfig, dst: ModelConfig) -> UnitMap:
    """Map over QKV row blocks [ng, per_g + 2] (each block hn rows): target group g copies source group
    g mod ng_S with all its heads; q slot i copies slot i mod per_S; k and v slots copy k and v."""
    ps, pt = src.attention.per_group, dst.attention.per_group
    group = torch.arange(dst.attention.groups) % src.attention.groups
    slot = torch.cat([torch.arange(pt) % ps, torch.tensor([ps, ps + 1])])
    index = group[:, None] * (ps + 2) + slot[None, :]
    return UnitMap(index.flatten(), src.attention.groups * (ps + 2))


def head_map(src: ModelConfig, dst: ModelConfig) -> UnitMap:
    """Map over q heads (the proj input blocks), consistent with `qkv_block_map`."""
    ps, pt = src.attention.per_group, dst.attention.per_group
    group = torch.arange(dst.attention.groups) % src.attention.groups
    index = group[:, None] * ps + (torch.arange(pt) % ps)[None, :]
    return UnitMap(index.flatten(), src.attention.heads)


class LemonGrowth(Operator):
    name = "lemon"
    handles_moe = True
    handles_mla = True

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        for key in ("num_moe_experts", "moe_router_topk", *moe_features()):
            require_equal(src, dst, key, why="LEMON widens experts, it does not add or route them")
        super().check(src, dst)
        if src.moe:
            if bool(src.moe.shared_size) != bool(dst.moe.shared_size):
                require_equal(src, dst, "moe_shared_expert_intermediate_size", why="LEMON widens a shared expert, "
                              "it does not add or remove one")
        require_equal(src, dst, "kv_channels", why="LEMON keeps the head dimension")
        if src.mla:
            self._check_mla(src, dst)
        a, b = src.attention, dst.attention
        if a.qk_norm_across_heads and (b.groups % a.groups or b.per_group % a.per_group):
            raise ValueError(f"qk_layernorm_across_heads: one norm over all heads stays exact only when every head "
                             f"is copied equally often; make num_query_groups a multiple of {a.groups} and the q "
                             f"heads per group a multiple of {a.per_group}")
        require_not_smaller(src, dst)
        if dst.attention.per_group < src.attention.per_group:
            raise ValueError(
                f"num_query_groups: target has {dst.attention.per_group} q heads per group, fewer than the "
                f"source's {src.attention.per_group}; every source head must keep a copy")

    @staticmethod
    def _check_mla(src: ModelConfig, dst: ModelConfig) -> None:
        for key in ("qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            require_equal(src, dst, key, why="LEMON keeps every head's widths")
        if (src.mla.q_lora_rank is None) != (dst.mla.q_lora_rank is None):
            require_equal(src, dst, "q_lora_rank", why="LEMON widens a q latent, it does not add or remove one")

    def resolve(self, src: ModelConfig, dst: ModelConfig) -> ModelConfig:
        """LayerNorm/RMSNorm need eps* = s·eps for the expanded stream to normalise exactly."""
        self.check(src, dst)
        s = ResidualMap(src.hidden_size, dst.hidden_size, True).s
        return dst.replace(norm_epsilon=src.norm.eps * s)

    def setup(self) -> None:
        src, dst = self.src, self.dst
        self.stream = ResidualMap(src.hidden_size, dst.hidden_size, mean_fill=src.norm.kind == "LayerNorm")
        self.blocks = qkv_block_map(src, dst)
        self.heads = head_map(src, dst)
        self.groups = UnitMap.circular(src.attention.groups, dst.attention.groups)
        self.neurons = UnitMap.circular(src.mlp.ffn_hidden_size, dst.mlp.ffn_hidden_size)
        if src.moe:  # every expert's neurons expand alike
            self.expert_neurons = UnitMap.circular(src.moe.ffn_hidden_size, dst.moe.ffn_hidden_size)
        if src.moe and src.moe.shared_size:
            self.shared_neurons = UnitMap.circular(src.moe.shared_size,
                                                   dst.moe.shared_size)
        if src.mla:  # the latents widen as the stream does (see the module docstring)
            self.kv_latent = ResidualMap(src.mla.kv_lora_rank, dst.mla.kv_lora_rank, mean_fill=False)
            if src.mla.q_lora_rank:
                self.q_latent = ResidualMap(src.mla.q_lora_rank, dst.mla.q_lora_rank, mean_fill=False)
        self.depth_map = depth_map(src.num_layers, dst.num_layers)
        self.std = dst.init_method_std

    # ---- which source layer ------------------------------------------------------------------
    def layer_sources(self, index: int) -> tuple[int, ...]:
        return (self.depth_map[index][0],)

    # ---- tensors -----------------------------------------------------------------------------
    def map_embeddings(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = embedding_scale(self.src, self.dst)
        return {name: times(self.stream.expand(t.float(), dim=1), c) for name, t in tensors.items()}

    def map_layer(self, index: int, sources: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        src_layer, is_new = self.depth_map[index]
        tensors = {name: t.float() for name, t in sources[src_layer].items()}
        if is_new:  # §4.3 (output projections zero, cancelling once split), or post-norm gains zero
            tensors = identity_block(self.src, src_layer, tensors)
        return {spec.name: self._grow(spec.role, spec.name, tensors[spec.name], index)
                for spec in self.layer_specs(index)}

    def map_head(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        c = embedding_scale(self.src, self.dst)
        tied_scale = 1.0 / (self.stream.k * c) if self.src.embedding.tied else 1.0
        for name, t in tensors.items():
            t = t.float()
            if name.endswith("final_layernorm.weight"):
                out[name] = self._norm_weight(t, tied_scale)
            elif name.endswith("final_layernorm.bias"):
                out[name] = self._norm_bias(t) * tied_scale
            elif self.src.embedding.tied:  # word embeddings, stored as output_layer on the last stage
                out[name] = times(self.stream.expand(t, dim=1), c)
            else:
                out[name] = self.stream.split_fanin(t, 1, self._noise("output_layer"))
        return out

    # ---- per role ----------------------------------------------------------------------------
    def _noise(self, *names: object) -> Noise:
        return Noise(self.seed, seeded_generator(self.seed, *names), self.std)

    def _norm_weight(self, weight: torch.Tensor, scale: float = 1.0, over: ResidualMap | None = None) -> torch.Tensor:
        """γ* = √s·[γ × k, mean(γ)] (times `scale`), on a zero-centred norm's gain 1 + w; `over` an MLA
        latent instead of the stream: √s_c·[γ × k_c, mean(γ)]."""
        over = over or self.stream
        gamma = self.src.norm.gain(weight)
        grown = (over.s ** 0.5 * scale) * over.copies.expand(gamma, 0, gamma.mean())
        return self.dst.norm.stored(grown)

    def _norm_bias(self, beta: torch.Tensor) -> torch.Tensor:
        return self.stream.copies.expand(beta, 0)  # residue 0

    def _grow(self, role: str, name: str, t: torch.Tensor, index: int) -> torch.Tensor:
        noise = self._noise(index, name)
        if role in MLA_ROLES:
            return self._grow_mla(role, t, noise)
        hn = self.src.mla.v_head_dim if self.src.mla else self.src.attention.head_dim  # linear_proj's per head
        if role in (Role.NORM_WEIGHT, Role.POST_NORM_WEIGHT):
            return self._norm_weight(t)
        if role == Role.NORM_BIAS:
            return self._norm_bias(t)
        if role == Role.OUT_BIAS:
            return self.stream.expand(t, 0)
        if role in (Role.QK_NORM_WEIGHT, Role.QK_NORM_BIAS):  # over one head's dimension, which is kept
            return t
        if role in (Role.Q_NORM_ALL_WEIGHT, Role.K_NORM_ALL_WEIGHT):  # [n*hn] -> [n, hn]: blocks move with heads
            units = self.heads if role == Role.Q_NORM_ALL_WEIGHT else self.groups
            return units.expand(t.reshape(units.n_src, hn), 0).flatten()
        if role in (Role.QKV_WEIGHT, Role.QKV_BIAS):
            # [ng*(per+2)*hn, ...] -> [ng*(per+2), hn, ...]: replicate whole row blocks
            blocks = self._qk_scaled(t).reshape(self.blocks.n_src, hn, *t.shape[1:])
            rows = self.blocks.expand(blocks, 0).flatten(0, 1)
            return rows if role == Role.QKV_BIAS else self.stream.split_fanin(rows, 1, noise)
        if role == Role.PROJ_WEIGHT:
            rows = self.stream.expand(t, 0)  # [D_T, np_S*hn]
            heads = rows.reshape(rows.shape[0], self.heads.n_src, hn)  # [D_T, np_S, hn]
            return self.heads.split_fanin(heads, 1, noise).flatten(1)
        if role in FC1_ROLES:
            neurons = self._neurons(role)
            halves = t.reshape(2 if self.src.mlp.gated else 1, neurons.n_src, *t.shape[1:])
            rows = neurons.expand(halves, 1).flatten(0, 1)  # gate and up rows move together
            return rows if role in (Role.FC1_BIAS, Role.EXPERT_FC1_BIAS) else self.stream.split_fanin(rows, 1, noise)
        if role in (Role.FC2_WEIGHT, Role.EXPERT_FC2_WEIGHT, Role.SHARED_FC2_WEIGHT):
            return self._neurons(role).split_fanin(self.stream.expand(t, 0), 1, noise)
        if role in (Role.ROUTER_WEIGHT, Role.SHARED_GATE_WEIGHT):  # [E or 1, D_S] read the normed stream, as
            return self.stream.split_fanin(t, 1, noise)  # fc1 does: logits kept
        if role in (Role.ROUTER_BIAS, Role.ROUTER_EXPERT_BIAS):  # per expert: logits and scores kept
            return t
        raise AssertionError(f"LEMON has no rule for role {role!r} ({name})")

    def _grow_mla(self, role: str, t: torch.Tensor, noise: Noise) -> torch.Tensor:
        """Multi-latent attention's tensors (see the module docstring)."""
        mla = self.src.mla
        if role == Role.Q_LATENT_NORM_WEIGHT:
            return self._norm_weight(t, over=self.q_latent)
        if role == Role.KV_LATENT_NORM_WEIGHT:
            return self._norm_weight(t, over=self.kv_latent)
        if role == Role.MLA_Q_DOWN_WEIGHT:
            return self.stream.split_fanin(self._latent_rows(t, self.q_latent), 1, noise)
        if role == Role.MLA_KV_DOWN_WEIGHT:
            latent, rope = t.split([mla.kv_lora_rank, mla.qk_pos_emb_head_dim], dim=0)  # [kv latent; shared rope key]
            rows = torch.cat([self._latent_rows(latent, self.kv_latent), rope], dim=0)
            return self.stream.split_fanin(rows, 1, noise)
        # the per-head projections: q from the stream (no q latent), or q/kv up from their latents
        per_head, reads = {Role.MLA_Q_WEIGHT: (mla.q_head_dim, self.stream),
                           Role.MLA_Q_UP_WEIGHT: (mla.q_head_dim, getattr(self, "q_latent", None)),
                           Role.MLA_KV_UP_WEIGHT: (mla.qk_head_dim + mla.v_head_dim, self.kv_latent)}[role]
        # [heads * per_head, in] -> [heads, per_head, in]: a head's rows move together
        rows = self.heads.expand(t.reshape(self.heads.n_src, per_head, -1), 0).flatten(0, 1)
        return reads.split_fanin(rows, 1, noise)

    def _latent_rows(self, t: torch.Tensor, latent: ResidualMap) -> torch.Tensor:
        """A down projection's latent rows, √(s/s_c)·[W × k_c, 0]: the latent's mean square becomes s times
        its own, which the norm's eps* = s·eps keeps exact."""
        return (self.stream.s / latent.s) ** 0.5 * latent.expand(t, 0)

    def _qk_scaled(self, t: torch.Tensor) -> torch.Tensor:
        """QKV rows with q and k times √s where q/k norms follow (see the module docstring)."""
        a = self.src.attention
        if not a.qk_norm or self.stream.s == 1.0:
            return t
        groups = t.reshape(a.groups, a.per_group + 2, -1).clone()  # [ng, per + 2, hn * ...]
        groups[:, :a.per_group + 1] *= self.stream.s ** 0.5  # q heads and k; v as it is
        return groups.reshape(t.shape)

    def _neurons(self, role: str) -> UnitMap:
        """The FFN's neuron map, the experts' (shared by all) or the shared expert's."""
        if role in (Role.SHARED_FC1_WEIGHT, Role.SHARED_FC2_WEIGHT):
            return self.shared_neurons
        return self.neurons if role in (Role.FC1_WEIGHT, Role.FC1_BIAS, Role.FC2_WEIGHT) else self.expert_neurons


FC1_ROLES = (Role.FC1_WEIGHT, Role.FC1_BIAS, Role.EXPERT_FC1_WEIGHT, Role.EXPERT_FC1_BIAS, Role.SHARED_FC1_WEIGHT)
