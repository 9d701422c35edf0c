"""Shrinking: weight subcloning (Samragh et al., arXiv 2312.09299) and a drop-layers baseline.

Weight subcloning initialises a smaller transformer from a larger trained one:
- §3.1 residual dimensions: importance = mean |activation| over calibration tokens; the large ones are
  consistent across layers, so ONE global ranking selects the kept dimensions everywhere (embeddings,
  every norm, every block input and output, the output layer).
- §3.2 heads and FFN neurons: ranked per layer by the magnitude of their outputs. With GQA whole KV
  groups are kept (ranked by the sum of their q heads) together with their best q heads; SwiGLU's
  gate and up rows go together.
- §3.3 depth: remove the blocks that change their input least, ‖block(x) − x‖ / ‖x‖, from the middle
  of the network (never the first or the last block).
- §3.4 rescaling (our rule, measured against none in tests/test_shrink.py and docs/RESULTS.md): an
  FFN's output is a sum over its neurons, so dropping neurons removes additive terms and shrinks it.
  A second calibration pass scales each kept `linear_fc2` (weight, not bias) by the least-squares
  factor s = <full, kept> / <kept, kept>, where `kept` is the MLP output from the kept neurons only and
  `full` the original (bias excluded), both on the same stream. With no neuron dropped s = 1 exactly.
  Rules we measured and rejected, each hurting in some shape: γ·√(D/D′), γ·RMS_kept/RMS_all on the
  norms, and output-norm or least-squares scalars on whole narrowed blocks, attention or the logits.
`DropLayers` is the unranked baseline: every k-th layer, the first dimensions/heads/neurons, no rescale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scalegrow.config import ModelConfig
from scalegrow.growth.base import GrowthOperator, require_equal
from scalegrow.growth.calibrate import CalibrationStats, mlp_output_scales

SHRINK_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


@dataclass
class Selection:
    """What a shrink keeps, in source indices (sorted, so kept units keep their order)."""

    layers: list[int]  # kept source layers, one per target layer
    dims: torch.Tensor  # kept residual dimensions [D_T]
    groups: list[torch.Tensor]  # per target layer: kept query groups [ng_T]
    heads: list[torch.Tensor]  # per target layer: kept q heads within each kept group [ng_T, per_T]
    neurons: list[torch.Tensor]  # per target layer: kept FFN neurons [F_T]
    # rescale: {target layer: MLP output scale}
    scales: dict | None = None


class SliceOperator(GrowthOperator):
    """Keeps a `Selection` of the source: every weight is a slice (shrinking needs no arithmetic)."""

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        super().check(src, dst)
        require_equal(src, dst, "kv_channels", why="heads are kept whole")
        for key in SHRINK_KEYS:
            if getattr(dst, key) > getattr(src, key):
                raise ValueError(f"{key}: target {getattr(dst, key)} is larger than source {getattr(src, key)}; "
                                 f"shrink only shrinks (use `scalegrow grow`)")
        if dst.heads_per_group > src.heads_per_group:
            raise ValueError(f"num_attention_heads: target has {dst.heads_per_group} q heads per group, more "
                             f"than the source's {src.heads_per_group}")

    def select(self) -> Selection:
        raise NotImplementedError

    def setup(self) -> None:
        self.sel = self.select()

    def layer_sources(self, index: int) -> tuple[int, ...]:
        return (self.sel.layers[index],)

    def grow_embeddings(self, tensors):
        return {k: v[:, self.sel.dims] for k, v in tensors.items()}

    def grow_head(self, tensors):
        return {name: t[self.sel.dims] if "final_layernorm" in name else t[:, self.sel.dims]
                for name, t in tensors.items()}

    def grow_layer(self, index, sources, specs):
        t = sources[self.sel.layers[index]]
        mlp = (self.sel.scales or {}).get(index, 1.0)
        out = {spec.name: self._slice(spec.role, spec.name, t, index) for spec in specs}
        if mlp != 1.0:
            out["mlp.linear_fc2.weight"] = out["mlp.linear_fc2.weight"] * mlp
        return out

    def _slice(self, role: str, name: str, tensors: dict, j: int) -> torch.Tensor:
        s, sel, t = self.src, self.sel, tensors[name]
        dims, groups, heads, neurons = sel.dims, sel.groups[j], sel.heads[j], sel.neurons[j]
        if role in ("norm_weight", "norm_bias", "out_bias"):
            return t[dims]
        per, hn = s.heads_per_group, s.kv_channels
        if role in ("qkv_weight", "qkv_bias"):
            # [ng*(per+2)*hn, ...] -> [ng, per+2, hn, ...]: keep groups, their chosen q heads, k and v
            blocks = t.reshape(s.num_query_groups, per + 2, hn, *t.shape[1:])[groups]
            slots = torch.cat([heads, torch.tensor([per, per + 1]).expand(len(groups), 2)], dim=1)
            rows = torch.stack([blocks[g, slots[g]] for g in range(len(groups))]).flatten(0, 2)
            return rows[:, dims] if role == "qkv_weight" else rows
        if role == "proj_weight":
            q_heads = (groups[:, None] * per + heads).flatten()  # global q-head indices, group-major
            cols = t.reshape(t.shape[0], s.num_attention_heads, hn)[:, q_heads].flatten(1)
            return cols[dims]
        if role in ("fc1_weight", "fc1_bias"):
            halves = t.reshape(2 if s.swiglu else 1, s.ffn_hidden_size, *t.shape[1:])[:, neurons].flatten(0, 1)
            return halves[:, dims] if role == "fc1_weight" else halves
        if role == "fc2_weight":
            return t[dims][:, neurons]
        raise AssertionError(f"no slicing rule for {role!r} ({name})")


class DropLayers(SliceOperator):
    """Baseline: keep every k-th layer and the first dimensions, groups, heads and neurons."""

    name = "drop-layers"

    def select(self) -> Selection:
        s, d = self.src, self.dst
        layers = [i * s.num_layers // d.num_layers for i in range(d.num_layers)]
        first = [torch.arange(n) for n in (d.num_query_groups, d.ffn_hidden_size)]
        heads = torch.arange(d.heads_per_group).expand(d.num_query_groups, -1)
        return Selection(layers, torch.arange(d.hidden_size), [first[0]] * d.num_layers,
                         [heads] * d.num_layers, [first[1]] * d.num_layers)


class Subclone(SliceOperator):
    """Weight subcloning from calibration statistics (see the module docstring)."""

    name = "subclone"

    def __init__(self, src: ModelConfig, dst: ModelConfig, seed: int = 0, stats: CalibrationStats | None = None):
        if stats is None:
            raise ValueError("subclone needs calibration statistics")
        self.stats = stats
        super().__init__(src, dst, seed)

    def select(self) -> Selection:
        s, d, st = self.src, self.dst, self.stats
        layers = keep_layers(st.block_change, d.num_layers)
        dims = top(st.residual_importance(), d.hidden_size)
        groups, heads, neurons = [], [], []
        for i in layers:
            per_head = st.heads[i].reshape(s.num_query_groups, s.heads_per_group)
            g = top(per_head.sum(1), d.num_query_groups)
            groups.append(g)
            heads.append(torch.stack([top(per_head[k], d.heads_per_group) for k in g.tolist()]))
            neurons.append(top(st.neurons[i], d.ffn_hidden_size))
        return Selection(layers, dims, groups, heads, neurons)

    def fit_rescale(self, reader, tokens: torch.Tensor) -> None:
        """Measure and apply the MLP-output rescale (a second calibration pass)."""
        self.sel.scales = mlp_output_scales(reader, self.src, tokens, self)


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
