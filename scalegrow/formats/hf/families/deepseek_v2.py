"""DeepSeek-V2 (`DeepseekV2ForCausalLM`: V2, V2-Lite, V2.5): deepseek_v3's multi-latent attention and
layer layout (its rope turns the same interleaved pairs, as complex numbers) with V2's router: a
softmax over all experts, the top k unnormalised, times `routed_scaling_factor` (megatron-core's
softmax before top-k, scaled), no routing bias; `topk_method: group_limited_greedy` keeps a token to
the `topk_group` groups of `n_group` with the best single expert, which is megatron-core's group score
(the sum of a group's `topk // topk_group` best) only where that is 1."""
from __future__ import annotations

from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import deepseek, llama, moe
from scalegrow.formats.hf.family import DROP, HFFamily, Refusal, must_be

LAYER = tuple(r for r in deepseek.LAYER if r.megatron != "mlp.router.expert_bias")
FEATURES = {**deepseek.FEATURES, "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
            "moe_router_pre_softmax": True}
TOPK_METHODS = ("greedy", "group_limited_greedy")


def grouped(hf: dict) -> bool:
    return hf.get("topk_method", "greedy") == "group_limited_greedy" and (hf.get("n_group") or 1) > 1


REFUSALS = (
    llama.SILU, llama.ROPE_TYPE, llama.INTEGER_BASE,
    must_be("attention_bias", False, "no attention biases"),
    must_be("mlp_bias", False, "no MLP biases"),
    Refusal("topk_method", f"one of {TOPK_METHODS}", lambda v, hf: v in TOPK_METHODS,
            lambda hf: hf.get("topk_method", "greedy")),
    Refusal("topk_group", "a group's score as its best expert's: num_experts_per_tok // topk_group = 1",
            lambda v, hf: not grouped(hf) or hf["num_experts_per_tok"] // v == 1, lambda hf: hf.get("topk_group")),
    *(r for r in deepseek.REFUSALS if r.key in ("num_key_value_heads", "n_shared_experts")),
)


def config_in(hf: dict) -> dict:
    out = {**deepseek.config_in(hf), "moe_router_num_groups": None, "moe_router_group_topk": None}
    if grouped(hf):
        out.update(moe_router_num_groups=hf["n_group"], moe_router_group_topk=hf["topk_group"])
    return out


def requires(cfg: ModelConfig) -> dict:
    """deepseek_v3's, with V2's group score: a group's best expert."""
    out = deepseek.requires(cfg)
    moe_ = cfg.moe
    if moe_ and moe_.num_groups:
        out["moe_router_group_topk"] = moe_.group_topk if moe_.topk // moe_.group_topk == 1 else moe_.topk
    return out


def config_out(cfg: ModelConfig, base: dict) -> dict:
    groups = cfg.moe.num_groups
    return {**deepseek.config_out(cfg, base), "rope_interleave": DROP, "norm_topk_prob": False,
            "topk_method": "group_limited_greedy" if groups else "greedy", "n_group": groups,
            "topk_group": cfg.moe.group_topk}


FAMILY = HFFamily("deepseek_v2", "DeepseekV2ForCausalLM", LAYER, llama.GLOBAL, FEATURES, config_in, config_out,
                  REFUSALS, moe=True, requires=requires, fused_layer=moe.fused(LAYER))
