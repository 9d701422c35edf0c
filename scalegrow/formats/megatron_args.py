"""Megatron-LM's `args` Namespace <-> `ModelConfig`: what a Megatron checkpoint says its model is
(`args` in every legacy rank file and in torch_dist's `common.pt`), and the args a written one carries."""
from __future__ import annotations

import argparse
from typing import Any

import torch

from scalegrow.core.config import ModelConfig
from scalegrow.core.features import MoE
from scalegrow.core.mla_config import MLA
from scalegrow.core.rope_config import RopeScaling
from scalegrow.formats import hybrid


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The model Megatron-LM's args describe (their defaults where a key is absent); a HybridModel
    run's (`hybrid_layer_pattern`) as the GPT model its `*-` pairs are."""
    a = _gpt_view(vars(args))
    gqa = bool(a.get("group_query_attention"))
    flat = dict(
        num_layers=a["num_layers"], hidden_size=a["hidden_size"], num_attention_heads=a["num_attention_heads"],
        padded_vocab_size=a["padded_vocab_size"], ffn_hidden_size=a.get("ffn_hidden_size"),
        num_query_groups=a.get("num_query_groups") if gqa else None, kv_channels=a.get("kv_channels"),
        max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length") or 2048,
        normalization=a.get("normalization", "LayerNorm"),
        norm_epsilon=float(a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))),
        swiglu=bool(a.get("swiglu", False)), openai_gelu=bool(a.get("openai_gelu", False)),
        position_embedding_type=a.get("position_embedding_type", "learned_absolute"),
        rotary_base=int(a.get("rotary_base", 10000)), rotary_percent=float(a.get("rotary_percent", 1.0)),
        untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights", False)),
        add_bias_linear=bool(a.get("add_bias_linear", True)), add_qkv_bias=bool(a.get("add_qkv_bias", False)),
        qk_layernorm=bool(a.get("qk_layernorm", False)), init_method_std=float(a.get("init_method_std", 0.02)),
        make_vocab_size_divisible_by=int(a.get("make_vocab_size_divisible_by", 128)), vocab_size=a.get("vocab_size"),
        window_size=a.get("window_size"), window_attn_skip_freq=a.get("window_attn_skip_freq"),
        **_rope_scaling_from_args(a), **_moe_from_args(a), **_mla_from_args(a))
    return ModelConfig.from_flat(flat)


# Megatron-LM's spelling of MLA's YaRN (--rope-type yarn, its MLATransformerConfig names) -> the Yarn record's
MLA_YARN = {"rotary_scaling_factor": "yarn_rotary_scaling_factor", "mscale": "yarn_mscale",
            "mscale_all_dim": "yarn_mscale_all_dim", "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow",
            "original_max_position_embeddings": "yarn_original_max_position_embeddings"}
MLA_YARN_DEFAULTS = {"rotary_scaling_factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.0, "beta_fast": 32.0,
                     "beta_slow": 1.0, "original_max_position_embeddings": 4096}  # MLATransformerConfig's


def _mla_from_args(a: dict[str, Any]) -> dict[str, Any]:
    """Multi-latent attention's sizes and, under --rope-type yarn (MLA's default), its YaRN."""
    if not a.get("multi_latent_attention"):
        return {}
    out = {key: a[key] for key in MLA.flat_keys() if key in a}
    if (a.get("rope_type") or "yarn") == "yarn":
        out.update({"use_yarn": True, **{ours: a.get(theirs, MLA_YARN_DEFAULTS[theirs]) for theirs, ours in
                                         MLA_YARN.items()}})
    return out


def _mla_to_args(cfg: ModelConfig) -> dict[str, Any]:
    """Megatron-LM's MLA rope arguments (the record's own keys are in `cfg.to_dict()` already)."""
    if cfg.mla is None:
        return {}
    yarn = cfg.rope.yarn
    if yarn is None:
        return {"rope_type": "rope", "mscale_all_dim": 0.0}
    values = {"rotary_scaling_factor": yarn.factor, "mscale": yarn.mscale or 1.0, "mscale_all_dim": yarn.mscale_all_dim
              or 0.0, "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow,
              "original_max_position_embeddings": yarn.original_max_position}
    return {"rope_type": "yarn", **values}


def _rope_scaling_from_args(a: dict[str, Any]) -> dict[str, Any]:
    """Llama 3's rope scaling (--use-rope-scaling --rope-scaling-factor; the other constants are
    `RopeScaling`'s defaults, megatron-core's, unless scalegrow wrote others) and linear interpolation
    (--rotary-seq-len-interpolation-factor), as the args spell them."""
    keys = ("rotary_seq_len_interpolation_factor", "use_rope_scaling", *RopeScaling.flat_keys())
    return {key: a[key] for key in keys if a.get(key) is not None}


def _gpt_view(a: dict[str, Any]) -> dict[str, Any]:
    """A HybridModel run's args as a GPTModel run's: one layer per `*-` pair, MoE where they are `*E`."""
    pattern = hybrid.pattern_of(argparse.Namespace(**a))
    if pattern is None:
        return a
    moe = hybrid.MOE in pattern
    if moe and not a.get("num_experts"):
        raise ValueError(f"hybrid_layer_pattern {pattern!r} has MoE layers ('E') but num_experts is not set")
    return {**a, "num_layers": hybrid.gpt_layers(pattern), "num_experts": a.get("num_experts") if moe else None,
            "moe_layer_freq": 1}


def _moe_from_args(a: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields from Megatron-LM args (`num_experts`, `moe_*`): every key the MoE record spells
    that the args hold (megatron-core's defaults for the others)."""
    if not a.get("num_experts"):
        return {}
    freq = a.get("moe_layer_freq", 1)
    if not isinstance(freq, (int, list, tuple)):
        raise ValueError(f"moe_layer_freq: an every-Nth-layer integer or one 0/1 per layer, got {freq!r}")
    keys = (set(MoE.flat_keys()) - {"num_moe_experts"})
    return {**{key: a[key] for key in keys if a.get(key) is not None},
            "num_moe_experts": int(a["num_experts"]), "moe_aux_loss_coeff": float(a.get("moe_aux_loss_coeff") or 0.0)}


def config_to_args(cfg: ModelConfig, base: argparse.Namespace | None = None, *, tp: int = 1,
                   pp: int = 1) -> argparse.Namespace:
    """A copy of `base` (or fresh Megatron-style args) describing `cfg` at TP/PP."""
    args = argparse.Namespace(**vars(base)) if base is not None else _default_args()
    updates = cfg.to_dict()
    updates.update(group_query_attention=cfg.attention.groups != cfg.attention.heads,
                   layernorm_epsilon=cfg.norm.eps, tensor_model_parallel_size=tp,
                   pipeline_model_parallel_size=pp, gated_linear_unit=cfg.mlp.gated)
    if base is not None and not hasattr(base, "layernorm_epsilon"):
        updates.pop("layernorm_epsilon")
    if base is not None and not hasattr(base, "gated_linear_unit"):
        updates.pop("gated_linear_unit")
    if cfg.vocab_size is None:
        updates.pop("vocab_size")
    updates["num_experts"] = updates.pop("num_moe_experts")  # Megatron-LM's name
    updates.update(_mla_to_args(cfg))
    if updates["window_size"] is not None:  # Megatron-LM parses --window-size into a tuple
        updates["window_size"] = tuple(updates["window_size"])
    if getattr(args, "seq_length", None) is None:
        updates["seq_length"] = cfg.max_position_embeddings
    for key, value in updates.items():
        setattr(args, key, value)
    return args


def _default_args() -> argparse.Namespace:
    """The Megatron-LM arguments a fresh checkpoint carries besides the model shape."""
    return argparse.Namespace(
        iteration=0, params_dtype=torch.float32, fp16=False, bf16=False,
        tokenizer_type="NullTokenizer", consumed_train_samples=0, consumed_valid_samples=0,
        attention_dropout=0.0, hidden_dropout=0.0, apply_residual_connection_post_layernorm=False,
        transformer_impl="local", use_legacy_models=False, rotary_interleaved=False,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
    )
