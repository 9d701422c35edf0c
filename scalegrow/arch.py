"""Tensor specs: every weight of a megatron-core GPT, its role, TP split axis and fused layout.

Names are data here (mergekit style). Checkpoint code shards by `tp_axis` and `layout`; growth
operators dispatch on `role`. Layer names are relative to `decoder.layers.{i}.`.
"""
from __future__ import annotations

from dataclasses import dataclass

from scalegrow.config import ModelConfig

LAYER_PREFIX = "decoder.layers."

# layouts
PLAIN = "plain"  # split/concat along tp_axis
QKV = "qkv"  # rows [ng, (np/ng + 2), hn]: each TP rank holds ng/TP whole groups (a plain row split)
SWIGLU = "swiglu"  # fc1 rows [gate; up]: each TP rank holds [gate_r; up_r]
VOCAB = "vocab"  # rows are (padded) vocabulary entries, split along rows


@dataclass(frozen=True)
class TensorSpec:
    name: str
    role: str  # what the tensor is, for growth operators
    tp_axis: int | None  # None: replicated on every TP rank
    layout: str = PLAIN


def layer_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The tensors of one transformer layer, in megatron-core's state-dict order."""
    swiglu = SWIGLU if cfg.swiglu else PLAIN
    specs = [TensorSpec("input_layernorm.weight", "norm_weight", None)]
    if cfg.has_norm_bias:
        specs.append(TensorSpec("input_layernorm.bias", "norm_bias", None))
    specs.append(TensorSpec("self_attention.linear_proj.weight", "proj_weight", 1))
    if cfg.has_linear_bias:
        specs.append(TensorSpec("self_attention.linear_proj.bias", "out_bias", None))
    specs.append(TensorSpec("self_attention.linear_qkv.weight", "qkv_weight", 0, QKV))
    if cfg.has_qkv_bias:
        specs.append(TensorSpec("self_attention.linear_qkv.bias", "qkv_bias", 0, QKV))
    specs.append(TensorSpec("pre_mlp_layernorm.weight", "norm_weight", None))
    if cfg.has_norm_bias:
        specs.append(TensorSpec("pre_mlp_layernorm.bias", "norm_bias", None))
    specs.append(TensorSpec("mlp.linear_fc1.weight", "fc1_weight", 0, swiglu))
    if cfg.has_linear_bias:
        specs.append(TensorSpec("mlp.linear_fc1.bias", "fc1_bias", 0, swiglu))
    specs.append(TensorSpec("mlp.linear_fc2.weight", "fc2_weight", 1))
    if cfg.has_linear_bias:
        specs.append(TensorSpec("mlp.linear_fc2.bias", "out_bias", None))
    return specs


# Modules whose `_extra_state` megatron-core's local spec puts in every state dict.
LAYER_EXTRA_STATE = ("self_attention.linear_proj._extra_state", "self_attention.linear_qkv._extra_state",
                     "mlp.linear_fc1._extra_state", "mlp.linear_fc2._extra_state")
OUTPUT_EXTRA_STATE = "output_layer._extra_state"

# Transformer-Engine spec spellings of the same tensors (the norm fused into the next linear).
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
POSITION_EMBEDDINGS = "embedding.position_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


def embedding_specs(cfg: ModelConfig) -> list[TensorSpec]:
    specs = [TensorSpec(WORD_EMBEDDINGS, "word_embeddings", 0, VOCAB)]
    if cfg.position_embedding_type == "learned_absolute":
        specs.append(TensorSpec(POSITION_EMBEDDINGS, "position_embeddings", None))
    return specs


def head_specs(cfg: ModelConfig, pp: int = 1) -> list[TensorSpec]:
    """Final norm and output layer. Tied models store `output_layer.weight` only when PP > 1,
    where the last stage keeps its own copy of the word embeddings (DESIGN §4)."""
    specs = [TensorSpec("decoder.final_layernorm.weight", "final_norm_weight", None)]
    if cfg.has_norm_bias:
        specs.append(TensorSpec("decoder.final_layernorm.bias", "final_norm_bias", None))
    if cfg.untie_embeddings_and_output_weights or pp > 1:
        specs.append(TensorSpec(OUTPUT_LAYER, "output_layer", 0, VOCAB))
    return specs


def layer_key(index: int, name: str) -> str:
    return f"{LAYER_PREFIX}{index}.{name}"


def split_layer_key(key: str) -> tuple[int, str] | None:
    """`decoder.layers.3.mlp.linear_fc1.weight` -> (3, 'mlp.linear_fc1.weight'); None if not a layer key."""
    if not key.startswith(LAYER_PREFIX):
        return None
    index, _, name = key[len(LAYER_PREFIX):].partition(".")
    return (int(index), name) if index.isdigit() else None


def canonical_layer_name(name: str) -> str:
    return TE_ALIASES.get(name, name)
