"""Llama (`LlamaForCausalLM`): RMSNorm, SwiGLU, GQA, rope, no biases. The other llama-like families
(mistral, qwen2/3 and their MoE kin) are this record with a few changes (`llama_like`)."""
from __future__ import annotations

import dataclasses

from scalegrow.core.config import ModelConfig
from scalegrow.core.rope_config import Rope
from scalegrow.formats.hf.family import (DROP, PLAIN_BLOCK, HFFamily, Refusal, Rule, Unsupported, layer_rules,
                                         must_be)

LAYER = layer_rules(
    "model.layers.{i}.",
    ("input_layernorm.weight", ("input_layernorm.weight",)),
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), "qkv"),
    ("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
     "qkv"),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",)),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
)
ATTENTION = tuple(r for r in LAYER if not r.megatron.startswith("mlp."))  # what the MoE kin keep
GLOBAL = (Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
          Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
          Rule("output_layer.weight", ("lm_head.weight",)))

FEATURES = {"normalization": "RMSNorm", "swiglu": True, "openai_gelu": False, "position_embedding_type": "rope",
            "rotary_percent": 1.0, "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False,
            "num_moe_experts": None, "window_size": None, **PLAIN_BLOCK}
WINDOWED = {k: v for k, v in FEATURES.items() if k != "window_size"}  # what the sliding-window kin keep fixed


def rope_parameters(hf: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; earlier ones in `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))  # transformers 4.3x spelled it `type`
    return params


ROPE_TYPES = ("default", "llama3", "linear", "yarn")  # what the reference model reproduces
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None,
                 "attention_factor": None, "truncate": True}  # transformers' when a key is absent


def rope_in(hf: dict) -> dict:
    """The flat rope values of a config.json: base, and Llama 3's scaling or linear interpolation."""
    params = rope_parameters(hf)
    out = dict(rotary_base=int(params["rope_theta"]), use_rope_scaling=params["rope_type"] == "llama3")
    if params["rope_type"] == "linear":
        out["rotary_seq_len_interpolation_factor"] = float(params["factor"])
    if out["use_rope_scaling"]:
        out.update(rope_scaling_factor=float(params["factor"]),
                   rope_scaling_low_freq_factor=float(params["low_freq_factor"]),
                   rope_scaling_high_freq_factor=float(params["high_freq_factor"]),
                   rope_scaling_original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    if params["rope_type"] == "yarn":
        out.update(yarn_in(params, hf))
    return out


def yarn_in(params: dict, hf: dict) -> dict:
    """YaRN's flat values; a missing factor is max_position_embeddings / original (DeepSeek's spelling)."""
    original = int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                   or hf["max_position_embeddings"])
    factor = params.get("factor") or hf["max_position_embeddings"] / original
    given = {k: params.get(k, d) for k, d in YARN_DEFAULTS.items()}
    return dict(use_yarn=True, yarn_rotary_scaling_factor=float(factor), yarn_original_max_position_embeddings=original,
                yarn_beta_fast=float(given["beta_fast"] or 32.0), yarn_beta_slow=float(given["beta_slow"] or 1.0),
                yarn_mscale=given["mscale"], yarn_mscale_all_dim=given["mscale_all_dim"],
                yarn_attention_factor=given["attention_factor"], yarn_correction_range_round_to_int=given["truncate"])


def rope_out(rope: Rope) -> dict:
    """transformers 5's `rope_parameters` for a model's rope (a rope scaled both ways has no HF spelling)."""
    out = {"rope_theta": float(rope.base), "rope_type": "default"}
    if rope.scaling is not None and rope.interpolation is not None:
        raise Unsupported("rotary_seq_len_interpolation_factor: transformers has no rope_type for Llama 3's scaling "
                          "together with linear interpolation")
    if rope.interpolation is not None:
        out.update(rope_type="linear", factor=rope.interpolation)
    if rope.scaling is not None:
        s = rope.scaling
        out.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                   high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_position)
    if rope.yarn is not None:  # the optional keys only where they are not transformers' defaults
        y = rope.yarn
        given = {"beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale,
                 "mscale_all_dim": y.mscale_all_dim, "attention_factor": y.attention_factor, "truncate": y.truncate}
        out.update(rope_type="yarn", factor=y.factor, original_max_position_embeddings=y.original_max_position,
                   **{k: v for k, v in given.items() if v != YARN_DEFAULTS[k]})
    return out


SILU = must_be("hidden_act", "silu", "SwiGLU with SiLU only")
INTEGER_BASE = Refusal("rope_theta", "an integer rope base", lambda v, hf: float(v).is_integer(),
                       lambda hf: rope_parameters(hf)["rope_theta"])
ROPE_TYPE = Refusal("rope_type", "plain rope, llama3 scaling, linear interpolation or yarn",
                    lambda v, hf: v in ROPE_TYPES, lambda hf: rope_parameters(hf)["rope_type"])
ATTENTION_REFUSALS = (
    SILU,
    must_be("attention_bias", False, "no bias on o_proj alone"),
    must_be("mlp_bias", False, "no MLP biases without attention biases"),
    ROPE_TYPE,
    INTEGER_BASE,
    must_be("partial_rotary_factor", 1.0, "rope over the whole head"),
)
FULL_ATTENTION = Refusal("layer_types", "full attention in every layer", lambda v, hf: v == ["full_attention"],
                         lambda hf: sorted(set(hf.get("layer_types") or ["full_attention"])))
REFUSALS = ATTENTION_REFUSALS + (FULL_ATTENTION,)


def config_in(hf: dict) -> dict:
    heads = hf["num_attention_heads"]
    return dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_hidden_size=hf["intermediate_size"],
        padded_vocab_size=hf["vocab_size"], vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        **rope_in(hf),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=float(hf.get("initializer_range", 0.02)))


def config_out(cfg: ModelConfig, base: dict) -> dict:
    """The llama keys; rope's in transformers 5's `rope_parameters` (the older spellings dropped)."""
    out = dict(rope_theta=DROP, rope_scaling=DROP, num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
               intermediate_size=cfg.mlp.ffn_hidden_size, num_attention_heads=cfg.attention.heads,
               num_key_value_heads=cfg.attention.groups, head_dim=_head_dim(cfg, base),
               max_position_embeddings=cfg.max_position_embeddings,
               rms_norm_eps=cfg.norm.eps, hidden_act="silu",
               rope_parameters=_keeping_given(rope_out(cfg.rope), base.get("rope_parameters")))
    if "layer_types" in base:  # one entry a layer; only full attention is read (see REFUSALS)
        out["layer_types"] = ["full_attention"] * cfg.num_layers
    return out


def _keeping_given(rope: dict, given: dict | None) -> dict:
    """`rope` with the source's own spelling of the same rope type kept (keys it wrote at their defaults)."""
    if not given or given.get("rope_type") != rope["rope_type"]:
        return rope
    return {**given, **rope}


def _head_dim(cfg: ModelConfig, base: dict) -> int | None:
    """kv_channels, or None where the source left it implied (Mixtral's config: hidden / heads)."""
    implied = cfg.attention.head_dim == cfg.hidden_size // cfg.attention.heads
    return None if implied and "head_dim" in base and base["head_dim"] is None else cfg.attention.head_dim


def without_attention_bias(out):
    """A `config_out` that also says `attention_bias: false` (the families whose config has the key)."""
    return lambda cfg, base: {**out(cfg, base), "attention_bias": False}


FAMILY = HFFamily("llama", "LlamaForCausalLM", LAYER, GLOBAL, FEATURES, config_in,
                  without_attention_bias(config_out), REFUSALS, moe_sibling="mixtral")


def llama_like(model_type: str, architecture: str, **changes) -> HFFamily:
    """Llama's record with other names, features, refusals or rules."""
    return dataclasses.replace(FAMILY, model_type=model_type, architecture=architecture, **changes)
