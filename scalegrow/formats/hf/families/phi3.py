"""Phi-3 and Phi-4 (`Phi3ForCausalLM`): llama's block with q, k and v fused in one `qkv_proj`
(rows [q; k; v]) and gate and up in one `gate_up_proj` (rows [gate; up]: megatron-core's fc1 as it
is), rope over `partial_rotary_factor` of each head (megatron-core's rotary_percent: both rotate the
first channels), and Mistral's window on every layer (`sliding_window`; Phi-3-mini's 2047). Its
`longrope` (Phi-3.5, Phi-4-mini's long contexts) is refused by name: neither the reference model
nor megatron-core reproduces it."""
from __future__ import annotations

from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import llama, sliding
from scalegrow.formats.hf.family import DROP, HFFamily, Refusal, layer_rules

LAYER = layer_rules(
    "model.layers.{i}.",
    ("input_layernorm.weight", ("input_layernorm.weight",)),
    ("self_attention.linear_qkv.weight", ("self_attn.qkv_proj.weight",), "fused_qkv"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    ("mlp.linear_fc1.weight", ("mlp.gate_up_proj.weight",)),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
)
FEATURES = {k: v for k, v in llama.WINDOWED.items() if k != "rotary_percent"}


def partial_rotary(hf: dict) -> float:
    """transformers 5 keeps it in `rope_parameters`, earlier ones at the top."""
    return float(llama.rope_parameters(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))


REFUSALS = (
    llama.SILU,
    Refusal("rope_type", "plain rope (not longrope)", lambda v, hf: v == "default",
            lambda hf: llama.rope_parameters(hf)["rope_type"]),
    llama.INTEGER_BASE,
    llama.FULL_ATTENTION,
)


def config_in(hf: dict) -> dict:
    return {**llama.config_in(hf), **sliding.window_args(hf.get("sliding_window")),
            "rotary_percent": partial_rotary(hf)}


def config_out(cfg: ModelConfig, base: dict) -> dict:
    out = llama.config_out(cfg, base)
    out["rope_parameters"]["partial_rotary_factor"] = cfg.rope.percent
    return {**out, "sliding_window": sliding.tokens_of(cfg), "partial_rotary_factor": DROP}


FAMILY = HFFamily("phi3", "Phi3ForCausalLM", LAYER, llama.GLOBAL, FEATURES, config_in, config_out, REFUSALS,
                  moe_sibling=None, requires=sliding.mistral_requires)
