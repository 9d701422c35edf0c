"""The model family record: every weight of a megatron-core GPT, its role, full shape, TP split axis
and packing.

Names are data here (mergekit style). Checkpoint formats shard by `tp_axis` and `packing`; operators
dispatch on `role`; `full_shape` is the one table of unsharded shapes. Layer names are relative to
`decoder.layers.{i}.`. A family lists its tensors per *layer type*, so a new kind of layer (say MoE
experts) is a new record and new operator rules, not edits across the package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from scalegrow.core.config import ModelConfig

LAYER_PREFIX = "decoder.layers."
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
POSITION_EMBEDDINGS = "embedding.position_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


class Role:
    """What a tensor is, for operators and for the shape table."""

    NORM_WEIGHT = "norm_weight"  # input_layernorm / pre_mlp_layernorm γ
    NORM_BIAS = "norm_bias"
    POST_NORM_WEIGHT = "post_norm_weight"  # post_self_attn / post_mlp layernorm γ: a block output's norm
    OUT_BIAS = "out_bias"  # linear_proj / linear_fc2 bias: writes the residual stream
    QKV_WEIGHT = "qkv_weight"
    QKV_BIAS = "qkv_bias"
    QK_NORM_WEIGHT = "qk_norm_weight"  # q_layernorm / k_layernorm over one head's dimension
    QK_NORM_BIAS = "qk_norm_bias"
    Q_NORM_ALL_WEIGHT = "q_norm_all_weight"  # OLMo 2: one norm over every q head's dimensions at once
    K_NORM_ALL_WEIGHT = "k_norm_all_weight"  # ... and over every query group's k
    PROJ_WEIGHT = "proj_weight"
    # multi-latent attention (core/mla_config.py): the latents' down projections, their norms, the ups
    MLA_Q_DOWN_WEIGHT = "mla_q_down_weight"  # [q_lora_rank, hidden]
    MLA_Q_UP_WEIGHT = "mla_q_up_weight"  # [heads * (qk_head_dim + rope), q_lora_rank]
    MLA_Q_WEIGHT = "mla_q_weight"  # [heads * (qk_head_dim + rope), hidden]: q without a latent
    MLA_KV_DOWN_WEIGHT = "mla_kv_down_weight"  # [kv_lora_rank + rope, hidden]: the KV latent; the shared rope key
    MLA_KV_UP_WEIGHT = "mla_kv_up_weight"  # [heads * (qk_head_dim + v_head_dim), kv_lora_rank]
    Q_LATENT_NORM_WEIGHT = "q_latent_norm_weight"  # [q_lora_rank]
    KV_LATENT_NORM_WEIGHT = "kv_latent_norm_weight"  # [kv_lora_rank]
    FC1_WEIGHT = "fc1_weight"
    FC1_BIAS = "fc1_bias"
    FC2_WEIGHT = "fc2_weight"
    ROUTER_WEIGHT = "router_weight"  # MoE: [experts, hidden] logits, replicated
    ROUTER_BIAS = "router_bias"  # with add_bias_linear, as megatron-core's TopKRouter has
    ROUTER_EXPERT_BIAS = "router_expert_bias"  # [experts] fp32: added to the scores that choose (DeepSeek-V3)
    EXPERT_FC1_WEIGHT = "expert_fc1_weight"  # one expert's fc1/fc2 (its fc2 bias is an OUT_BIAS)
    EXPERT_FC1_BIAS = "expert_fc1_bias"
    EXPERT_FC2_WEIGHT = "expert_fc2_weight"
    SHARED_FC1_WEIGHT = "shared_fc1_weight"  # the shared expert: an always-on FFN in an MoE layer
    SHARED_FC2_WEIGHT = "shared_fc2_weight"
    SHARED_GATE_WEIGHT = "shared_gate_weight"  # [1, hidden]: sigmoid gate on the shared expert's output
    WORD_EMBEDDINGS = "word_embeddings"
    POSITION_EMBEDDINGS = "position_embeddings"
    FINAL_NORM_WEIGHT = "final_norm_weight"
    FINAL_NORM_BIAS = "final_norm_bias"
    OUTPUT_LAYER = "output_layer"


# How a tensor's rows are packed, which decides how TP splits them.
PLAIN = "plain"  # split/concat along tp_axis
QKV = "qkv"  # rows [ng, (np/ng + 2), hn]: each TP rank holds ng/TP whole groups (a plain row split)
SWIGLU = "swiglu"  # fc1 rows [gate; up]: each TP rank holds [gate_r; up_r]
VOCAB = "vocab"  # rows are (padded) vocabulary entries, split along rows


@dataclass(frozen=True)
class TensorSpec:
    name: str
    role: str  # a `Role`
    tp_axis: int | None  # None: replicated on every TP rank
    packing: str = PLAIN


FULL_SHAPES: dict[str, Callable[[ModelConfig], tuple[int, ...]]] = {
    Role.NORM_WEIGHT: lambda c: (c.hidden_size,),
    Role.NORM_BIAS: lambda c: (c.hidden_size,),
    Role.POST_NORM_WEIGHT: lambda c: (c.hidden_size,),
    Role.OUT_BIAS: lambda c: (c.hidden_size,),
    Role.QKV_WEIGHT: lambda c: (c.attention.qkv_rows, c.hidden_size),
    Role.QKV_BIAS: lambda c: (c.attention.qkv_rows,),
    Role.QK_NORM_WEIGHT: lambda c: (c.attention.head_dim,),
    Role.QK_NORM_BIAS: lambda c: (c.attention.head_dim,),
    Role.Q_NORM_ALL_WEIGHT: lambda c: (c.attention.heads * c.attention.head_dim,),
    Role.K_NORM_ALL_WEIGHT: lambda c: (c.attention.groups * c.attention.head_dim,),
    Role.PROJ_WEIGHT: lambda c: (c.hidden_size, c.proj_in),
    Role.MLA_Q_DOWN_WEIGHT: lambda c: (c.mla.q_lora_rank, c.hidden_size),
    Role.MLA_Q_UP_WEIGHT: lambda c: (c.mla.q_rows(c.attention.heads), c.mla.q_lora_rank),
    Role.MLA_Q_WEIGHT: lambda c: (c.mla.q_rows(c.attention.heads), c.hidden_size),
    Role.MLA_KV_DOWN_WEIGHT: lambda c: (c.mla.kv_down_rows, c.hidden_size),
    Role.MLA_KV_UP_WEIGHT: lambda c: (c.mla.kv_up_rows(c.attention.heads), c.mla.kv_lora_rank),
    Role.Q_LATENT_NORM_WEIGHT: lambda c: (c.mla.q_lora_rank,),
    Role.KV_LATENT_NORM_WEIGHT: lambda c: (c.mla.kv_lora_rank,),
    Role.FC1_WEIGHT: lambda c: (c.mlp.fc1_rows, c.hidden_size),
    Role.FC1_BIAS: lambda c: (c.mlp.fc1_rows,),
    Role.FC2_WEIGHT: lambda c: (c.hidden_size, c.mlp.ffn_hidden_size),
    Role.ROUTER_WEIGHT: lambda c: (c.moe.num_experts, c.hidden_size),
    Role.ROUTER_BIAS: lambda c: (c.moe.num_experts,),
    Role.ROUTER_EXPERT_BIAS: lambda c: (c.moe.num_experts,),
    Role.EXPERT_FC1_WEIGHT: lambda c: (c.mlp.rows(c.moe.ffn_hidden_size), c.hidden_size),
    Role.EXPERT_FC1_BIAS: lambda c: (c.mlp.rows(c.moe.ffn_hidden_size),),
    Role.EXPERT_FC2_WEIGHT: lambda c: (c.hidden_size, c.moe.ffn_hidden_size),
    Role.SHARED_FC1_WEIGHT: lambda c: (c.mlp.rows(c.moe.shared_size), c.hidden_size),
    Role.SHARED_FC2_WEIGHT: lambda c: (c.hidden_size, c.moe.shared_size),
    Role.SHARED_GATE_WEIGHT: lambda c: (1, c.hidden_size),
    Role.WORD_EMBEDDINGS: lambda c: (c.padded_vocab_size, c.hidden_size),
    Role.POSITION_EMBEDDINGS: lambda c: (c.max_position_embeddings, c.hidden_size),
    Role.FINAL_NORM_WEIGHT: lambda c: (c.hidden_size,),
    Role.FINAL_NORM_BIAS: lambda c: (c.hidden_size,),
    Role.OUTPUT_LAYER: lambda c: (c.padded_vocab_size, c.hidden_size),
}


EXPERT_BIAS = "mlp.router.expert_bias"  # DeepSeek's routing bias: megatron-core keeps it in fp32
MLA_ROLES = (Role.MLA_Q_WEIGHT, Role.MLA_Q_DOWN_WEIGHT, Role.MLA_Q_UP_WEIGHT, Role.MLA_KV_DOWN_WEIGHT,
             Role.MLA_KV_UP_WEIGHT, Role.Q_LATENT_NORM_WEIGHT, Role.KV_LATENT_NORM_WEIGHT)


def always_fp32(key: str) -> bool:
    """Whether a Megatron state-dict key (of any layout: per layer, stacked, stage-local) is one kept
    in fp32 whatever the checkpoint's dtype (a reader tells the checkpoint's dtype by the others)."""
    return key.endswith(EXPERT_BIAS)


def stored_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint of `dtype` stores the tensor under `key` in."""
    return torch.float32 if always_fp32(key) else dtype


def full_shape(cfg: ModelConfig, spec: TensorSpec) -> tuple[int, ...]:
    """The unsharded shape of a tensor under `cfg` (the reference model's parameter shape)."""
    return FULL_SHAPES[spec.role](cfg)


# ---- the GPT family: dense and MoE layers ------------------------------------------------------------
def dense_layer_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The tensors of one dense transformer layer, in megatron-core's state-dict order."""
    return (attention_specs(cfg) + mlp_specs(cfg, "mlp.", Role.FC1_WEIGHT, Role.FC1_BIAS, Role.FC2_WEIGHT)
            + post_norm_specs(cfg, "post_mlp_layernorm"))


def post_norm_specs(cfg: ModelConfig, name: str) -> list[TensorSpec]:
    """A block output's norm (Gemma 2/3's post-norms; RMSNorm, no bias), when the model has them."""
    return [TensorSpec(f"{name}.weight", Role.POST_NORM_WEIGHT, None)] if cfg.norm.post else []


def moe_layer_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """An MoE layer (megatron-core's SequentialMLP experts): the router, then every expert's FFN
    under its global index (files on expert-parallel rank r number theirs from 0)."""
    specs = attention_specs(cfg) + [TensorSpec("mlp.router.weight", Role.ROUTER_WEIGHT, None)]
    if cfg.add_bias_linear:
        specs.append(TensorSpec("mlp.router.bias", Role.ROUTER_BIAS, None))
    if cfg.moe.expert_bias:
        specs.append(TensorSpec(EXPERT_BIAS, Role.ROUTER_EXPERT_BIAS, None))
    for e in range(cfg.moe.num_experts):
        specs += mlp_specs(cfg, f"{EXPERTS}{e}.", Role.EXPERT_FC1_WEIGHT, Role.EXPERT_FC1_BIAS, Role.EXPERT_FC2_WEIGHT)
    if cfg.moe.shared_size:  # no biases (megatron-core refuses them)
        specs += mlp_specs(cfg, SHARED, Role.SHARED_FC1_WEIGHT, "", Role.SHARED_FC2_WEIGHT)
        if cfg.moe.shared_gate:
            specs.append(TensorSpec(f"{SHARED}gate_weight", Role.SHARED_GATE_WEIGHT, None))
    return specs + post_norm_specs(cfg, "post_mlp_layernorm")


EXPERTS = "mlp.experts.local_experts."
SHARED = "mlp.shared_experts."


def expert_of(name: str) -> tuple[int, str] | None:
    """`mlp.experts.local_experts.3.linear_fc1.weight` -> (3, 'linear_fc1.weight'); None otherwise."""
    if not name.startswith(EXPERTS):
        return None
    index, _, rest = name[len(EXPERTS):].partition(".")
    return int(index), rest


def mlp_specs(cfg: ModelConfig, prefix: str, fc1_role: str, fc1_bias: str, fc2_role: str) -> list[TensorSpec]:
    fc1 = SWIGLU if cfg.mlp.gated else PLAIN
    specs = [TensorSpec(f"{prefix}linear_fc1.weight", fc1_role, 0, fc1)]
    if cfg.add_bias_linear:
        specs.append(TensorSpec(f"{prefix}linear_fc1.bias", fc1_bias, 0, fc1))
    specs.append(TensorSpec(f"{prefix}linear_fc2.weight", fc2_role, 1))
    if cfg.add_bias_linear:
        specs.append(TensorSpec(f"{prefix}linear_fc2.bias", Role.OUT_BIAS, None))
    return specs


def attention_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """A layer's norms and attention: everything before its MLP."""
    specs = pre_norm_specs(cfg, "input_layernorm")
    specs.append(TensorSpec("self_attention.linear_proj.weight", Role.PROJ_WEIGHT, 1))
    if cfg.add_bias_linear:
        specs.append(TensorSpec("self_attention.linear_proj.bias", Role.OUT_BIAS, None))
    if cfg.mla is not None:
        return specs + mla_specs(cfg) + post_norm_specs(cfg, "post_self_attn_layernorm") + \
            pre_norm_specs(cfg, "pre_mlp_layernorm")
    specs.append(TensorSpec("self_attention.linear_qkv.weight", Role.QKV_WEIGHT, 0, QKV))
    if cfg.has_qkv_bias:
        specs.append(TensorSpec("self_attention.linear_qkv.bias", Role.QKV_BIAS, 0, QKV))
    if cfg.attention.qk_norm_across_heads:
        specs += [TensorSpec("self_attention.q_layernorm.weight", Role.Q_NORM_ALL_WEIGHT, None),
                  TensorSpec("self_attention.k_layernorm.weight", Role.K_NORM_ALL_WEIGHT, None)]
    elif cfg.attention.qk_norm:
        for which in ("q", "k"):
            specs.append(TensorSpec(f"self_attention.{which}_layernorm.weight", Role.QK_NORM_WEIGHT, None))
            if cfg.norm.has_bias:
                specs.append(TensorSpec(f"self_attention.{which}_layernorm.bias", Role.QK_NORM_BIAS, None))
    return specs + post_norm_specs(cfg, "post_self_attn_layernorm") + pre_norm_specs(cfg, "pre_mlp_layernorm")


def mla_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Multi-latent attention's projections (megatron-core's MLASelfAttention, local spec: every one
    column-parallel, so TP splits their rows, the down projections' too) and the latents' norms."""
    sa = "self_attention."
    if cfg.mla.q_lora_rank is None:
        specs = [TensorSpec(f"{sa}linear_q_proj.weight", Role.MLA_Q_WEIGHT, 0)]
    else:
        specs = [TensorSpec(f"{sa}linear_q_down_proj.weight", Role.MLA_Q_DOWN_WEIGHT, 0),
                 TensorSpec(f"{sa}linear_q_up_proj.weight", Role.MLA_Q_UP_WEIGHT, 0)]
    specs += [TensorSpec(f"{sa}linear_kv_down_proj.weight", Role.MLA_KV_DOWN_WEIGHT, 0),
              TensorSpec(f"{sa}linear_kv_up_proj.weight", Role.MLA_KV_UP_WEIGHT, 0)]
    if cfg.attention.qk_norm:
        if cfg.mla.q_lora_rank is not None:
            specs.append(TensorSpec(f"{sa}q_layernorm.weight", Role.Q_LATENT_NORM_WEIGHT, None))
        specs.append(TensorSpec(f"{sa}kv_layernorm.weight", Role.KV_LATENT_NORM_WEIGHT, None))
    return specs


def pre_norm_specs(cfg: ModelConfig, name: str) -> list[TensorSpec]:
    """A block input's norm, when the model has them (OLMo 2 has none)."""
    if not cfg.norm.pre:
        return []
    bias = [TensorSpec(f"{name}.bias", Role.NORM_BIAS, None)] if cfg.norm.has_bias else []
    return [TensorSpec(f"{name}.weight", Role.NORM_WEIGHT, None)] + bias


def gpt_embedding_specs(cfg: ModelConfig) -> list[TensorSpec]:
    specs = [TensorSpec(WORD_EMBEDDINGS, Role.WORD_EMBEDDINGS, 0, VOCAB)]
    if cfg.embedding.learned_positions:
        specs.append(TensorSpec(POSITION_EMBEDDINGS, Role.POSITION_EMBEDDINGS, None))
    return specs


OUTPUT_SPEC = TensorSpec(OUTPUT_LAYER, Role.OUTPUT_LAYER, 0, VOCAB)


def gpt_final_norm_specs(cfg: ModelConfig) -> list[TensorSpec]:
    specs = [TensorSpec("decoder.final_layernorm.weight", Role.FINAL_NORM_WEIGHT, None)]
    if cfg.norm.has_bias:
        specs.append(TensorSpec("decoder.final_layernorm.bias", Role.FINAL_NORM_BIAS, None))
    return specs


@dataclass(frozen=True)
class Family:
    """A model family: its embedding, per-layer-type and final-norm tensors, and which type each
    layer is. The output layer is always `OUTPUT_SPEC`; a tied model shares it with the embeddings."""

    name: str
    embedding: Callable[[ModelConfig], list[TensorSpec]]
    layer_types: dict[str, Callable[[ModelConfig], list[TensorSpec]]]
    layer_type: Callable[[ModelConfig, int], str]
    final_norm: Callable[[ModelConfig], list[TensorSpec]]


GPT = Family("gpt", gpt_embedding_specs, {"dense": dense_layer_specs, "moe": moe_layer_specs},
             lambda cfg, index: "moe" if cfg.is_moe_layer(index) else "dense", gpt_final_norm_specs)


def family(cfg: ModelConfig) -> Family:
    """The family `cfg` belongs to (every config is a GPT, its layers dense or MoE)."""
    return GPT


def embedding_specs(cfg: ModelConfig) -> list[TensorSpec]:
    return family(cfg).embedding(cfg)


def layer_specs(cfg: ModelConfig, index: int) -> list[TensorSpec]:
    """The tensors of layer `index`, by its layer type."""
    fam = family(cfg)
    return fam.layer_types[fam.layer_type(cfg, index)](cfg)


def final_norm_specs(cfg: ModelConfig) -> list[TensorSpec]:
    return family(cfg).final_norm(cfg)


def head_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Final norm and output layer: what operators map and formats receive, tied or not."""
    return final_norm_specs(cfg) + [OUTPUT_SPEC]


def model_specs(cfg: ModelConfig) -> list[tuple[str, TensorSpec]]:
    """(key, spec) of every tensor of the reference model's state dict (TP1/PP1), in order.
    A tied model has no `output_layer.weight` of its own."""
    out = [(s.name, s) for s in embedding_specs(cfg)]
    for i in range(cfg.num_layers):
        out += [(layer_key(i, s.name), s) for s in layer_specs(cfg, i)]
    out += [(s.name, s) for s in final_norm_specs(cfg)]
    if not cfg.embedding.tied:
        out.append((OUTPUT_LAYER, OUTPUT_SPEC))
    return out


# ---- keys ------------------------------------------------------------------------------------------
def layer_key(index: int, name: str) -> str:
    return f"{LAYER_PREFIX}{index}.{name}"


def split_layer_key(key: str) -> tuple[int, str] | None:
    """`decoder.layers.3.mlp.linear_fc1.weight` -> (3, 'mlp.linear_fc1.weight'); None if not a layer key."""
    if not key.startswith(LAYER_PREFIX):
        return None
    index, _, name = key[len(LAYER_PREFIX):].partition(".")
    return (int(index), name) if index.isdigit() else None


# Transformer-Engine spec spellings of the same tensors (the norm fused into the next linear).
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
TE_NAMES = {local: te for te, local in TE_ALIASES.items()}  # local-spec name -> TE spelling
# ... and multi-latent attention's TE spec: the latents' norms fused into the up projections, the
# input norm apart (the down projections are plain linears), an MoE layer's pre-MLP norm apart
MLA_TE_ALIASES = {
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
}
MLA_TE_NAMES = {local: te for te, local in MLA_TE_ALIASES.items()}


def canonical_layer_name(name: str) -> str:
    return TE_ALIASES.get(name, MLA_TE_ALIASES.get(name, name))


def te_layer_name(cfg: ModelConfig, index: int, name: str) -> str:
    """Layer `index`'s tensor `name` as Megatron-LM's Transformer-Engine spec stores it (torch_dist)."""
    if cfg.mla is None:
        return TE_NAMES.get(name, name)
    if name.startswith("input_layernorm.") or (name.startswith("pre_mlp_layernorm.") and cfg.is_moe_layer(index)):
        return name
    return MLA_TE_NAMES.get(name, TE_NAMES.get(name, name))


# Modules whose `_extra_state` megatron-core's local spec puts in every state dict.
LAYER_EXTRA_STATE = ("self_attention.linear_proj._extra_state", "self_attention.linear_qkv._extra_state",
                     "mlp.linear_fc1._extra_state", "mlp.linear_fc2._extra_state")


def layer_extra_state(cfg: ModelConfig, index: int, experts: range | None = None) -> tuple[str, ...]:
    """The `_extra_state` names of layer `index`; an MoE layer's are per expert (`experts`: the
    global indices a file holds, numbered from 0 in it)."""
    attention = LAYER_EXTRA_STATE[:2] if cfg.mla is None else mla_extra_state(cfg)
    if not cfg.is_moe_layer(index):
        return attention + LAYER_EXTRA_STATE[2:]
    experts = experts if experts else range(cfg.moe.num_experts)
    shared = (f"{SHARED}linear_fc1._extra_state", f"{SHARED}linear_fc2._extra_state") \
        if cfg.moe.shared_size else ()
    return attention + tuple(f"{EXPERTS}{local}.{m}._extra_state" for local in range(len(experts))
                                         for m in ("linear_fc1", "linear_fc2")) + shared


def mla_extra_state(cfg: ModelConfig) -> tuple[str, ...]:
    """The `_extra_state` names of multi-latent attention's linear layers."""
    return ("self_attention.linear_proj._extra_state",) + tuple(
        spec.name.replace(".weight", "._extra_state") for spec in mla_specs(cfg) if "linear_" in spec.name)


OUTPUT_EXTRA_STATE = "output_layer._extra_state"
