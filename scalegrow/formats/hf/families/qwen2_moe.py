"""Qwen2-MoE (`Qwen2MoeForCausalLM`): qwen2 (q/k/v biases) with an MoE in every layer and a shared
expert (`shared_expert.*`, megatron-core's `mlp.shared_experts`) gated by sigmoid(shared_expert_gate · x)."""
from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import llama, moe, qwen3_moe
from scalegrow.formats.hf.families.qwen2 import SLIDING
from scalegrow.formats.hf.family import HFFamily, layer_rules

LAYER = qwen3_moe.LAYER + layer_rules(
    "model.layers.{i}.mlp.",
    ("mlp.shared_experts.linear_fc1.weight", ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"),
     "gate_up"),
    ("mlp.shared_experts.linear_fc2.weight", ("shared_expert.down_proj.weight",)),
    ("mlp.shared_experts.gate_weight", ("shared_expert_gate.weight",)),
)
FEATURES = {**moe.FEATURES, "add_qkv_bias": True, "moe_shared_expert_gate": True}
FEATURES.pop("moe_shared_expert_intermediate_size")  # a size: its own


def config_in(hf: dict) -> dict:
    return {**qwen3_moe.config_in(hf), "moe_shared_expert_intermediate_size": hf["shared_expert_intermediate_size"]}


def config_out(cfg: ModelConfig, base: dict) -> dict:
    return {**qwen3_moe.config_out(cfg, base), "shared_expert_intermediate_size": cfg.moe.shared_size}


FAMILY = HFFamily("qwen2_moe", "Qwen2MoeForCausalLM", LAYER, llama.GLOBAL, FEATURES, config_in, config_out,
                  llama.REFUSALS + (SLIDING,) + moe.REFUSALS + (moe.top1_refusal(qwen3_moe.renormalised),), moe=True,
                  fused_layer=moe.fused(LAYER))
