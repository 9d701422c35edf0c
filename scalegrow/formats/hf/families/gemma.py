"""Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3's text model (`Gemma3ForCausalLM`, `gemma3_text`).

Both are llama's block with:
- zero-centred RMSNorm weights (scale 1 + w, in fp32: megatron's apply_layernorm_1p),
- a norm after attention and after the MLP as well as before (`post_attention_layernorm` is the
  post-attention norm here, `pre_feedforward_layernorm` the MLP's input norm),
- token embeddings times √hidden_size, GeGLU with GELU's tanh approximation (`gelu_pytorch_tanh`),
- attention scaled by query_pre_attn_scalar^-½, a head dimension of its own,
- sliding-window attention on the layers `layer_types` names (Gemma 2 alternates, Gemma 3 has five
  local layers to one global).
Gemma 2 soft-caps attention scores (50) and the final logits (30). Gemma 3 adds q/k norms and a rope
per layer type: `full_attention` (1e6, optionally linear-scaled) and a plain `sliding_attention` one
(1e4); transformers ignores its attn_logit_softcapping. megatron-core has neither post-norms nor
soft-capping, so these families are written as Hugging Face models only (refused to Megatron by name).
"""
from __future__ import annotations

import dataclasses

from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import llama, sliding
from scalegrow.formats.hf.family import DROP, HFFamily, Refusal, Unsupported, layer_rules, must_be

LAYER = layer_rules(
    "model.layers.{i}.",
    ("input_layernorm.weight", ("input_layernorm.weight",)),
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), "qkv"),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",)),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    ("post_self_attn_layernorm.weight", ("post_attention_layernorm.weight",)),
    ("pre_mlp_layernorm.weight", ("pre_feedforward_layernorm.weight",)),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    ("post_mlp_layernorm.weight", ("post_feedforward_layernorm.weight",)),
)
READ = ("softmax_scale", "final_logit_softcapping", "attn_logit_softcapping", "rotary_base_local")  # per model
FEATURES = {**{k: v for k, v in llama.WINDOWED.items() if k not in READ}, "swiglu": False, "openai_gelu": True,
            "gated_linear_unit": True, "apply_layernorm_1p": True, "post_layernorms": True, "scale_embeddings": True}
GELU_TANH = "gelu_pytorch_tanh"


def activation(hf: dict) -> str:
    return hf.get("hidden_activation") or hf.get("hidden_act") or GELU_TANH


COMMON_REFUSALS = (
    Refusal("hidden_activation", f"GeGLU with {GELU_TANH} only", lambda v, hf: v == GELU_TANH, activation),
    must_be("attention_bias", False, "no attention biases"),
    Refusal("use_bidirectional_attention", "causal attention (not EmbeddingGemma's bidirectional)",
            lambda v, hf: not v, lambda hf: hf.get("use_bidirectional_attention")),
    sliding.LAYER_TYPES_REFUSAL,
)


def window_in(hf: dict, every: int) -> dict:
    """The window on the layers `layer_types` names (absent: all but every `every`-th, 1-based)."""
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                      for i in range(hf["num_hidden_layers"])]
    pattern = [int(t == "sliding_attention") for t in types]
    return sliding.window_args(hf.get("sliding_window") if any(pattern) else None, pattern)


def common_in(hf: dict) -> dict:
    """The sizes and settings both Gemmas spell alike (llama's, with Gemma's own attention scale)."""
    # each Gemma reads its own rope (Gemma 3's is nested per layer type): llama's reader sees a plain one
    out = llama.config_in({**hf, "rope_parameters": {"rope_theta": 10000.0}, "rope_scaling": None})
    return {**out, "softmax_scale": float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
            "final_logit_softcapping": hf.get("final_logit_softcapping"),
            "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", True)}


def common_out(cfg: ModelConfig, base: dict) -> dict:
    """Both Gemmas' keys for a model (every layer's type, the window, Gemma's attention scale)."""
    scalar = cfg.attention.scale ** -2
    out = dict(rope_theta=DROP, rope_scaling=DROP, num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
               intermediate_size=cfg.mlp.ffn_hidden_size, num_attention_heads=cfg.attention.heads,
               num_key_value_heads=cfg.attention.groups, head_dim=cfg.attention.head_dim,
               max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm.eps,
               hidden_activation=GELU_TANH, attention_bias=False,
               query_pre_attn_scalar=int(round(scalar)) if abs(scalar - round(scalar)) < 1e-6 else scalar,
               final_logit_softcapping=cfg.final_softcap,
               sliding_window=sliding.tokens_of(cfg) or base.get("sliding_window") or 4096,
               layer_types=[sliding.LAYER_TYPES[w] for w in cfg.window_pattern()])
    if "hidden_act" in base:
        out["hidden_act"] = GELU_TANH
    return out


# ---- Gemma 2 -----------------------------------------------------------------------------------------------
def gemma2_in(hf: dict) -> dict:
    return {**common_in(hf), **llama.rope_in(hf), **window_in(hf, 2),
            "attn_logit_softcapping": hf.get("attn_logit_softcapping")}


def gemma2_out(cfg: ModelConfig, base: dict) -> dict:
    return {**common_out(cfg, base), "rope_parameters": llama.rope_out(cfg.rope),
            "attn_logit_softcapping": cfg.attention.softcap}


GEMMA2 = HFFamily("gemma2", "Gemma2ForCausalLM", tuple(r for r in LAYER if "q_layernorm" not in r.megatron
                                                        and "k_layernorm" not in r.megatron),
                  llama.GLOBAL, {**FEATURES, "rotary_base_local": None}, gemma2_in, gemma2_out,
                  COMMON_REFUSALS + (llama.ROPE_TYPE, llama.INTEGER_BASE), moe_sibling=None)


# ---- Gemma 3 -----------------------------------------------------------------------------------------------
def gemma3_ropes(hf: dict) -> tuple[dict, dict]:
    """(full_attention's, sliding_attention's) rope parameters: transformers 5's nested
    `rope_parameters`, or the older rope_theta (+ rope_scaling) and rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full, local = {**(hf.get("rope_scaling") or {}), **params}, {}
        full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
        local["rope_theta"] = hf.get("rope_local_base_freq", 1e4)
    full.setdefault("rope_theta", 1e6)
    local.setdefault("rope_theta", 1e4)
    return full, local


def _local_rope(hf: dict) -> dict:
    return gemma3_ropes(hf)[1]


GEMMA3_REFUSALS = COMMON_REFUSALS + (
    Refusal("rope_type", "plain rope, llama3 scaling, linear interpolation or yarn on the global layers",
            lambda v, hf: v in llama.ROPE_TYPES,
            lambda hf: llama.rope_parameters({"rope_parameters": gemma3_ropes(hf)[0]})["rope_type"]),
    Refusal("rope_parameters.sliding_attention", "a plain rope with an integer base on the local layers",
            lambda v, hf: v.get("rope_type", "default") == "default" and float(v["rope_theta"]).is_integer(),
            _local_rope),
    Refusal("rope_theta", "an integer rope base", lambda v, hf: float(v).is_integer(),
            lambda hf: gemma3_ropes(hf)[0]["rope_theta"]),
)


def gemma3_in(hf: dict) -> dict:
    full, local = gemma3_ropes(hf)
    return {**common_in(hf), **llama.rope_in({**hf, "rope_parameters": full}), **window_in(hf, 6),
            "rotary_base_local": int(local["rope_theta"])}


def gemma3_out(cfg: ModelConfig, base: dict) -> dict:
    if cfg.rope.local_base is None:
        raise Unsupported("rotary_base_local: Gemma 3 names a rope for its sliding-window layers; set one")
    local = {"rope_type": "default", "rope_theta": float(cfg.rope.local_base)}
    return {**common_out(cfg, base), "rope_local_base_freq": DROP,
            "rope_parameters": {"full_attention": llama.rope_out(cfg.rope), "sliding_attention": local}}


GEMMA3 = dataclasses.replace(GEMMA2, model_type="gemma3_text", architecture="Gemma3ForCausalLM", layer=LAYER,
                             features={**FEATURES, "qk_layernorm": True, "attn_logit_softcapping": None},
                             config_in=gemma3_in, config_out=gemma3_out, refusals=GEMMA3_REFUSALS)
