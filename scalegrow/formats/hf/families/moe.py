"""What the MoE families (mixtral, qwen3_moe, qwen2_moe) share: the expert rules, how config.json
spells the router and the experts, and what it may not say. Every layer is an MoE layer.

Expert tensors are stored one per expert (`experts.{e}.…`), as the Hub's checkpoints have them and
transformers 5 writes them back, or fused (`fused`): every expert's [gate; up] rows in one 3-D
`mlp.experts.gate_up_proj` [E, 2F, H] and their down projections in `mlp.experts.down_proj` [E, H, F],
the router as `mlp.gate`, as transformers 5 holds them in memory and mergekit writes them (transformers
loads both). The
router's softmax order: top-k weights renormalised (Mixtral always; Qwen with `norm_topk_prob`) is
megatron-core's softmax over the top k, else its softmax over all experts before top-k.
"""
from __future__ import annotations

from typing import Callable

from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import llama
from scalegrow.formats.hf.family import Refusal, Rule, layer_rules, must_be

EXPERT = "mlp.experts.local_experts.{e}."


def expert_layer(prefix: str, router: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Llama's attention, then the router and every expert's fc1 ([gate; up]) and fc2 under `prefix`."""
    return llama.ATTENTION + layer_rules(
        prefix,
        ("mlp.router.weight", (router,)),
        (EXPERT + "linear_fc1.weight", (f"experts.{{e}}.{gate}", f"experts.{{e}}.{up}"), "gate_up"),
        (EXPERT + "linear_fc2.weight", (f"experts.{{e}}.{down}",)),
    )


def fused(layer: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """`layer`'s rules with the router and the experts in the fused layout (everything else as it is)."""
    kept = tuple(r for r in layer if not r.megatron.startswith(EXPERT) and r.megatron != "mlp.router.weight")
    return kept + layer_rules(
        "model.layers.{i}.mlp.",
        ("mlp.router.weight", ("gate.weight",)),
        (EXPERT + "linear_fc1.weight", ("experts.gate_up_proj",), "stacked"),  # [E, 2F, H]: e's [gate; up]
        (EXPERT + "linear_fc2.weight", ("experts.down_proj",), "stacked"),  # [E, H, F]
    )


FEATURES = {**llama.FEATURES, "moe_layer_freq": 1, "moe_shared_expert_intermediate_size": None,
            "moe_shared_expert_gate": False, "moe_router_score_function": "softmax",  # DeepSeek's routing is not theirs
            "moe_router_enable_expert_bias": False, "moe_router_num_groups": None, "moe_router_group_topk": None,
            "moe_router_topk_scaling_factor": None}
FEATURES.pop("num_moe_experts")
REFUSALS = (must_be("decoder_sparse_step", 1, "every layer an MoE layer"),
            Refusal("mlp_only_layers", "every layer an MoE layer", lambda v, hf: v == [],
                    lambda hf: list(hf.get("mlp_only_layers") or [])))


def top1_refusal(renormalised: Callable[[dict], bool]) -> Refusal:
    """Top-1 routing needs the softmax over all experts (a softmax over one expert is 1)."""
    return Refusal("num_experts_per_tok", "top-1 only with the softmax over all experts",
                   lambda k, hf: k != 1 or not renormalised(hf), lambda hf: hf.get("num_experts_per_tok", 2))


def config_in(hf: dict, renormalised: bool, ffn_key: str) -> dict:
    """The MoE keys; the load-balancing coefficient counts only where HF would add the loss."""
    balancing = hf.get("router_aux_loss_coef", 0.0) if hf.get("output_router_logits") else 0.0
    return dict(num_moe_experts=hf.get("num_local_experts") or hf.get("num_experts"),
                moe_router_topk=hf.get("num_experts_per_tok", 2), moe_router_pre_softmax=not renormalised,
                moe_ffn_hidden_size=hf[ffn_key], moe_aux_loss_coeff=float(balancing))


def config_out(cfg: ModelConfig, base: dict, experts_key: str) -> dict:
    """The MoE keys, experts counted under the source's spelling (`experts_key` if it had none)."""
    experts = next((k for k in ("num_experts", "num_local_experts") if k in base), experts_key)
    out = {experts: cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.topk}
    if cfg.moe.aux_loss_coeff:
        out.update(router_aux_loss_coef=cfg.moe.aux_loss_coeff, output_router_logits=True)
    return out
