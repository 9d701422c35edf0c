"""Sparse upcycling: a dense GPT becomes a Mixture-of-Experts GPT that computes the same function.
Komatsuzaki et al., "Sparse Upcycling" (arXiv 2212.05055) §3.1; NVIDIA, "Upcycling Large Language
Models into Mixture of Experts" (arXiv 2410.07524) §3.

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
`noise` > 0 adds seeded Gaussian noise (relative to each tensor's std) to the copies: this breaks the
symmetry between experts at the price of exactness.
"""
from __future__ import annotations

import torch

from scalegrow import arch
from scalegrow.config import ModelConfig
from scalegrow.operators.base import MOE, LayerwiseOperator, require_equal


class Upcycle(LayerwiseOperator):
    name = "upcycle"
    handles_moe = True

    def __init__(self, src: ModelConfig, dst: ModelConfig, seed: int = 0, noise: float = 0.0):
        self.noise = noise
        super().__init__(src, dst, seed)

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        if src.num_moe_experts:
            raise ValueError(f"num_moe_experts: the source is already an MoE ({src.num_moe_experts} experts); "
                             f"upcycle turns a dense model into one")
        if not dst.num_moe_experts:
            raise ValueError("num_moe_experts: the target must set it (e.g. 8) to upcycle into experts")
        for key in src.to_dict():
            if key not in MOE:
                require_equal(src, dst, key, why="upcycling changes only the FFNs into experts")
        require_equal(src.replace(moe_ffn_hidden_size=src.ffn_hidden_size), dst, "moe_ffn_hidden_size",
                      why="each expert is a copy of the whole dense FFN")

    def details(self) -> dict:
        return {"num_moe_experts": self.dst.num_moe_experts, "moe_router_topk": self.dst.moe_router_topk,
                "noise": self.noise, "seed": self.seed}

    def map_layer(self, index: int, sources: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        dense = sources[index]
        if not self.dst.is_moe_layer(index):
            return {s.name: dense[s.name] for s in self.layer_specs(index)}
        gen = torch.Generator().manual_seed(self.seed * 100_003 + index)  # per layer: any order, same result
        out = {}
        for spec in self.layer_specs(index):
            expert = arch.expert_of(spec.name)
            if expert is not None:
                out[spec.name] = self._expert(dense[f"mlp.{expert[1]}"], expert[1], gen)
            elif spec.role in (arch.Role.ROUTER_WEIGHT, arch.Role.ROUTER_BIAS):
                out[spec.name] = self._router(arch.full_shape(self.dst, spec), dense, spec.role, gen)
            else:
                out[spec.name] = dense[spec.name]
        return out

    def _router(self, shape, dense, role: str, gen: torch.Generator) -> torch.Tensor:
        like = dense["input_layernorm.weight"]
        if role == arch.Role.ROUTER_BIAS or self.dst.moe_router_pre_softmax:
            return torch.zeros(shape, dtype=like.dtype)
        return (torch.randn(shape, generator=gen) * self.dst.init_method_std).to(like.dtype)

    def _expert(self, t: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
        d = self.dst
        if d.moe_router_pre_softmax and name.startswith("linear_fc2"):
            t = t * (d.num_moe_experts / d.moe_router_topk)  # the k chosen weights sum to k/E
        if self.noise and t.device.type != "meta":
            t = t + torch.randn(t.shape, generator=gen).to(t.dtype) * (self.noise * t.float().std().item())
        return t.clone()

