"""Shrinking: weight subcloning (Samragh et al., arXiv 2312.09299) and a drop-layers baseline.

Weight subcloning initialises a smaller transformer from a larger trained one:
- §3.1 residual dimensions: the large ones are consistent across layers, so ONE global ranking selects
  the kept dimensions everywhere (embeddings, every norm, every block input and output, the output
  layer). A dimension's importance (our refinement of the paper's mean |activation|) is what the
  norms reading the stream pass on from it: |γ_d|·RMS(x_d)/RMS(x) at each norm site, averaged over
  the sites. Weighting by the gains matters where a few dimensions carry huge values that their
  norms' gains almost cancel (Gemma 3 270M at half width: 7.6 nats on held-out English against 12.5
  from |activation| alone; docs/BENCHMARKS.md).
- §3.2 heads and FFN neurons: ranked per layer by the magnitude of their outputs: a head's is what it
  writes through linear_proj, E‖W_o,h·head_h‖ (its raw output ignores W_o's scale). With GQA whole KV
  groups are kept (ranked by the sum of their q heads) together with their best q heads; SwiGLU's
  gate and up rows go together. In an MoE layer each expert ranks its own neurons over the tokens
  routed to it (our extension), and the router keeps the kept dimensions' columns.
- §3.3 depth: remove the blocks that change their input least, ‖block(x) − x‖ / ‖x‖, from the middle
  of the network (never the first or the last block); a kept block keeps its type, dense or MoE.
- §3.4 rescaling (our rule, measured against none in tests/test_shrink.py and docs/RESULTS.md): an
  FFN's output is a sum over its neurons, so dropping neurons removes additive terms and shrinks it.
  A second calibration pass scales each kept `linear_fc2` (weight, not bias; in an MoE layer every
  expert's, fitted on the routed sum) by the least-squares
  factor s = <full, kept> / <kept, kept>, where `kept` is the MLP output from the kept neurons only and
  `full` the original (bias excluded), both on the same stream. With no neuron dropped s = 1 exactly.
  Rules we measured and rejected, each hurting in some shape: γ·√(D/D′), γ·RMS_kept/RMS_all on the
  norms, and output-norm or least-squares scalars on whole narrowed blocks, attention or the logits.
- Embeddings scaled by √D (Gemma): the target multiplies by √D′, so kept embedding columns carry
  √(D/D′) and the stream keeps its values on the kept dimensions; a tied output layer then reads
  √(D/D′) larger logits, which the final norm's gain takes back. Post-norms keep their kept gains.
`DropLayers` is the unranked baseline: every k-th layer, the first dimensions/heads/neurons, no rescale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scalegrow.core import arch
from scalegrow.core.arch import MLA_ROLES, Role
from scalegrow.core.config import ModelConfig
from scalegrow.operators.base import (
    Operator,
    embedding_scale,
    moe_features,
    require_equal,
    require_not_larger,
    times,
)


@dataclass
class Selection:
    """What a shrink keeps, in source indices (sorted, so kept units keep their order)."""

    layers: list[int]  # kept source layers, one per target layer
    dims: torch.Tensor  # kept residual dimensions [D_T]
    groups: list[torch.Tensor]  # per target layer: kept query groups [ng_T]
    heads: list[torch.Tensor]  # per target layer: kept q heads within each kept group [ng_T, per_T]
    neurons: list[torch.Tensor]  # per target layer: kept FFN neurons [F_T]; an MoE layer's per expert [E, F_T]
    # rescale: {target layer: MLP output scale}
    scales: dict | None = None
    shared: dict[int, torch.Tensor] = field(default_factory=dict)  # target MoE layer: kept shared-expert neurons


@dataclass
class NormSite:
    """Per-dimension moments of one norm's input (the residual stream there), over calibration tokens."""

    mean: torch.Tensor  # E[x_d]
    mean_sq: torch.Tensor  # E[x_d²]
    mean_abs: torch.Tensor  # E[|x_d|]
    gain: torch.Tensor | None = None  # the norm's gain there, per dimension (None: 1)

    @classmethod
    def of(cls, x: torch.Tensor, gain: torch.Tensor | None = None) -> "NormSite":
        flat = x.reshape(-1, x.shape[-1]).double()
        return cls(flat.mean(0), (flat ** 2).mean(0), flat.abs().mean(0), gain)

    def output_rms(self) -> torch.Tensor:
        """Per dimension, the RMS of what the norm outputs: |γ_d|·RMS(x_d)/RMS(x)."""
        rms = self.mean_sq.sqrt() / self.mean_sq.mean().sqrt().clamp(min=1e-30)
        return rms if self.gain is None else rms * self.gain.double().abs().cpu()


@dataclass
class CalibrationStats:
    """What subcloning ranks by (§3): magnitudes of residual dimensions, heads and FFN neurons, and
    how much each block changes its input (gathered by `scalegrow.methods.subclone.calibrate`)."""

    input_norms: list[NormSite] = field(default_factory=list)  # per layer: input_layernorm's input
    mlp_norms: list[NormSite] = field(default_factory=list)  # per layer: pre_mlp_layernorm's input
    final_norm: NormSite | None = None
    heads: list[torch.Tensor] = field(default_factory=list)  # per layer: E‖W_o,h·head_h‖ per q head [np]
    neurons: list[torch.Tensor] = field(default_factory=list)  # per layer: E|activation| per neuron [F] ([E, F])
    block_change: list[float] = field(default_factory=list)  # per layer: E ‖block(x) − x‖ / ‖x‖
    shared: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer: E|activation| of the shared expert
    tokens: int = 0

    def residual_importance(self) -> torch.Tensor:
        """One global ranking of residual dimensions: the RMS of every norm's output, averaged over the sites."""
        sites = self.input_norms + self.mlp_norms + [self.final_norm]
        return torch.stack([s.output_rms() for s in sites]).mean(0)


FC2_WEIGHTS = (Role.FC2_WEIGHT, Role.EXPERT_FC2_WEIGHT, Role.SHARED_FC2_WEIGHT)
FC1_BIASES = (Role.FC1_BIAS, Role.EXPERT_FC1_BIAS)
FFN_ROLES = FC2_WEIGHTS + FC1_BIASES + (Role.FC1_WEIGHT, Role.EXPERT_FC1_WEIGHT, Role.SHARED_FC1_WEIGHT)


class SliceOperator(Operator):
    """Keeps a `Selection` of the source: every weight is a slice (shrinking needs no arithmetic).
    MoE layers: the router keeps the kept dimensions' columns, every expert its own best neurons;
    experts themselves are pruned by `prune-experts`, so count, top-k and softmax order stay.
    Multi-latent attention keeps its best heads (each its own group) and its latents whole."""

    handles_moe = True
    handles_mla = True

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        for key in ("num_moe_experts", "moe_router_topk", *moe_features()):
            require_equal(src, dst, key, why="shrink prunes experts with --method prune-experts")
        super().check(src, dst)
        require_equal(src, dst, "kv_channels", why="heads are kept whole")
        for key in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if src.mla:
                require_equal(src, dst, key, why="multi-latent attention's heads and latents are kept whole")
        require_not_larger(src, dst)
        if dst.attention.per_group > src.attention.per_group:
            raise ValueError(f"num_attention_heads: target has {dst.attention.per_group} q heads per group, more "
                             f"than the source's {src.attention.per_group}")

    sel: Selection | None = None

    def details(self) -> dict:
        out = {"kept_layers": self.sel.layers}
        if self.sel.scales is not None:
            out["mlp_output_scales"] = {str(k): v for k, v in self.sel.scales.items()}
        return out

    def origins(self) -> list[int] | None:
        return None if self.sel is None else list(self.sel.layers)

    def layer_sources(self, index: int) -> tuple[int, ...]:
        assert self.sel is not None, f"{self.name}: no selection yet (its prepare step has not run)"
        return (self.sel.layers[index],)

    def map_embeddings(self, tensors):
        c = embedding_scale(self.src, self.dst)
        return {k: times(v[:, self.sel.dims], c) for k, v in tensors.items()}

    def map_head(self, tensors):
        c = embedding_scale(self.src, self.dst) if self.src.embedding.tied else 1.0  # tied logits: c times larger
        norm, out = self.src.norm, {}
        for name, t in tensors.items():
            if name.endswith("final_layernorm.weight"):
                kept = t[self.sel.dims]
                out[name] = kept if c == 1.0 else norm.stored(norm.gain(kept) / c)
            elif name.endswith("final_layernorm.bias"):
                out[name] = times(t[self.sel.dims], 1.0 / c)
            else:
                out[name] = times(t[:, self.sel.dims], c)
        return out

    def map_layer(self, index, sources):
        t = sources[self.sel.layers[index]]
        mlp = (self.sel.scales or {}).get(index, 1.0)
        out = {spec.name: self._slice(spec.role, spec.name, t, index) for spec in self.layer_specs(index)}
        if mlp != 1.0:  # the FFN's fc2, or every routed expert's
            out.update({k: v * mlp for k, v in out.items() if k.startswith(("mlp.linear_fc2", arch.EXPERTS))
                        and k.endswith("linear_fc2.weight")})
        return out

    def _slice(self, role: str, name: str, tensors: dict, j: int) -> torch.Tensor:
        s, sel, t = self.src, self.sel, tensors[name]
        dims, groups, heads = sel.dims, sel.groups[j], sel.heads[j]
        if role in (Role.NORM_WEIGHT, Role.NORM_BIAS, Role.OUT_BIAS, Role.POST_NORM_WEIGHT):
            return t[dims]
        if role in (Role.QK_NORM_WEIGHT, Role.QK_NORM_BIAS):  # heads are kept whole
            return t
        per, hn = s.attention.per_group, s.mla.v_head_dim if s.mla else s.attention.head_dim  # linear_proj's
        q_heads = (groups[:, None] * per + heads).flatten()  # global q-head indices, group-major
        if role in MLA_ROLES:
            return self._slice_mla(role, t, dims, q_heads)
        if role == Role.Q_NORM_ALL_WEIGHT:  # [np*hn] -> [np, hn]: the kept heads' blocks
            return t.reshape(s.attention.heads, hn)[q_heads].flatten()
        if role == Role.K_NORM_ALL_WEIGHT:
            return t.reshape(s.attention.groups, hn)[groups].flatten()
        if role in (Role.QKV_WEIGHT, Role.QKV_BIAS):
            # [ng*(per+2)*hn, ...] -> [ng, per+2, hn, ...]: keep groups, their chosen q heads, k and v
            blocks = t.reshape(s.attention.groups, per + 2, hn, *t.shape[1:])[groups]
            slots = torch.cat([heads, torch.tensor([per, per + 1]).expand(len(groups), 2)], dim=1)
            rows = torch.stack([blocks[g, slots[g]] for g in range(len(groups))]).flatten(0, 2)
            return rows[:, dims] if role == Role.QKV_WEIGHT else rows
        if role == Role.PROJ_WEIGHT:
            cols = t.reshape(t.shape[0], s.attention.heads, hn)[:, q_heads].flatten(1)
            return cols[dims]
        if role in FFN_ROLES:  # the dense FFN, a routed expert or the shared expert
            size, kept = self._ffn_neurons(role, name, j)
            if role in FC2_WEIGHTS:
                return t[dims][:, kept]
            # fc1 rows [gate; up] (SwiGLU) -> [2, F, ...]: keep each half's kept neurons, together
            halves = t.reshape(2 if s.mlp.gated else 1, size, *t.shape[1:])[:, kept].flatten(0, 1)
            return halves if role in FC1_BIASES else halves[:, dims]
        if role in (Role.ROUTER_WEIGHT, Role.SHARED_GATE_WEIGHT):  # [E or 1, h]: read the kept dimensions
            return t[:, dims]
        if role in (Role.ROUTER_BIAS, Role.ROUTER_EXPERT_BIAS):  # per expert: the experts stay
            return t
        raise AssertionError(f"no slicing rule for {role!r} ({name})")

    def _slice_mla(self, role: str, t: torch.Tensor, dims: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Multi-latent attention: the down projections read the kept dimensions, the up projections'
        rows are the kept heads'; the latents (and their norms) are kept whole."""
        mla, n = self.src.mla, self.src.attention.heads
        if role in (Role.MLA_Q_DOWN_WEIGHT, Role.MLA_KV_DOWN_WEIGHT):
            return t[:, dims]
        if role in (Role.Q_LATENT_NORM_WEIGHT, Role.KV_LATENT_NORM_WEIGHT):
            return t
        per_head = mla.qk_head_dim + mla.v_head_dim if role == Role.MLA_KV_UP_WEIGHT else mla.q_head_dim
        rows = t.reshape(n, per_head, t.shape[1])[heads].flatten(0, 1)  # [n * per_head, in] -> kept heads'
        return rows[:, dims] if role == Role.MLA_Q_WEIGHT else rows

    def _ffn_neurons(self, role: str, name: str, j: int) -> tuple[int, torch.Tensor]:
        """(source neuron count, kept neurons) of the FFN a tensor of target layer `j` belongs to."""
        s, sel = self.src, self.sel
        if role in (Role.EXPERT_FC1_WEIGHT, Role.EXPERT_FC1_BIAS, Role.EXPERT_FC2_WEIGHT):
            return s.moe.ffn_hidden_size, sel.neurons[j][arch.expert_of(name)[0]]  # this expert's own
        if role in (Role.SHARED_FC1_WEIGHT, Role.SHARED_FC2_WEIGHT):
            return s.moe.shared_size, sel.shared[j]
        return s.mlp.ffn_hidden_size, sel.neurons[j]


class DropLayers(SliceOperator):
    """Baseline: keep every k-th layer and the first dimensions, groups, heads and neurons."""

    name = "drop-layers"

    def setup(self) -> None:
        s, d = self.src, self.dst
        layers = [i * s.num_layers // d.num_layers for i in range(d.num_layers)]
        heads = torch.arange(d.attention.per_group).expand(d.attention.groups, -1)
        neurons = [torch.arange(d.moe.ffn_hidden_size).expand(d.moe.num_experts, -1) if s.is_moe_layer(i)
                   else torch.arange(d.mlp.ffn_hidden_size) for i in layers]  # each kept layer keeps its type
        self.sel = Selection(layers, torch.arange(d.hidden_size), [torch.arange(d.attention.groups)] * d.num_layers,
                             [heads] * d.num_layers, neurons)
        if d.moe and d.moe.shared_size:
            self.sel.shared = {j: torch.arange(d.moe.shared_size) for j, i in enumerate(layers) if s.is_moe_layer(i)}


class Subclone(SliceOperator):
    """Weight subcloning: the selection comes from calibration statistics (`select`), the FFN
    rescale from a second calibration pass (`sel.scales`); see the module docstring."""

    name = "subclone"

    def select(self, stats: CalibrationStats) -> None:
        s, d, st = self.src, self.dst, stats
        layers = keep_layers(st.block_change, d.num_layers)
        dims = top(st.residual_importance(), d.hidden_size)
        groups, heads, neurons = [], [], []
        for i in layers:
            per_head = st.heads[i].reshape(s.attention.groups, s.attention.per_group)
            g = top(per_head.sum(1), d.attention.groups)
            groups.append(g)
            heads.append(torch.stack([top(per_head[k], d.attention.per_group) for k in g.tolist()]))
            if s.is_moe_layer(i):  # [E, F]: each expert keeps its own most active neurons
                neurons.append(torch.stack([top(row, d.moe.ffn_hidden_size) for row in st.neurons[i]]))
            else:
                neurons.append(top(st.neurons[i], d.mlp.ffn_hidden_size))
        self.sel = Selection(layers, dims, groups, heads, neurons)
        self.keep_layer_types()
        self.sel.shared = {j: top(st.shared[i], d.moe.shared_size)
                           for j, i in enumerate(layers) if i in st.shared}


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order."""
    return torch.sort(torch.topk(scores, k).indices).values


def keep_layers(change: list[float], n_keep: int) -> list[int]:
    """Drop the blocks that change their input least, first and last block always kept."""
    n = len(change)
    if n_keep >= n:
        return list(range(n))
    middle = sorted(range(1, n - 1), key=lambda i: (change[i], abs(i - (n - 1) / 2)))
    dropped = set(middle[: n - n_keep])
    if len(dropped) < n - n_keep:
        raise ValueError(f"num_layers: cannot keep {n_keep} of {n} layers without dropping the first or last")
    return [i for i in range(n) if i not in dropped]
