"""Mistral (`MistralForCausalLM`): llama's layout; its sliding window is refused (full attention only)."""
from scalegrow.formats.hf.families.llama import REFUSALS, llama_like
from scalegrow.formats.hf.family import must_be

SLIDING = must_be("sliding_window", None, "full attention, no sliding window")

FAMILY = llama_like("mistral", "MistralForCausalLM", refusals=REFUSALS + (SLIDING,))
