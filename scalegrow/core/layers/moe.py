"""The reference model's Mixture-of-Experts layer: megatron-core's `MoELayer` with a `TopKRouter`
(`topk_routing_with_score_function`) and `SequentialMLP` experts, plus the shared expert.

Routing (`core/features.MoE` says which): softmax after the top-k (Mixtral), softmax before it
(Qwen-MoE), or sigmoid scores normalised over the chosen k (DeepSeek-V3, arXiv 2412.19437 §2.1.2),
chosen by score + expert_bias (the aux-loss-free balancing bias, §2.1.2, which never enters the
weights), within the group_topk best of num_groups expert groups (a group's score: the sum of its
topk/group_topk best), the weights times scaling_factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalegrow.core.config import ModelConfig
from scalegrow.core.features import MoE as MoERecord
from scalegrow.core.layers.blocks import MLP


def route(logits: torch.Tensor, moe: MoERecord, expert_bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's `topk_routing_with_score_function`: (weights, expert indices), each [tokens, topk]."""
    if moe.score_function == "sigmoid":
        scores = torch.sigmoid(logits.float()).type_as(logits)
        choice = scores if expert_bias is None else scores + expert_bias
        index = _topk(choice, moe)[1]
        weights = scores.gather(1, index)
        if moe.topk > 1:  # normalised over the chosen k
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    elif moe.pre_softmax:
        weights, index = _topk(torch.softmax(logits.float(), dim=-1).type_as(logits), moe)
    else:
        top, index = _topk(logits, moe)
        weights = torch.softmax(top.float(), dim=-1).type_as(logits)
    return (weights if moe.scaling_factor is None else weights * moe.scaling_factor), index


def _topk(scores: torch.Tensor, moe: MoERecord) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best scores [tokens, k] and their experts, only from each token's group_topk best groups
    (megatron-core's `group_limited_topk`) when the experts are grouped."""
    if moe.group_topk is None:
        return scores.topk(moe.topk, dim=-1)
    tokens, experts = scores.shape
    grouped = scores.view(tokens, moe.num_groups, experts // moe.num_groups)  # [T, groups, E/groups]
    group_scores = grouped.topk(moe.topk // moe.group_topk, dim=-1)[0].sum(-1)  # [T, groups]
    chosen = group_scores.topk(moe.group_topk, dim=-1, sorted=False)[1]
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)  # [T, groups]
    allowed = allowed.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
    return scores.masked_fill(~allowed, float("-inf")).topk(moe.topk, dim=-1)


def load_balancing_loss(logits: torch.Tensor, index: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """megatron-core's switch load-balancing loss (before its coefficient): E / (k·T²) ·
    Σ_e (Σ_t p_te)·n_e, with p the scores over all experts (softmax, or sigmoid normalised per token)
    and n_e the tokens routed to expert e. It is 1 when routing is uniform and grows as tokens crowd
    onto few experts."""
    tokens, experts = logits.shape
    if score_function == "sigmoid":
        probs = torch.sigmoid(logits.float())
        probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
    else:
        probs = torch.softmax(logits.float(), dim=-1)
    counts = torch.bincount(index.flatten(), minlength=experts).to(probs.dtype)
    return (probs.sum(0) * counts).sum() * experts / (index.shape[1] * tokens * tokens)


class Router(nn.Module):
    """megatron-core's TopKRouter: logits = x·Wᵀ (+ b), then `route`. With `expert_bias` it keeps the
    bias as an fp32 buffer (in the state dict, as megatron-core's) and counts, in training, the tokens
    each expert received, for `update_expert_bias`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.moe = cfg.moe
        self.weight = nn.Parameter(torch.empty(cfg.moe.num_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.empty(cfg.moe.num_experts)) if cfg.add_bias_linear else None
        if cfg.moe.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.moe.num_experts, dtype=torch.float32))
            self.register_buffer("tokens_per_expert", torch.zeros(cfg.moe.num_experts), persistent=False)
        else:
            self.expert_bias = None

    def forward(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], weights [T, k], expert indices [T, k]) for tokens [T, h]."""
        logits = F.linear(flat, self.weight, self.bias)
        weights, index = route(logits, self.moe, self.expert_bias)
        if self.expert_bias is not None and self.training and torch.is_grad_enabled():
            self.tokens_per_expert += torch.bincount(index.flatten(), minlength=self.moe.num_experts)
        return logits, weights, index

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """megatron-core's aux-loss-free step after each optimizer step: b_e += rate · sign(mean - n_e)
        (an expert that received fewer tokens than the mean is chosen more readily), counts reset."""
        counts = self.tokens_per_expert
        self.expert_bias += self.moe.bias_update_rate * torch.sign(counts.mean() - counts)
        counts.zero_()


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
        self.score_function = cfg.moe.score_function
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = SharedExpert(cfg) if cfg.moe.shared_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [b*s, h]
        logits, weights, index = self.router(flat)
        self.aux_loss = load_balancing_loss(logits, index, self.score_function)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts.local_experts):
            token, slot = (index == e).nonzero(as_tuple=True)  # every expert runs, on no tokens too: ZeRO-3
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])  # gathers on every rank
        return out.view_as(x) + (self.shared_experts(x) if self.shared_experts is not None else 0)
