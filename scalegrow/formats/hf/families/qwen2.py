"""Qwen2 (`Qwen2ForCausalLM`): llama with q/k/v biases (megatron-core's add_qkv_bias), and a sliding
window on the layers `use_sliding_window` with `max_window_layers` or `layer_types` picks."""
from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import llama, sliding
from scalegrow.formats.hf.families.llama import ATTENTION_REFUSALS, llama_like
from scalegrow.formats.hf.family import must_be

SLIDING = must_be("use_sliding_window", False, "full attention")  # what the MoE kin refuse
REFUSALS = ATTENTION_REFUSALS + (sliding.LAYER_TYPES_REFUSAL,)


def config_in(hf: dict) -> dict:
    return {**llama.config_in(hf), **sliding.qwen_in(hf)}


def config_out(cfg: ModelConfig, base: dict) -> dict:
    return {**llama.config_out(cfg, base), **sliding.qwen_out(cfg, base)}


FAMILY = llama_like("qwen2", "Qwen2ForCausalLM", features={**llama.WINDOWED, "add_qkv_bias": True},
                    refusals=REFUSALS, config_in=config_in, config_out=config_out, moe_sibling=None)
