"""Qwen3-MoE (`Qwen3MoeForCausalLM`): qwen3 with an MoE in every layer (`mlp.gate`, experts'
gate/up/down); `norm_topk_prob` picks the router's softmax order."""
from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import llama, moe
from scalegrow.formats.hf.families.qwen2 import SLIDING
from scalegrow.formats.hf.family import HFFamily

LAYER = moe.expert_layer("model.layers.{i}.mlp.", "gate.weight", "gate_proj.weight", "up_proj.weight",
                         "down_proj.weight")


def renormalised(hf: dict) -> bool:
    return bool(hf.get("norm_topk_prob", False))


def config_in(hf: dict) -> dict:
    return {**llama.config_in(hf), **moe.config_in(hf, renormalised(hf), ffn_key="moe_intermediate_size")}


def config_out(cfg: ModelConfig, base: dict) -> dict:
    """Qwen's MoE keys: every layer sparse, the softmax order as `norm_topk_prob`."""
    return {**llama.config_out(cfg, base), **moe.config_out(cfg, base, "num_experts"),
            "moe_intermediate_size": cfg.moe.ffn_hidden_size, "norm_topk_prob": not cfg.moe.pre_softmax,
            "decoder_sparse_step": 1, "mlp_only_layers": []}


FAMILY = HFFamily("qwen3_moe", "Qwen3MoeForCausalLM", LAYER, llama.GLOBAL, {**moe.FEATURES, "qk_layernorm": True},
                  config_in, llama.without_attention_bias(config_out),
                  llama.REFUSALS + (SLIDING,) + moe.REFUSALS + (moe.top1_refusal(renormalised),), moe=True,
                  fused_layer=moe.fused(LAYER))
