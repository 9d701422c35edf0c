"""GPT-2 (`GPT2LMHeadModel`): LayerNorm, GELU (exact or tanh), MHA, learned positions, biases, tied.
Its Conv1D weights are stored transposed ([in, out]), and c_attn holds [q | k | v]."""
from __future__ import annotations

from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.family import PLAIN_BLOCK, HFFamily, Refusal, Rule, layer_rules, must_be

LAYER = layer_rules(
    "transformer.h.{i}.",
    ("input_layernorm.weight", ("ln_1.weight",)),
    ("input_layernorm.bias", ("ln_1.bias",)),
    ("self_attention.linear_qkv.weight", ("attn.c_attn.weight",), "conv1d_qkv"),
    ("self_attention.linear_qkv.bias", ("attn.c_attn.bias",), "conv1d_qkv"),
    ("self_attention.linear_proj.weight", ("attn.c_proj.weight",), "conv1d"),
    ("self_attention.linear_proj.bias", ("attn.c_proj.bias",)),
    ("pre_mlp_layernorm.weight", ("ln_2.weight",)),
    ("pre_mlp_layernorm.bias", ("ln_2.bias",)),
    ("mlp.linear_fc1.weight", ("mlp.c_fc.weight",), "conv1d"),
    ("mlp.linear_fc1.bias", ("mlp.c_fc.bias",)),
    ("mlp.linear_fc2.weight", ("mlp.c_proj.weight",), "conv1d"),
    ("mlp.linear_fc2.bias", ("mlp.c_proj.bias",)),
)
GLOBAL = (Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",)),
          Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
          Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
          Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
          Rule("output_layer.weight", ("lm_head.weight",)))

FEATURES = {"normalization": "LayerNorm", "swiglu": False, "position_embedding_type": "learned_absolute",
            "add_bias_linear": True, "qk_layernorm": False, "rotary_percent": 1.0,
            "untie_embeddings_and_output_weights": False, "num_moe_experts": None, "gated_linear_unit": False,
            "window_size": None, **PLAIN_BLOCK}
GELUS = {"gelu_new": True, "gelu": False}  # activation_function -> openai_gelu (the tanh approximation)

REFUSALS = (
    Refusal("activation_function", "GELU, exact or its tanh approximation", lambda v, hf: v in GELUS,
            lambda hf: hf.get("activation_function", "gelu_new")),
    must_be("scale_attn_by_inverse_layer_idx", False, "attention scaled by 1/sqrt(head_dim) alone"),
    must_be("scale_attn_weights", True, "attention scaled by 1/sqrt(head_dim)"),
)


def config_in(hf: dict) -> dict:
    h = hf["n_embd"]
    return dict(num_layers=hf["n_layer"], hidden_size=h, num_attention_heads=hf["n_head"],
                ffn_hidden_size=hf.get("n_inner") or 4 * h, padded_vocab_size=hf["vocab_size"],
                vocab_size=hf["vocab_size"], max_position_embeddings=hf["n_positions"],
                norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
                openai_gelu=GELUS[hf.get("activation_function", "gelu_new")],
                init_method_std=float(hf.get("initializer_range", 0.02)))


def config_out(cfg: ModelConfig, base: dict) -> dict:
    default_inner = cfg.mlp.ffn_hidden_size == 4 * cfg.hidden_size
    return dict(n_layer=cfg.num_layers, n_embd=cfg.hidden_size, n_head=cfg.attention.heads,
                n_inner=None if default_inner else cfg.mlp.ffn_hidden_size, n_positions=cfg.max_position_embeddings,
                layer_norm_epsilon=cfg.norm.eps,
                activation_function="gelu_new" if cfg.mlp.activation == "gelu_tanh" else "gelu")


def requires(cfg: ModelConfig) -> dict:
    """Multi-head attention with the head size GPT-2 implies."""
    return {"num_query_groups": cfg.attention.heads, "kv_channels": cfg.hidden_size // cfg.attention.heads}


FAMILY = HFFamily("gpt2", "GPT2LMHeadModel", LAYER, GLOBAL, FEATURES, config_in, config_out, REFUSALS,
                  requires=requires)
