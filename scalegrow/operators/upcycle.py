"""Sparse upcycling: a dense GPT becomes a Mixture-of-Experts GPT that computes the same function.
Komatsuzaki et al., "Sparse Upcycling" (arXiv 2212.05055) §3.1; NVIDIA, "Upcycling Large Language
Models into Mixture of Experts" (arXiv 2410.07524) §3 (granular upcycling, §3.2).

Every expert of an MoE layer starts as a copy of that layer's dense FFN (fc1, fc2 and their biases);
attention, norms, embeddings and dense layers pass through.

Why the function is kept. An MoE layer outputs Σ_{e ∈ top-k(x)} w_e(x) · FFN_e(x). With every
FFN_e = FFN this is (Σ_e w_e(x)) · FFN(x), so it equals FFN(x) exactly when the chosen weights sum
to 1, whatever the router picks:
- softmax over the top-k logits (megatron-core's default): the k weights are a softmax, they sum to
  1. The router starts as N(0, init_method_std²), so routing is already diverse.
- softmax over all experts, then top-k (`moe_router_pre_softmax`): the chosen weights sum to less
  than 1. The router starts at zero, so every weight is 1/E and the k chosen sum to k/E; every
  expert's fc2 weight and bias are scaled by E/k, and the sum is FFN(x) again.
- sigmoid scores normalised over the chosen k (DeepSeek-V3's router, k > 1): they sum to 1 like the
  first. With k = 1 the one weight is its score σ(l); the router starts at zero, so it is 1/2, and fc2
  is scaled by 2. The expert bias (it only steers the choice) starts at zero, as DeepSeek's does.
- a scaling factor ρ (`moe_router_topk_scaling_factor`) multiplies the weights' sum: fc2 carries 1/ρ.
- group-limited routing (the best `moe_router_group_topk` of `moe_router_num_groups` groups) only
  narrows which copies are chosen, which any choice of copies survives.
Granularity G splits the dense FFN's neurons into G equal segments, FFN(x) = Σ_g FFN_g(x) (fc2 sums
over neurons; each segment carries fc2's bias / G), and makes E·G experts of FFN/G neurons, top-k·G:
expert c·G + g is copy c of segment g. The G experts of copy c share one router row, so their logits
tie and the top k·G are the top k copies with all their segments; softmax over those gives each
segment π_c / G (π: the softmax over the k copies' logits; sigmoid scores normalised over the
chosen do the same). fc2 scaled by G makes the layer Σ_c π_c · FFN(x) = FFN(x). With softmax before
top-k the chosen copies' weights do not sum to a constant, so G > 1 needs softmax after top-k or
normalised sigmoid scores; grouped experts must hold whole copies (the groups divide the E copies).
`noise` > 0 adds seeded Gaussian noise (relative to each tensor's std) to the copies: this breaks the
symmetry between experts at the price of exactness.
"""
from __future__ import annotations

import torch

from scalegrow.core import arch
from scalegrow.core.config import ModelConfig
from scalegrow.core.features import MoE
from scalegrow.operators.base import LayerwiseOperator, require_equal


class Upcycle(LayerwiseOperator):
    name = "upcycle"
    handles_moe = True
    handles_mla = True  # attention passes through

    def __init__(self, src: ModelConfig, dst: ModelConfig, seed: int = 0, noise: float = 0.0, granularity: int = 1):
        self.noise, self.granularity = noise, granularity
        super().__init__(src, dst, seed)

    def resolve(self, src: ModelConfig, dst: ModelConfig) -> ModelConfig:
        """The experts' FFN size follows from the granularity: ffn_hidden_size / G."""
        g = self.granularity
        if g < 1 or src.mlp.ffn_hidden_size % g:
            raise ValueError(f"granularity: {g} must be >= 1 and divide ffn_hidden_size {src.mlp.ffn_hidden_size}")
        if dst.moe and dst.moe.ffn_hidden_size == dst.mlp.ffn_hidden_size:
            dst = dst.replace(moe_ffn_hidden_size=src.mlp.ffn_hidden_size // g)
        return super().resolve(src, dst)

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        if src.moe:
            raise ValueError(f"num_moe_experts: the source is already an MoE ({src.moe.num_experts} experts); "
                             f"upcycle turns a dense model into one")
        if not dst.moe:
            raise ValueError("num_moe_experts: the target must set it (e.g. 8) to upcycle into experts")
        if dst.moe.shared_size:
            raise ValueError("moe_shared_expert_intermediate_size: upcycling makes routed experts only; "
                             "leave the shared expert out")
        for key in src.to_dict():
            if key not in MoE.flat_keys():
                require_equal(src, dst, key, why="upcycling changes only the FFNs into experts")
        g = self.granularity
        if dst.moe.ffn_hidden_size != src.mlp.ffn_hidden_size // g:
            raise ValueError(f"moe_ffn_hidden_size: target {dst.moe.ffn_hidden_size!r} differs from source "
                             f"{src.mlp.ffn_hidden_size // g!r}; growth cannot change it (each expert is a copy of "
                             f"1/{g} of the dense FFN (granularity {g}))")
        for key, value in (("num_moe_experts", dst.moe.num_experts), ("moe_router_topk", dst.moe.topk)):
            if value % g:
                raise ValueError(f"{key}: {value} is not a multiple of granularity {g} "
                                 f"(E copies of G segments, top k copies of G segments)")
        if g > 1 and self._router_starts_at_zero(dst.moe):
            raise ValueError(f"moe_router_pre_softmax: granularity {g} keeps the function only with the softmax "
                             f"after top-k or normalised sigmoid scores (the chosen weights of a pre-softmax router "
                             f"do not sum to a constant)")
        if dst.moe.num_groups and (dst.moe.num_experts // g) % dst.moe.num_groups:
            raise ValueError(f"moe_router_num_groups: {dst.moe.num_groups} groups must divide the "
                             f"{dst.moe.num_experts // g} copies, so that each group holds whole copies")

    def details(self) -> dict:
        return {"num_moe_experts": self.dst.moe.num_experts, "moe_router_topk": self.dst.moe.topk,
                "granularity": self.granularity, "noise": self.noise, "seed": self.seed}

    def map_layer(self, index: int, sources: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        dense = sources[index]
        if not self.dst.is_moe_layer(index):
            return {s.name: dense[s.name] for s in self.layer_specs(index)}
        gen = torch.Generator().manual_seed(self.seed * 100_003 + index)  # per layer: any order, same result
        out = {}
        for spec in self.layer_specs(index):
            expert = arch.expert_of(spec.name)
            if expert is not None:
                segment = self._segment(dense[f"mlp.{expert[1]}"], expert[1], expert[0] % self.granularity)
                out[spec.name] = self._expert(segment, expert[1], gen)
            elif spec.role in (arch.Role.ROUTER_WEIGHT, arch.Role.ROUTER_BIAS, arch.Role.ROUTER_EXPERT_BIAS):
                out[spec.name] = self._router(arch.full_shape(self.dst, spec), dense, spec.role, gen)
            else:
                out[spec.name] = dense[spec.name]
        return out

    @staticmethod
    def _router_starts_at_zero(moe: MoE) -> bool:
        """Whether the chosen weights sum to a constant only while every logit is equal (0)."""
        return moe.pre_softmax and moe.score_function == "softmax" or moe.score_function == "sigmoid" and moe.topk == 1

    def _weight_sum(self) -> float:
        """What the chosen experts' weights sum to in the upcycled model (see the module docstring)."""
        moe = self.dst.moe
        total = moe.topk / moe.num_experts if moe.score_function == "softmax" and moe.pre_softmax else 1.0
        if moe.score_function == "sigmoid" and moe.topk == 1:
            total = 0.5  # σ(0)
        return total * (moe.scaling_factor or 1.0)

    def _router(self, shape, dense, role: str, gen: torch.Generator) -> torch.Tensor:
        like = dense[next(iter(dense))]
        if role == arch.Role.ROUTER_EXPERT_BIAS:
            return torch.zeros(shape, dtype=torch.float32)
        if role == arch.Role.ROUTER_BIAS or self._router_starts_at_zero(self.dst.moe):
            return torch.zeros(shape, dtype=like.dtype)
        g = self.granularity  # one row per copy, repeated for its G segments: [E·G, h]
        rows = torch.randn((shape[0] // g, *shape[1:]), generator=gen) * self.dst.init_method_std
        return rows.repeat_interleave(g, dim=0).to(like.dtype)

    def _segment(self, t: torch.Tensor, name: str, g: int) -> torch.Tensor:
        """Segment g of G of a dense FFN tensor: fc1 rows (each half of a fused swiglu fc1), fc2
        columns, and fc2's bias / G; fc2 is scaled by G (each copy's segments share π_c / G)."""
        G = self.granularity
        if G == 1:
            return t
        if name.startswith("linear_fc1"):
            halves = t.chunk(2 if self.src.mlp.gated else 1, dim=0)  # [2·ffn, h] -> 2 x [ffn, h] (gate, up)
            return torch.cat([half.chunk(G, dim=0)[g] for half in halves], dim=0)  # [2·ffn/G, h]
        if name == "linear_fc2.weight":
            return t.chunk(G, dim=1)[g] * G  # [h, ffn] -> [h, ffn/G]
        return t  # fc2's bias: bias / G per segment, times G

    def _expert(self, t: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
        total = self._weight_sum()
        if total != 1.0 and name.startswith("linear_fc2"):
            t = t * (1.0 / total)  # the k chosen weights sum to `total`
        if self.noise and t.device.type != "meta":
            t = t + torch.randn(t.shape, generator=gen).to(t.dtype) * (self.noise * t.float().std().item())
        return t.clone()

