"""Operators that choose, per MoE layer, which source expert each target expert is (`ExpertMap`):
more experts by copying (`MoreExperts`), and fewer by pruning (`PruneExperts`).

Expert pruning: fewer experts per MoE layer, the least-used ones removed (the Minitron recipe's
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

from scalegrow.core import arch
from scalegrow.core.config import ModelConfig
from scalegrow.operators.base import LayerwiseOperator, require_equal


ROUTER_ROLES = (arch.Role.ROUTER_WEIGHT, arch.Role.ROUTER_BIAS, arch.Role.ROUTER_EXPERT_BIAS)  # one row per expert


class ExpertMap(LayerwiseOperator):
    """Target expert j of MoE layer i is source expert `experts(i)[j]`, with its router row (and
    biases: the logit's, and the score's that only chooses); every other tensor passes through."""

    handles_moe = True
    handles_mla = True  # attention passes through

    def experts(self, index: int) -> list[int]:
        raise NotImplementedError

    @staticmethod
    def require_only_experts_change(src: ModelConfig, dst: ModelConfig, why: str, also: tuple[str, ...] = ()) -> None:
        for key in src.to_dict():
            if key not in ("num_moe_experts", "moe_router_topk", *also):
                require_equal(src, dst, key, why=why)

    def map_layer(self, index: int, sources: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        src, out = sources[index], {}
        for spec in self.layer_specs(index):
            expert = arch.expert_of(spec.name)
            if expert is not None:
                out[spec.name] = src[f"{arch.EXPERTS}{self.experts(index)[expert[0]]}.{expert[1]}"]
            elif spec.role in ROUTER_ROLES:
                out[spec.name] = src[spec.name][self.experts(index)]  # [E_S, ...] -> [E_T, ...]
            else:
                out[spec.name] = src[spec.name]
        return out


class PruneExperts(ExpertMap):
    name = "prune-experts"

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        if not src.moe:
            raise ValueError("num_moe_experts: the source is dense; there are no experts to prune")
        if not dst.moe or dst.moe.num_experts >= src.moe.num_experts:
            raise ValueError(f"num_moe_experts: target {dst.moe and dst.moe.num_experts} must be below the source's "
                             f"{src.moe.num_experts}")
        # fewer experts may need fewer groups (pruning keeps the best experts, not the function)
        self.require_only_experts_change(src, dst, "prune-experts removes experts only",
                                         also=("moe_router_num_groups", "moe_router_group_topk"))

    def setup(self) -> None:
        keep = list(range(self.dst.moe.num_experts))
        self.kept = {i: keep for i in range(self.src.num_layers) if self.src.is_moe_layer(i)}
        self.usage: dict[int, list[float]] = {}

    def select(self, usage: dict[int, torch.Tensor]) -> None:
        """Keep, per MoE layer, the experts with the most routing mass (ties: the lower index)."""
        for i, mass in usage.items():
            order = sorted(range(len(mass)), key=lambda e: (-float(mass[e]), e))
            self.kept[i] = sorted(order[:self.dst.moe.num_experts])
            self.usage[i] = [round(float(m), 6) for m in mass]

    def details(self) -> dict:
        return {"kept_experts": {str(i): k for i, k in self.kept.items()},
                "routing_mass": {str(i): u for i, u in self.usage.items()}}

    def experts(self, index: int) -> list[int]:
        return self.kept[index]


class MoreExperts(ExpertMap):
    """More experts at the same function: every expert copied m times, top-k raised to m·k.

    Rule: with E' = m·E experts where copy c of expert e sits at index e·m + c (same FFN, same router
    row, so the same logit l_e) and k' = m·k, the MoE layer computes what it did.
    Proof. The m copies of an expert tie, so the top-m·k logits are exactly the m copies of each of
    the original top-k experts (barring ties between different experts at the k-th place, which
    torch.topk resolves the same way for the original). Softmax after top-k: each chosen copy of e
    weighs exp(l_e) / (m·Σ_{j ∈ top-k} exp(l_j)) = w_e / m, and its m copies together w_e. Softmax
    before top-k: p'_{e,c} = exp(l_e) / (m·Σ_j exp(l_j)) = p_e / m, again summing to p_e over the
    copies. Σ_e Σ_c (w_e/m)·FFN_e(x) = Σ_e w_e·FFN_e(x). The router logit is thus split evenly between
    the copies by the softmax itself; training moves the copies (and their logits) apart.
    Sigmoid scores (DeepSeek-V3), normalised over the chosen: the copies tie on s_e + b_e, so the
    chosen are again the m copies of the source's top k, each weighing s_e / (m·Σ_j s_j) = w_e / m;
    a scaling factor multiplies both sides. Unnormalised (k = 1) the weights would not split, so that
    is refused. Grouped experts: the copies of e land in e's group (index e·m + c over groups m times
    larger), and a group's score, the sum of its m·k/k_g best, is m times the source's over its k/k_g
    best (softmax after top-k: of the same logits; the other scores: each copy's is s_e / m or s_e,
    a constant factor either way), so the same groups are chosen.
    """

    name = "more-experts"

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        if not src.moe:
            raise ValueError("num_moe_experts: the source is dense; upcycle it into experts first")
        target = dst.moe.num_experts if dst.moe else None
        m, rest = divmod(target or 0, src.moe.num_experts)
        if m < 2 or rest:
            raise ValueError(f"num_moe_experts: target {target} must be a multiple (x2 or more) of the source's "
                             f"{src.moe.num_experts}")
        if src.moe.score_function == "sigmoid" and src.moe.topk == 1:
            raise ValueError("moe_router_topk: a sigmoid router choosing one expert weighs it by its score, which "
                             "copies cannot split; more-experts needs moe_router_topk of 2 or more there")
        if src.moe.group_topk and src.moe.topk % src.moe.group_topk:
            raise ValueError(f"moe_router_group_topk: a group's score sums its moe_router_topk // moe_router_group_topk "
                             f"best, which copies keep only when {src.moe.group_topk} divides {src.moe.topk}")
        if dst.moe.topk != m * src.moe.topk:
            raise ValueError(f"moe_router_topk: must be {m * src.moe.topk} ({m} x the source's "
                             f"{src.moe.topk}) for {m} copies of every expert to keep the function")
        self.require_only_experts_change(src, dst, "more-experts only copies experts")

    def details(self) -> dict:
        return {"copies": self.dst.moe.num_experts // self.src.moe.num_experts}

    def experts(self, index: int) -> list[int]:
        m = self.dst.moe.num_experts // self.src.moe.num_experts
        return [e // m for e in range(self.dst.moe.num_experts)]  # copy c of expert e is expert e·m + c
