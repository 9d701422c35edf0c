"""Hugging Face model families as data: which HF tensors make each megatron-core tensor, how
(`Rule`), and how a `config.json` maps onto `ModelConfig` and back.

    llama, mistral   RMSNorm, SwiGLU, GQA, rope          q/k/v and gate/up fused the megatron-core way
    qwen2            + q/k/v biases
    qwen3            + per-head q/k norms (megatron-core's qk_layernorm)
    gpt2             LayerNorm, GELU (tanh approximation), MHA, learned positions, biases, tied;
                     Conv1D weights are stored transposed, c_attn holds [q | k | v]
    mixtral          llama + MoE in every layer: router `gate`, experts w1/w3 (gate/up) and w2 (down);
                     softmax over all experts, top-k, renormalised = megatron-core's softmax after top-k
    qwen3_moe        qwen3 + MoE in every layer; norm_topk_prob picks the softmax order
    qwen2_moe        qwen2 + MoE in every layer + a shared expert gated by sigmoid(shared_expert_gate · x)

Expert tensors are stored one per expert (`experts.{e}.…`): transformers 5 fuses them into 3-D
tensors in memory only and writes them back per expert, as the Hub's checkpoints have them.

megatron-core's fused QKV rows are [ng, np/ng + 2, hn] (each group's q heads, then its k and v);
Hugging Face keeps q, k and v apart (heads in order), so a group's rows are gathered from all three.
Both use the same half-rotated rope, so no weight permutation is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scalegrow.core import arch
from scalegrow.core.config import ModelConfig


@dataclass(frozen=True)
class Rule:
    megatron: str  # layer-relative name (`{e}`: the expert's index), or a global key
    hf: tuple[str, ...]  # HF names; `{i}` is the layer index, `{e}` the expert's
    kind: str = "same"  # same | qkv | gate_up | conv1d | conv1d_qkv


def _layer(prefix: str, *rules: tuple) -> list[Rule]:
    return [Rule(m, tuple(prefix + h for h in hf), *kind) for m, hf, *kind in rules]


LLAMA_LAYER = _layer(
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
ATTENTION = [r for r in LLAMA_LAYER if not r.megatron.startswith("mlp.")]
EXPERT = "mlp.experts.local_experts.{e}."
MIXTRAL_LAYER = ATTENTION + _layer(
    "model.layers.{i}.block_sparse_moe.",
    ("mlp.router.weight", ("gate.weight",)),
    (EXPERT + "linear_fc1.weight", ("experts.{e}.w1.weight", "experts.{e}.w3.weight"), "gate_up"),
    (EXPERT + "linear_fc2.weight", ("experts.{e}.w2.weight",)),
)
QWEN_MOE_LAYER = ATTENTION + _layer(
    "model.layers.{i}.mlp.",
    ("mlp.router.weight", ("gate.weight",)),
    (EXPERT + "linear_fc1.weight", ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight"), "gate_up"),
    (EXPERT + "linear_fc2.weight", ("experts.{e}.down_proj.weight",)),
)
QWEN2_MOE_LAYER = QWEN_MOE_LAYER + _layer(
    "model.layers.{i}.mlp.",
    ("mlp.shared_experts.linear_fc1.weight", ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"),
     "gate_up"),
    ("mlp.shared_experts.linear_fc2.weight", ("shared_expert.down_proj.weight",)),
    ("mlp.shared_experts.gate_weight", ("shared_expert_gate.weight",)),
)
LLAMA_GLOBAL = [Rule(arch.WORD_EMBEDDINGS, ("model.embed_tokens.weight",)),
                Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
                Rule(arch.OUTPUT_LAYER, ("lm_head.weight",))]

GPT2_LAYER = _layer(
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
GPT2_GLOBAL = [Rule(arch.WORD_EMBEDDINGS, ("transformer.wte.weight",)),
               Rule(arch.POSITION_EMBEDDINGS, ("transformer.wpe.weight",)),
               Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
               Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
               Rule(arch.OUTPUT_LAYER, ("lm_head.weight",))]

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
DENSE_ONLY = ("mlp_bias", "pretraining_tp", "layer_types", "max_window_layers")  # not carried into the MoE sibling
MOE_OF = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe"}  # where an upcycled model goes
# HF tensors a checkpoint may hold that are no weights (old causal-mask and rope buffers)
IGNORED = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")


def rules(model_type: str) -> tuple[list[Rule], list[Rule]]:
    """(per-layer rules, global rules) of a family."""
    if model_type == "gpt2":
        return GPT2_LAYER, GPT2_GLOBAL
    layer = {"mixtral": MIXTRAL_LAYER, "qwen3_moe": QWEN_MOE_LAYER, "qwen2_moe": QWEN2_MOE_LAYER}.get(model_type,
                                                                                                   LLAMA_LAYER)
    return layer, LLAMA_GLOBAL


# ---- tensors: HF -> megatron-core and back -------------------------------------------------------------
def to_megatron(kind: str, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    if kind == "same":
        return parts[0]
    if kind == "conv1d":
        return parts[0].t()
    if kind == "gate_up":
        return torch.cat(parts, dim=0)  # fc1 rows [gate; up]
    if kind == "conv1d_qkv":  # c_attn: [h, 3h] (Conv1D), columns [q | k | v]; its bias [3h]
        parts = list((parts[0].t() if parts[0].dim() == 2 else parts[0]).chunk(3, dim=0))
    q, k, v = parts  # q [np*hn, ...], k and v [ng*hn, ...]
    ng, per, hn = cfg.attention.groups, cfg.attention.per_group, cfg.attention.head_dim
    rest = q.shape[1:]
    # -> [ng, per + 2, hn, ...]: each group's q heads, then its k, then its v
    fused = torch.cat([q.reshape(ng, per, hn, *rest), k.reshape(ng, 1, hn, *rest), v.reshape(ng, 1, hn, *rest)], 1)
    return fused.reshape(ng * (per + 2) * hn, *rest)


def to_hf(kind: str, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    if kind == "same":
        return [t]
    if kind == "conv1d":
        return [t.t()]
    if kind == "gate_up":
        return list(t.chunk(2, dim=0))
    ng, per, hn = cfg.attention.groups, cfg.attention.per_group, cfg.attention.head_dim
    blocks = t.reshape(ng, per + 2, hn, *t.shape[1:])  # [ng*(per+2)*hn, ...] -> [ng, per + 2, hn, ...]
    q, k, v = (blocks[:, :per].flatten(0, 2), blocks[:, per].flatten(0, 1), blocks[:, per + 1].flatten(0, 1))
    if kind == "conv1d_qkv":
        fused = torch.cat([q, k, v], dim=0)
        return [fused.t() if fused.dim() == 2 else fused]
    return [q, k, v]


# ---- config.json <-> ModelConfig ------------------------------------------------------------------------
class Unsupported(ValueError):
    """A config.json feature megatron-core would not reproduce (the message names the key)."""


def config_from_hf(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf)
    if model_type not in ARCHITECTURES:
        raise Unsupported(f"model_type: {model_type!r} is not a family scalegrow reads "
                          f"(valid: {', '.join(ARCHITECTURES)})")
    _check_llama_like(hf, model_type)
    heads = hf["num_attention_heads"]
    moe = _moe_config(hf, model_type) if model_type in MOE_FAMILIES else {}
    return ModelConfig.from_flat(dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_hidden_size=hf["intermediate_size"],
        padded_vocab_size=hf["vocab_size"], vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), swiglu=True, position_embedding_type="rope",
        rotary_base=int(_rope(hf).get("rope_theta", 10000.0)),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False), add_bias_linear=False,
        add_qkv_bias=model_type in ("qwen2", "qwen2_moe"), qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        init_method_std=float(hf.get("initializer_range", 0.02)), **moe))


def _moe_config(hf: dict, model_type: str) -> dict:
    """MoE fields: every layer sparse; the top-k weights renormalised (Mixtral always; Qwen with
    norm_topk_prob) is megatron-core's softmax over the top k, else its softmax before top-k. The
    load-balancing coefficient counts only where HF would add the loss (output_router_logits)."""
    experts = hf.get("num_local_experts") or hf.get("num_experts")
    renorm = model_type == "mixtral" or bool(hf.get("norm_topk_prob", False))
    k = hf.get("num_experts_per_tok", 2)
    _refuse([("decoder_sparse_step", hf.get("decoder_sparse_step", 1), 1, "every layer an MoE layer"),
             ("mlp_only_layers", list(hf.get("mlp_only_layers") or []), [], "every layer an MoE layer"),
             ("num_experts_per_tok", k, 2 if renorm and k == 1 else k, "top-1 only with the softmax over all experts")])
    shared = dict(moe_shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
                  moe_shared_expert_gate=True) if model_type == "qwen2_moe" else {}
    return dict(num_moe_experts=experts, moe_router_topk=k, moe_router_pre_softmax=not renorm, **shared,
                moe_ffn_hidden_size=hf["intermediate_size"] if model_type == "mixtral" else hf["moe_intermediate_size"],
                moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0)


def _rope(hf: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; earlier ones in `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def _check_llama_like(hf: dict, model_type: str) -> None:
    rope = _rope(hf)
    checks = [("hidden_act", hf.get("hidden_act", "silu"), "silu", "SwiGLU with SiLU only"),
              ("attention_bias", hf.get("attention_bias", False), False, "no bias on o_proj alone"),
              ("mlp_bias", hf.get("mlp_bias", False), False, "no MLP biases without attention biases"),
              ("rope_type", rope.get("rope_type", "default"), "default", "plain rope, no scaling"),
              ("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0), 1.0, "rope over the whole head"),
              ("layer_types", sorted(set(hf.get("layer_types") or ["full_attention"])), ["full_attention"],
               "full attention in every layer")]
    if model_type in ("mistral", "mixtral"):
        checks.append(("sliding_window", hf.get("sliding_window"), None, "full attention, no sliding window"))
    if model_type in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe"):
        checks.append(("use_sliding_window", hf.get("use_sliding_window", False), False, "full attention"))
    _refuse(checks)
    if not float(rope["rope_theta"]).is_integer():
        raise Unsupported(f"rope_theta: {rope['rope_theta']!r} is not supported (an integer rope base)")


def _refuse(checks: list[tuple[str, object, object, str]]) -> None:
    """(key, value, the value megatron-core reproduces, what that is): the first mismatch is refused."""
    for key, value, wanted, what in checks:
        if value != wanted:
            raise Unsupported(f"{key}: {value!r} is not supported (megatron-core reproduces {what})")


def _gpt2_config(hf: dict) -> ModelConfig:
    checks = [("activation_function", hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu")),
              ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False)),
              ("scale_attn_weights", hf.get("scale_attn_weights", True))]
    for key, ok in checks:
        if not ok:
            raise Unsupported(f"{key}: {hf.get(key)!r} is not supported (megatron-core would not reproduce it)")
    h = hf["n_embd"]
    return ModelConfig.from_flat(dict(
        num_layers=hf["n_layer"], hidden_size=h, num_attention_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner")
        or 4 * h, padded_vocab_size=hf["vocab_size"], vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["n_positions"], normalization="LayerNorm",
        norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), openai_gelu=hf.get("activation_function",
                                                                                    "gelu_new") == "gelu_new",
        position_embedding_type="learned_absolute", untie_embeddings_and_output_weights=False,
        add_bias_linear=True, init_method_std=float(hf.get("initializer_range", 0.02))))


def infer_model_type(cfg: ModelConfig) -> str | None:
    """The HF family a config can only be (None when several or none fit)."""
    if cfg.norm.kind == "LayerNorm" and cfg.embedding.position == "learned_absolute":
        return "gpt2"
    if cfg.moe:
        if cfg.moe.shared_size:
            return "qwen2_moe"
        return "qwen3_moe" if cfg.attention.qk_norm else "mixtral"
    if cfg.attention.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.attention.qkv_bias else "llama"


def config_to_hf(cfg: ModelConfig, model_type: str, base: dict | None, dtype: torch.dtype) -> dict:
    """config.json for `cfg` as `model_type`: `base` (the source's, if it was HF) with the new shapes."""
    problems = _cannot_write(cfg, model_type)
    if problems:
        raise Unsupported(f"model_type: this model cannot be written as {model_type} ({problems})")
    base = base or {}
    sibling = base.get("model_type") != model_type  # a dense source's config.json for its upcycled MoE
    out = {k: v for k, v in base.items() if not (sibling and k in DENSE_ONLY)}
    out.update(model_type=model_type, architectures=[ARCHITECTURES[model_type]], vocab_size=cfg.vocab_size
               or cfg.padded_vocab_size, tie_word_embeddings=cfg.embedding.tied, initializer_range=cfg.init_method_std,
               dtype=str(dtype).removeprefix("torch."))
    if model_type == "gpt2":
        out.update(n_layer=cfg.num_layers, n_embd=cfg.hidden_size, n_head=cfg.attention.heads,
                   n_inner=None if cfg.mlp.ffn_hidden_size == 4 * cfg.hidden_size else cfg.mlp.ffn_hidden_size, n_positions=cfg.max_position_embeddings,
                   layer_norm_epsilon=cfg.norm.eps, activation_function="gelu_new" if cfg.mlp.activation == "gelu_tanh" else "gelu")
        return out
    out.update(num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp.ffn_hidden_size,
               num_attention_heads=cfg.attention.heads, num_key_value_heads=cfg.attention.groups,
               head_dim=_head_dim(cfg, out), max_position_embeddings=cfg.max_position_embeddings,
               rms_norm_eps=cfg.norm.eps, hidden_act="silu",
               rope_parameters={"rope_theta": float(cfg.rope.base), "rope_type": "default"})
    out.pop("rope_theta", None), out.pop("rope_scaling", None)
    if "layer_types" in out:  # one entry a layer; only full attention is read (see _check_llama_like)
        out["layer_types"] = ["full_attention"] * cfg.num_layers
    if model_type in ("llama", "mistral", "qwen3", "qwen3_moe"):
        out.update(attention_bias=False)
    if model_type in MOE_FAMILIES:
        out.update(_moe_to_hf(cfg, model_type, out))
    return out


def _head_dim(cfg: ModelConfig, base: dict) -> int | None:
    """kv_channels, or None where the source left it implied (Mixtral's config: hidden / heads)."""
    implied = cfg.attention.head_dim == cfg.hidden_size // cfg.attention.heads
    return None if implied and "head_dim" in base and base["head_dim"] is None else cfg.attention.head_dim


def _moe_to_hf(cfg: ModelConfig, model_type: str, out: dict) -> dict:
    experts = "num_experts" if "num_experts" in out or (model_type == "qwen3_moe" and "num_local_experts" not in out) \
        else "num_local_experts"  # the source's spelling; the Hub's for each family otherwise
    moe = {experts: cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.topk}
    if model_type == "mixtral":
        moe["intermediate_size"] = cfg.moe.ffn_hidden_size
    else:
        moe.update(moe_intermediate_size=cfg.moe.ffn_hidden_size, norm_topk_prob=not cfg.moe.pre_softmax,
                   decoder_sparse_step=1, mlp_only_layers=[])
    if model_type == "qwen2_moe":
        moe.update(shared_expert_intermediate_size=cfg.moe.shared_size)
    if cfg.moe.aux_loss_coeff:
        moe.update(router_aux_loss_coef=cfg.moe.aux_loss_coeff, output_router_logits=True)
    return moe


def _cannot_write(cfg: ModelConfig, model_type: str) -> str:
    llama_like = model_type != "gpt2"
    wanted = {"normalization": "RMSNorm" if llama_like else "LayerNorm", "swiglu": llama_like,
              "position_embedding_type": "rope" if llama_like else "learned_absolute",
              "add_bias_linear": not llama_like, "has_qkv_bias": model_type in ("qwen2", "gpt2", "qwen2_moe"),
              "qk_layernorm": model_type in ("qwen3", "qwen3_moe"), "rotary_percent": 1.0}
    if model_type in MOE_FAMILIES:
        wanted.update(moe_layer_freq=1, moe_shared_expert_gate=model_type == "qwen2_moe")
        if model_type != "qwen2_moe":
            wanted.update(moe_shared_expert_intermediate_size=None)
        if model_type == "mixtral":
            wanted.update(moe_router_pre_softmax=False)
        if not cfg.moe:
            return "num_moe_experts=None: a dense model"
    else:
        wanted.update(num_moe_experts=None)
    if model_type == "gpt2":
        wanted.update(untie_embeddings_and_output_weights=False, num_query_groups=cfg.attention.heads,
                      kv_channels=cfg.hidden_size // cfg.attention.heads)
    flat = {**cfg.to_dict(), "has_qkv_bias": cfg.has_qkv_bias}
    return ", ".join(f"{k}={flat[k]!r}" for k, v in wanted.items() if flat[k] != v)
