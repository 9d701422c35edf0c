"""Mixtral (`MixtralForCausalLM`): llama with an MoE in every layer: the router `block_sparse_moe.gate`,
experts' w1/w3 (gate/up) and w2 (down); softmax over all experts, top-k, renormalised, which is
megatron-core's softmax after top-k."""
from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import llama, moe
from scalegrow.formats.hf.families.mistral import SLIDING
from scalegrow.formats.hf.family import HFFamily

LAYER = moe.expert_layer("model.layers.{i}.block_sparse_moe.", "gate.weight", "w1.weight", "w3.weight", "w2.weight")


def config_in(hf: dict) -> dict:
    return {**llama.config_in(hf), **moe.config_in(hf, renormalised=True, ffn_key="intermediate_size")}


def config_out(cfg: ModelConfig, base: dict) -> dict:
    return {**llama.config_out(cfg, base), **moe.config_out(cfg, base, "num_local_experts"),
            "intermediate_size": cfg.moe.ffn_hidden_size}


FAMILY = HFFamily("mixtral", "MixtralForCausalLM", LAYER, llama.GLOBAL,
                  {**moe.FEATURES, "moe_router_pre_softmax": False}, config_in, config_out,
                  llama.REFUSALS + (SLIDING,)
                  + moe.REFUSALS + (moe.top1_refusal(lambda hf: True),), moe=True, fused_layer=moe.fused(LAYER))
