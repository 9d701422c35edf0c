"""Expert pruning: fewer experts per MoE layer, the least-used ones removed (the Minitron recipe's
width axis applied to experts: Sreenivas et al., "LLM Pruning and Distillation in Practice: The
Minitron Approach", arXiv 2408.11796 §2, which ranks Mixtral's experts by how much the router uses them).

Each MoE layer keeps the `num_moe_experts` experts with the largest routing mass on calibration data
(the sum over tokens of the router weight each expert received while chosen; `methods/experts.py`
measures it), in their original order; the router keeps those experts' rows. Everything else passes
through. If the removed experts were never among a token's top-k, the pruned layer computes exactly
what the source did (softmax after top-k renormalises over the same chosen set); otherwise the
tokens that used them are re-routed to their next choices. Before calibration (a dry run) the first
experts are kept.
"""
from __future__ import annotations

import torch

from scalegrow import arch
from scalegrow.config import ModelConfig
from scalegrow.operators.base import Operator, require_equal


class PruneExperts(Operator):
    name = "prune-experts"
    handles_moe = True

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        if not src.num_moe_experts:
            raise ValueError("num_moe_experts: the source is dense; there are no experts to prune")
        if not dst.num_moe_experts or dst.num_moe_experts >= src.num_moe_experts:
            raise ValueError(f"num_moe_experts: target {dst.num_moe_experts} must be below the source's "
                             f"{src.num_moe_experts}")
        for key in src.to_dict():
            if key not in ("num_moe_experts", "moe_router_topk"):
                require_equal(src, dst, key, why="prune-experts removes experts only")

    def setup(self) -> None:
        keep = list(range(self.dst.num_moe_experts))
        self.kept = {i: keep for i in range(self.src.num_layers) if self.src.is_moe_layer(i)}
        self.usage: dict[int, list[float]] = {}

    def select(self, usage: dict[int, torch.Tensor]) -> None:
        """Keep, per MoE layer, the experts with the most routing mass (ties: the lower index)."""
        for i, mass in usage.items():
            order = sorted(range(len(mass)), key=lambda e: (-float(mass[e]), e))
            self.kept[i] = sorted(order[:self.dst.num_moe_experts])
            self.usage[i] = [round(float(m), 6) for m in mass]

    def details(self) -> dict:
        return {"kept_experts": {str(i): k for i, k in self.kept.items()},
                "routing_mass": {str(i): u for i, u in self.usage.items()}}

    def layer_sources(self, index: int) -> tuple[int, ...]:
        return (index,)

    def map_embeddings(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)

    def map_head(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)

    def map_layer(self, index: int, sources: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        src, out = sources[index], {}
        for spec in self.layer_specs(index):
            expert = arch.expert_of(spec.name)
            if expert is not None:  # target expert j is source expert kept[j]
                out[spec.name] = src[f"{arch.EXPERTS}{self.kept[index][expert[0]]}.{expert[1]}"]
            elif spec.role in (arch.Role.ROUTER_WEIGHT, arch.Role.ROUTER_BIAS):
                out[spec.name] = src[spec.name][self.kept[index]]
            else:
                out[spec.name] = src[spec.name]
        return out
