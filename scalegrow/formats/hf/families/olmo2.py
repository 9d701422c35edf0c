"""OLMo 2 (`Olmo2ForCausalLM`): llama's block with the norms moved after attention and after the MLP
(`post_attention_layernorm`, `post_feedforward_layernorm`; no norm on a block's input, which reads the
stream itself), and q/k norms each over the whole projection (every head's q at once; every query
group's k) before rope. megatron-core has neither, so OLMo 2 is written as a Hugging Face model only."""
from __future__ import annotations

from scalegrow.formats.hf.families import gemma, llama
from scalegrow.formats.hf.family import HFFamily

# Gemma's post-norm names (post_attention_layernorm is the norm after attention) without its pre-norms
LAYER = tuple(r for r in gemma.LAYER if r.megatron not in ("input_layernorm.weight", "pre_mlp_layernorm.weight"))
FEATURES = {**llama.FEATURES, "qk_layernorm": True, "qk_layernorm_across_heads": True, "pre_layernorms": False,
            "post_layernorms": True}

FAMILY = HFFamily("olmo2", "Olmo2ForCausalLM", LAYER, llama.GLOBAL, FEATURES, llama.config_in,
                  llama.without_attention_bias(llama.config_out), llama.REFUSALS, moe_sibling=None)
