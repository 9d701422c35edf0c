"""Qwen3 (`Qwen3ForCausalLM`): llama with a norm over each head's queries and keys (megatron-core's
qk_layernorm); qwen2's sliding window."""
from scalegrow.formats.hf.families import llama, qwen2
from scalegrow.formats.hf.families.llama import llama_like

FAMILY = llama_like("qwen3", "Qwen3ForCausalLM", features={**llama.WINDOWED, "qk_layernorm": True},
                    refusals=qwen2.REFUSALS, config_in=qwen2.config_in,
                    config_out=llama.without_attention_bias(qwen2.config_out), moe_sibling="qwen3_moe")
