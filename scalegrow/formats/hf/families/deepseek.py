"""DeepSeek-V3 (`DeepseekV3ForCausalLM`: DeepSeek-V3, V3.1, R1): multi-latent attention
(`self_attn.q_a_proj`, `q_a_layernorm`, `q_b_proj` or, without a q latent, `q_proj`;
`kv_a_proj_with_mqa` [KV latent; shared rope key], `kv_a_layernorm`, `kv_b_proj`), dense FFNs in the
first `first_k_dense_replace` layers, then an MoE: sigmoid scores chosen with `e_score_correction_bias`
(fp32) within the best `topk_group` of `n_group` expert groups, normalised (`norm_topk_prob`) and
times `routed_scaling_factor`, beside `n_shared_experts` always-on experts in one FFN
(`mlp.shared_experts`). What megatron-core reproduces, as `core/mla_config.py` and `core/layers/moe.py` say.

Multi-token prediction layers (`num_nextn_predict_layers`, the release's `model.layers.61.*`) are not
part of transformers' model, nor scalegrow's: the reader sets them aside (`HFReader.mtp`) and a write
refuses them by name unless `--drop-mtp` (`write/session.refuse_dropped_tensors`).
"""
from __future__ import annotations

from scalegrow.core.config import ModelConfig, moe_pattern
from scalegrow.formats.hf.families import llama, moe
from scalegrow.formats.hf.family import DROP, HFFamily, Refusal, layer_rules, must_be

ATTENTION = layer_rules(
    "model.layers.{i}.",
    ("input_layernorm.weight", ("input_layernorm.weight",)),
    ("self_attention.linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",)),
    ("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",)),
    ("self_attention.linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",)),
    ("self_attention.linear_q_proj.weight", ("self_attn.q_proj.weight",)),
    ("self_attention.linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",)),
    ("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",)),
    ("self_attention.linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",)),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
)
MLP = layer_rules(  # the dense layers' FFN, the MoE layers' routing bias and shared experts
    "model.layers.{i}.mlp.",
    ("mlp.linear_fc1.weight", ("gate_proj.weight", "up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("down_proj.weight",)),
    ("mlp.router.expert_bias", ("gate.e_score_correction_bias",)),
    ("mlp.shared_experts.linear_fc1.weight", ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight"),
     "gate_up"),
    ("mlp.shared_experts.linear_fc2.weight", ("shared_experts.down_proj.weight",)),
)
EXPERTS = tuple(r for r in moe.expert_layer("model.layers.{i}.mlp.", "gate.weight", "gate_proj.weight",
                                            "up_proj.weight", "down_proj.weight") if r not in llama.ATTENTION)
LAYER = ATTENTION + MLP + EXPERTS

FEATURES = {**llama.FEATURES, "qk_layernorm": True, "multi_latent_attention": True,
            "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
            "moe_router_pre_softmax": False, "moe_shared_expert_gate": False}
for size in ("num_moe_experts", "window_size"):
    FEATURES.pop(size)


def _group_score_refusal() -> Refusal:
    """A group's score is the sum of its 2 best experts' (transformers); megatron-core sums the
    moe_router_topk // moe_router_group_topk best, so the two agree where that is 2."""
    return Refusal("topk_group", "a group's score as the sum of its num_experts_per_tok // topk_group = 2 best",
                   lambda v, hf: (hf.get("n_group") or 1) <= 1 or hf["num_experts_per_tok"] // v == 2,
                   lambda hf: hf.get("topk_group") or 1)


REFUSALS = (
    llama.SILU, llama.ROPE_TYPE, llama.INTEGER_BASE,
    must_be("attention_bias", False, "no attention biases"),
    must_be("rope_interleave", True, "rope on interleaved channel pairs, as DeepSeek's checkpoints lay them out"),
    must_be("scoring_func", "sigmoid", "DeepSeek-V3's sigmoid router"),
    Refusal("num_key_value_heads", "multi-latent attention with every head its own key",
            lambda v, hf: v in (None, hf["num_attention_heads"]), lambda hf: hf.get("num_key_value_heads")),
    Refusal("norm_topk_prob", "weights normalised over the chosen experts, unless one is chosen",
            lambda v, hf: v == (hf.get("num_experts_per_tok", 8) > 1), lambda hf: hf.get("norm_topk_prob", True)),
    Refusal("n_shared_experts", "at least one shared expert", lambda v, hf: v >= 1,
            lambda hf: hf.get("n_shared_experts", 1)),
    _group_score_refusal(),
)


def config_in(hf: dict) -> dict:
    layers, dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 0)
    groups = hf.get("n_group") or 1
    return {**llama.config_in(hf), "num_query_groups": hf["num_attention_heads"],
            "kv_channels": None,  # heads' widths are MLA's
            "q_lora_rank": hf.get("q_lora_rank"), "kv_lora_rank": hf["kv_lora_rank"],
            "qk_head_dim": hf["qk_nope_head_dim"], "qk_pos_emb_head_dim": hf["qk_rope_head_dim"],
            "v_head_dim": hf["v_head_dim"], "num_moe_experts": hf["n_routed_experts"],
            "moe_router_topk": hf["num_experts_per_tok"], "moe_ffn_hidden_size": hf["moe_intermediate_size"],
            "moe_shared_expert_intermediate_size": hf.get("n_shared_experts", 1) * hf["moe_intermediate_size"],
            "moe_layer_freq": [int(i >= dense) for i in range(layers)],
            "moe_router_num_groups": groups if groups > 1 else None,
            "moe_router_group_topk": hf.get("topk_group") if groups > 1 else None,
            "moe_router_topk_scaling_factor": _scaling(hf.get("routed_scaling_factor", 1.0))}


def _scaling(factor: float) -> float | None:
    return None if factor == 1.0 else float(factor)


def first_dense(cfg: ModelConfig) -> int:
    """How many layers come before the first MoE layer."""
    return next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))


def requires(cfg: ModelConfig) -> dict:
    """What DeepSeek's config.json can say: dense layers only first, shared experts of whole experts,
    a group's score from its 2 best."""
    moe = cfg.moe
    k = first_dense(cfg) if moe and any(map(cfg.is_moe_layer, range(cfg.num_layers))) else cfg.num_layers
    shared = moe.shared_size if moe and moe.shared_size and moe.shared_size % moe.ffn_hidden_size == 0 else -1
    out = {"moe_layer_freq": moe_pattern([int(i >= k) for i in range(cfg.num_layers)]),
           "moe_shared_expert_intermediate_size": shared}
    if moe and moe.num_groups:  # transformers sums a group's 2 best: megatron-core's topk // group_topk must be 2
        out["moe_router_group_topk"] = moe.topk // 2
    return out


def config_out(cfg: ModelConfig, base: dict) -> dict:
    mla, moe_ = cfg.mla, cfg.moe
    out = {**llama.config_out(cfg, base), "num_key_value_heads": cfg.attention.heads, "head_dim": DROP,
           "q_lora_rank": mla.q_lora_rank, "kv_lora_rank": mla.kv_lora_rank, "qk_nope_head_dim": mla.qk_head_dim,
           "qk_rope_head_dim": mla.qk_pos_emb_head_dim, "v_head_dim": mla.v_head_dim, "rope_interleave": True,
           "n_routed_experts": moe_.num_experts, "num_experts_per_tok": moe_.topk,
           "moe_intermediate_size": moe_.ffn_hidden_size, "n_shared_experts": moe_.shared_size // moe_.ffn_hidden_size,
           "first_k_dense_replace": first_dense(cfg), "n_group": moe_.num_groups or 1,
           "topk_group": moe_.group_topk or 1, "routed_scaling_factor": moe_.scaling_factor or 1.0,
           "norm_topk_prob": moe_.topk > 1, "attention_bias": False}
    return out


FAMILY = HFFamily("deepseek_v3", "DeepseekV3ForCausalLM", LAYER, llama.GLOBAL, FEATURES, config_in, config_out,
                  REFUSALS, moe=True, requires=requires, fused_layer=moe.fused(LAYER))
