"""Qwen3 (`Qwen3ForCausalLM`): llama with a norm over each head's queries and keys (megatron-core's
qk_layernorm); no sliding window."""
from scalegrow.formats.hf.families import llama
from scalegrow.formats.hf.families.llama import REFUSALS, llama_like
from scalegrow.formats.hf.families.qwen2 import SLIDING

FAMILY = llama_like("qwen3", "Qwen3ForCausalLM", features={**llama.FEATURES, "qk_layernorm": True},
                    refusals=REFUSALS + (SLIDING,), moe_sibling="qwen3_moe")
