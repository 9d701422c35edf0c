"""A Hugging Face model family as one record (`HFFamily`): which HF tensors make each megatron-core
tensor (`Rule`s), how its `config.json` maps onto `ModelConfig` and back, what it refuses, and the
MoE family an upcycled model of it becomes. The families themselves are data in `families/`.

Reading a config.json: every `Refusal` is checked first (a feature megatron-core would not reproduce
is refused by name), then the family's fixed `features` (flat Megatron names: the norm, the
activation, rope, biases) and what `config_in` reads (sizes, eps, rope base, experts) make the
`ModelConfig`. Writing one: a model whose features differ from the family's cannot be written as it
(`cannot_write` names them), else `config_out` gives the family's keys over the source's config.json.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from scalegrow.core.config import ModelConfig


class Unsupported(ValueError):
    """A config.json feature megatron-core would not reproduce (the message names the key)."""


@dataclass(frozen=True)
class Rule:
    megatron: str  # layer-relative name (`{e}`: the expert's index), or a global key
    hf: tuple[str, ...]  # HF names; `{i}` is the layer index, `{e}` the expert's
    kind: str = "same"  # same | qkv | fused_qkv | gate_up | conv1d | conv1d_qkv (see `to_megatron`) | stacked
    # (stacked: one HF tensor holds every expert's along dim 0; `{e}` is that index, read and written
    # as a slice by the format)


def layer_rules(prefix: str, *rules: tuple) -> tuple[Rule, ...]:
    """Rules of a layer: (megatron name, HF names under `prefix`, kind)."""
    return tuple(Rule(m, tuple(prefix + h for h in hf), *kind) for m, hf, *kind in rules)


@dataclass(frozen=True)
class Refusal:
    """A config.json key whose value megatron-core reproduces only when `ok(read(config), config)`."""

    key: str
    what: str  # what megatron-core reproduces, for the message
    ok: Callable[[Any, dict], bool]
    read: Callable[[dict], Any]

    def check(self, hf: dict) -> None:
        value = self.read(hf)
        if not self.ok(value, hf):
            raise Unsupported(f"{self.key}: {value!r} is not supported (megatron-core reproduces {self.what})")


def must_be(key: str, wanted: Any, what: str, default: Any = None) -> Refusal:
    """`key` must be `wanted` (absent: `default`, else `wanted` itself)."""
    fallback = wanted if default is None else default
    return Refusal(key, what, lambda value, hf: value == wanted, lambda hf: hf.get(key, fallback))


@dataclass(frozen=True)
class HFFamily:
    model_type: str
    architecture: str  # `architectures` in config.json
    layer: tuple[Rule, ...]  # per-layer rules; MoE experts' names carry `{e}`
    globals: tuple[Rule, ...]  # embeddings, final norm, output layer
    features: Mapping[str, Any]  # flat Megatron values every model of the family has
    config_in: Callable[[dict], dict]  # config.json -> the other flat Megatron values
    config_out: Callable[[ModelConfig, dict], dict]  # a model -> its config.json keys (DROP: remove); the dict:
    # the config.json being written (the source's keys, if it was HF)
    refusals: tuple[Refusal, ...] = ()
    moe: bool = False  # every layer an MoE layer (else none is)
    moe_sibling: str | None = None  # the family an upcycled model of this one is written as
    requires: Callable[[ModelConfig], Mapping[str, Any]] = field(default=lambda cfg: {})  # size-bound features
    fused_layer: tuple[Rule, ...] = ()  # an MoE family's rules in transformers 5's fused expert layout

    def with_layout(self, layout: str) -> "HFFamily":
        """This family with its experts in `layout` (EXPERT_LAYOUTS; a dense family has one layout)."""
        return dataclasses.replace(self, layer=self.fused_layer) if layout == "fused" and self.fused_layer else self

    def to_config(self, hf: dict) -> ModelConfig:
        for refusal in self.refusals:
            refusal.check(hf)
        return ModelConfig.from_flat({**self.features, **self.config_in(hf)})

    def problems(self, cfg: ModelConfig) -> list[str]:
        """`key=value` of every feature of `cfg` this family cannot hold (empty: it can be written)."""
        if self.moe != (cfg.moe is not None):
            return ["num_moe_experts=None: a dense model" if self.moe else f"num_moe_experts={cfg.moe.num_experts!r}"]
        flat = cfg.to_dict()
        wanted = {**self.features, **self.requires(cfg)}
        return [f"{key}={flat[key]!r}" for key, value in wanted.items() if flat[key] != value]

    def to_hf_config(self, cfg: ModelConfig, base: dict | None, dtype: torch.dtype) -> dict:
        """config.json for `cfg`: `base` (the source's, if it was HF; its other keys kept) with this
        family's keys for the new shapes."""
        problems = self.problems(cfg)
        if problems:
            raise Unsupported(f"model_type: this model cannot be written as {self.model_type} ({', '.join(problems)})")
        base = base or {}
        sibling = base.get("model_type") != self.model_type  # a dense source's config.json for its upcycled MoE
        out = {k: v for k, v in base.items() if not (sibling and k in DENSE_ONLY) and k != "quantization_config"}
        out.update(model_type=self.model_type, architectures=[self.architecture],
                   vocab_size=cfg.vocab_size or cfg.padded_vocab_size, tie_word_embeddings=cfg.embedding.tied,
                   initializer_range=cfg.init_method_std, dtype=str(dtype).removeprefix("torch."))
        for key, value in self.config_out(cfg, out).items():
            if value is DROP:
                out.pop(key, None)
            else:
                out[key] = value
        return out


# What a family has unless it says otherwise: megatron-core GPT's pre-LN block, unscaled and uncapped
PLAIN_BLOCK = {"pre_layernorms": True, "post_layernorms": False, "apply_layernorm_1p": False,
               "scale_embeddings": False, "qk_layernorm_across_heads": False, "softmax_scale": None,
               "attn_logit_softcapping": None, "final_logit_softcapping": None, "rotary_base_local": None,
               "multi_latent_attention": False}
EXPERT_LAYOUTS = ("per-expert", "fused")  # experts.{e}.gate_proj ... as the Hub has them; experts.gate_up_proj
DROP = object()  # a `config_out` value: remove the key from the config.json written
DENSE_ONLY = ("mlp_bias", "pretraining_tp", "layer_types", "max_window_layers")  # not carried into an MoE sibling
# HF tensors a checkpoint may hold that are no weights (old causal-mask and rope buffers)
IGNORED = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")


# ---- tensors: HF -> megatron-core and back -------------------------------------------------------------
def to_megatron(kind: str, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """megatron-core's tensor from the HF tensors of one rule. Both use the same half-rotated rope, so
    q and k need no permutation; megatron-core fuses q/k/v per query group and fc1 as [gate; up]."""
    if kind in ("same", "stacked"):  # a stacked tensor's slice is read by the format
        return parts[0]
    if kind == "conv1d":  # GPT-2's Conv1D stores [in, out]
        return parts[0].t()
    if kind == "gate_up":
        return torch.cat(parts, dim=0)  # fc1 rows [gate; up]
    ng, per, hn = cfg.attention.groups, cfg.attention.per_group, cfg.attention.head_dim
    if kind == "conv1d_qkv":  # c_attn: [h, 3h] (Conv1D), columns [q | k | v]; its bias [3h]
        parts = list((parts[0].t() if parts[0].dim() == 2 else parts[0]).chunk(3, dim=0))
    if kind == "fused_qkv":  # Phi-3's qkv_proj: rows [q (np*hn); k (ng*hn); v (ng*hn)]
        parts = list(parts[0].split([ng * per * hn, ng * hn, ng * hn], dim=0))
    q, k, v = parts  # q [np*hn, ...], k and v [ng*hn, ...]
    rest = q.shape[1:]
    # -> [ng, per + 2, hn, ...]: each group's q heads, then its k, then its v
    fused = torch.cat([q.reshape(ng, per, hn, *rest), k.reshape(ng, 1, hn, *rest), v.reshape(ng, 1, hn, *rest)], 1)
    return fused.reshape(ng * (per + 2) * hn, *rest)


def to_hf(kind: str, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The HF tensors of one rule from megatron-core's (the inverse of `to_megatron`)."""
    if kind in ("same", "stacked"):
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
    if kind == "fused_qkv":
        return [torch.cat([q, k, v], dim=0)]
    return [q, k, v]
