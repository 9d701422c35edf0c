"""Qwen2 (`Qwen2ForCausalLM`): llama with q/k/v biases (megatron-core's add_qkv_bias); no sliding window."""
from scalegrow.formats.hf.families import llama
from scalegrow.formats.hf.families.llama import REFUSALS, llama_like
from scalegrow.formats.hf.family import must_be

SLIDING = must_be("use_sliding_window", False, "full attention")

FAMILY = llama_like("qwen2", "Qwen2ForCausalLM", features={**llama.FEATURES, "add_qkv_bias": True},
                    refusals=REFUSALS + (SLIDING,), config_out=llama.config_out, moe_sibling=None)
