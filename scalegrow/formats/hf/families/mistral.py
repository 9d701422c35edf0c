"""Mistral (`MistralForCausalLM`): llama's layout with a sliding window on every layer
(`sliding_window`; null in Mistral v0.2 and later: full attention)."""
from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import llama, sliding
from scalegrow.formats.hf.families.llama import REFUSALS, llama_like
from scalegrow.formats.hf.family import must_be

SLIDING = must_be("sliding_window", None, "full attention, no sliding window")  # what the MoE kin refuse


def config_in(hf: dict) -> dict:
    return {**llama.config_in(hf), **sliding.mistral_in(hf)}


def config_out(cfg: ModelConfig, base: dict) -> dict:
    return {**llama.FAMILY.config_out(cfg, base), "sliding_window": sliding.tokens_of(cfg)}


FAMILY = llama_like("mistral", "MistralForCausalLM", features=llama.WINDOWED, config_in=config_in,
                    config_out=config_out, refusals=REFUSALS, requires=sliding.mistral_requires)
