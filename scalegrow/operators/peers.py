"""Peer growth methods, the baselines of the growth-savings comparison (docs/METHODS.md).

- `stack`: StackBERT / progressive stacking (Gong et al., ICML 2019, "Efficient training of BERT by
  progressively stacking", §3): depth only; target layer j copies source layer j mod L. Not lossless.
  With a layer map it is depth up-scaling as SOLAR (Kim et al., arXiv 2312.15166, §2.1) and
  mergekit's passthrough slices write it: target layer j copies source layer order[j] (SOLAR:
  0-23,8-31 of a 32-layer model). With `zero_copies` every repeat of a source layer after its first
  has zero linear_proj and linear_fc2 (weights and biases), llama-pro's identity block (with
  post-norms, Gemma's, zero post-norm gains instead: `operators.base.identity_block`), so a map
  that lists every layer first in order computes the source's function exactly.
- `llama-pro`: block expansion (Wu et al., ACL 2024, arXiv 2401.02415, §3.1): depth only; after each of
  P = L'−L even groups of layers, a copy of the group's last layer whose linear_proj and linear_fc2
  (weights and biases) are zero, an exact identity under pre-LN. Lossless.
- `hypercloning`: HyperCloning (Samragh et al., arXiv 2409.12903, §3): integer width multiples;
  every weight W.repeat(n, n)/n, norms repeated (a repeated vector has the same mean and RMS), query
  groups cloned with their heads, the output layer divided by n and untied. Lossless, symmetric.
- `bert2bert-aki`: bert2BERT's advanced knowledge initialisation (Chen et al., ACL 2022,
  arXiv 2110.07143, §3.3): units copied as in function-preserving init (fan-out divided among the
  copies), but the *new* copies' fan-in rows come from the next layer (the top layer uses itself),
  which breaks symmetry and is not lossless; depth by stacking as in the paper's two-stage recipe.
"""
from __future__ import annotations

import torch

from scalegrow.core.arch import Role
from scalegrow.core.config import ModelConfig
from scalegrow.operators.base import Operator, both_sizes, identity_block, require_equal, require_not_smaller
from scalegrow.operators.lemon import LemonGrowth, head_map, qkv_block_map
from scalegrow.operators.maps import Noise, UnitMap

class _DepthOnly(Operator):
    """Depth only: target layer j is a copy of source layer `depth_map[j][0]`, an identity block
    where `depth_map[j][1]` (set by `setup`)."""

    depth_map: list[tuple[int, bool]]

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        super().check(src, dst)
        for key in src.sizes():
            if key != "num_layers":
                require_equal(src, dst, key, why=f"{self.name} grows depth only")
        require_not_smaller(src, dst, ("num_layers",))

    def map_embeddings(self, tensors):
        return dict(tensors)

    def map_head(self, tensors):
        return dict(tensors)

    def layer_sources(self, index: int) -> tuple[int, ...]:
        return (self.depth_map[index][0],)

    def map_layer(self, index, sources):
        """A copy of the source layer; an identity block (zero output projections) where the depth
        map says so: under pre-LN the residual stream passes it unchanged."""
        src, zero = self.depth_map[index]
        out = {spec.name: sources[src][spec.name] for spec in self.layer_specs(index)}
        return identity_block(self.dst, index, out) if zero else out


class Stack(_DepthOnly):
    name = "stack"

    def __init__(self, src: ModelConfig, dst: ModelConfig, seed: int = 0, order: tuple[int, ...] | None = None,
                 zero_copies: bool = False):
        self.order, self.zero_copies = order, zero_copies
        super().__init__(src, dst, seed)

    def resolve(self, src: ModelConfig, dst: ModelConfig) -> ModelConfig:
        """A layer map sets the depth: a target that keeps the source's depth takes the map's length."""
        if self.order is not None:
            check_order(self.order, src.num_layers, self.zero_copies)
            if dst.num_layers not in (src.num_layers, len(self.order)):
                raise ValueError(f"num_layers: target {dst.num_layers}, but the layer map lists {len(self.order)} "
                                 f"layers (leave num_layers out of the target, or make them agree)")
            dst = dst.replace(num_layers=len(self.order))
        elif self.zero_copies:
            raise ValueError("zero_copies: needs a layer map (which repeats are identities)")
        return super().resolve(src, dst)

    def setup(self) -> None:
        order = self.order or tuple(j % self.src.num_layers for j in range(self.dst.num_layers))
        seen: set[int] = set()
        self.depth_map = []  # per target layer: (source layer, starts as an identity block)
        for i in order:
            self.depth_map.append((i, self.zero_copies and i in seen))
            seen.add(i)

    def details(self) -> dict:
        return {"layers": [i for i, _ in self.depth_map],
                "identity_layers": [j for j, (_, zero) in enumerate(self.depth_map) if zero]}


def check_order(order: tuple[int, ...], n: int, zero_copies: bool) -> None:
    """Every index a source layer; with zero copies, every layer listed and first met in order."""
    bad = [i for i in order if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers: {bad[0]} is not a layer of the source (0-{n - 1})")
    firsts = list(dict.fromkeys(order))
    if zero_copies and firsts != list(range(n)):
        raise ValueError(f"layers: zero copies keep the function only when every source layer is listed and first "
                         f"met in order 0-{n - 1} (first met here: {_ranges(firsts)})")


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (how --layers spells a map)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


class LlamaPro(_DepthOnly):
    name = "llama-pro"

    def setup(self) -> None:
        n, added = self.src.num_layers, self.dst.num_layers - self.src.num_layers
        after = [-(-(g + 1) * n // added) - 1 for g in range(added)]  # last layer of each of the P groups
        self.depth_map = []  # per target layer: (source layer, is a new identity block)
        for i in range(n):
            self.depth_map += [(i, False)] + [(i, True)] * after.count(i)


class HyperCloning(LemonGrowth):
    """LEMON's maps with integer multiples only, an equal split (no noise), no residue (so no norm or
    eps correction) and an untied output layer divided by n."""

    name = "hypercloning"

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        super().check(src, dst.replace(untie_embeddings_and_output_weights=not src.embedding.tied))
        require_equal(src, dst, "num_layers", why="HyperCloning grows width only")
        for key, mine, theirs in both_sizes(src, dst):
            if theirs % mine:
                raise ValueError(f"{key}: target {theirs} is not an integer multiple of source {mine} (HyperCloning "
                                 f"clones whole copies)")
        if dst.embedding.tied and dst.hidden_size != src.hidden_size:
            raise ValueError("untie_embeddings_and_output_weights: HyperCloning unties the output layer "
                             "(it is divided by n); set it to true")

    def resolve(self, src: ModelConfig, dst: ModelConfig) -> ModelConfig:
        if src.embedding.tied and dst.hidden_size != src.hidden_size:
            dst = dst.replace(untie_embeddings_and_output_weights=True)
        self.check(src, dst)
        return dst  # no residue: variance ratio s = 1, norms and eps unchanged

    def setup(self) -> None:
        super().setup()
        self.std = 0.0  # W/n exactly: clones stay identical until training moves them

    def map_head(self, tensors):
        out = {}
        for name, t in tensors.items():
            t = t.float()
            if "final_layernorm" in name:
                out[name] = self.stream.expand(t, 0)  # repeated: same mean and RMS
            else:  # output layer, untied: [E or W] repeated over the copies / n
                out[name] = self.stream.split_fanin(t, 1, self._noise("output_layer"))
        return out

    def _norm_weight(self, gamma):
        return self.stream.expand(gamma, 0)


class Bert2BertAKI(Operator):
    name = "bert2bert-aki"

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        super().check(src, dst)
        require_equal(src, dst, "kv_channels", why="heads are copied whole")
        require_not_smaller(src, dst)
        if dst.attention.per_group < src.attention.per_group:
            raise ValueError("num_query_groups: every source head needs a copy")

    def setup(self) -> None:
        s, d = self.src, self.dst
        self.hidden = UnitMap.circular(s.hidden_size, d.hidden_size)
        self.blocks, self.heads = qkv_block_map(s, d), head_map(s, d)
        self.groups = UnitMap.circular(s.attention.groups, d.attention.groups)
        self.neurons = UnitMap.circular(s.mlp.ffn_hidden_size, d.mlp.ffn_hidden_size)
        self.equal = Noise(self.seed, torch.Generator(), 0.0)  # FPI: fan-out divided equally

    def layer_sources(self, index: int) -> tuple[int, ...]:
        i = index % self.src.num_layers
        return (i, min(i + 1, self.src.num_layers - 1))

    def map_embeddings(self, tensors):
        return {k: self.hidden.expand(v.float(), 1) for k, v in tensors.items()}

    def map_head(self, tensors):
        out = {}
        for name, t in tensors.items():
            t = t.float()
            if "final_layernorm" in name:
                out[name] = self.hidden.expand(t, 0)
            elif self.src.embedding.tied:
                out[name] = self.hidden.expand(t, 1)
            else:
                out[name] = self.hidden.split_fanin(t, 1, self.equal)
        return out

    def map_layer(self, index, sources):
        here, nxt = (sources[i] for i in self.layer_sources(index))
        return {spec.name: self._grow(spec.role, here[spec.name].float(), nxt[spec.name].float())
                for spec in self.layer_specs(index)}

    def _aki(self, units: UnitMap, here: torch.Tensor, nxt: torch.Tensor, dim: int) -> torch.Tensor:
        """Copies of each unit: the first from this layer, the later ones from the next layer."""
        seen, new = set(), []
        for u in units.index.tolist():
            new.append(u in seen)
            seen.add(u)
        is_new = torch.tensor(new).view(-1, *[1] * (here.dim() - 1))
        first, later = units.expand(here, dim).movedim(dim, 0), units.expand(nxt, dim).movedim(dim, 0)
        return torch.where(is_new, later, first).movedim(0, dim)

    def _grow(self, role: str, t: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        s, hn = self.src, self.src.attention.head_dim
        if role in (Role.NORM_WEIGHT, Role.NORM_BIAS, Role.OUT_BIAS, Role.POST_NORM_WEIGHT):
            return self.hidden.expand(t, 0)
        if role in (Role.QK_NORM_WEIGHT, Role.QK_NORM_BIAS):  # heads are copied whole
            return t
        if role in (Role.Q_NORM_ALL_WEIGHT, Role.K_NORM_ALL_WEIGHT):  # blocks copied with their heads
            units = self.heads if role == Role.Q_NORM_ALL_WEIGHT else self.groups
            return units.expand(t.reshape(units.n_src, hn), 0).flatten()
        if role in (Role.QKV_WEIGHT, Role.QKV_BIAS):
            blocks = [x.reshape(self.blocks.n_src, hn, *x.shape[1:]) for x in (t, nxt)]
            rows = self._aki(self.blocks, blocks[0], blocks[1], 0).flatten(0, 1)
            return self.hidden.split_fanin(rows, 1, self.equal) if role == Role.QKV_WEIGHT else rows
        if role == Role.PROJ_WEIGHT:
            heads = self.hidden.expand(t, 0).reshape(-1, self.heads.n_src, hn)
            return self.heads.split_fanin(heads, 1, self.equal).flatten(1)
        if role in (Role.FC1_WEIGHT, Role.FC1_BIAS):
            halves = [x.reshape(2 if s.mlp.gated else 1, self.neurons.n_src, *x.shape[1:]) for x in (t, nxt)]
            rows = self._aki(self.neurons, halves[0], halves[1], 1).flatten(0, 1)
            return self.hidden.split_fanin(rows, 1, self.equal) if role == Role.FC1_WEIGHT else rows
        if role == Role.FC2_WEIGHT:
            return self.neurons.split_fanin(self.hidden.expand(t, 0), 1, self.equal)
        raise AssertionError(f"bert2bert-aki has no rule for role {role!r}")
