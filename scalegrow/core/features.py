"""A model's features as typed records: attention, norm, MLP, embedding and MoE (rope's are in
`core/rope_config.py`, built on the same `Record`).

Each record holds one feature's settings under short names (`cfg.norm.kind`, `cfg.attention.groups`)
and spells each of them in Megatron-LM's flat argument name at the boundary (`normalization`,
`num_query_groups`): YAML targets, Megatron `args`, `scalegrow.json`. A field's role says what
operators may do with it:
- `SIZE`: what growth and shrinking change (layers, widths, heads, experts);
- `FEATURE`: what they keep, so a target must match its source (the norm, the activation, rope);
- `FREE`: bookkeeping that follows neither rule (norm eps, init std, a training coefficient);
- `LAYERS`: one value per layer (which layers use the sliding window): a target layer keeps the value
  of the source layer it comes from, so operators derive it from their depth maps.
A new feature is a field here (its flat name and role), the reference model's use of it, and the
operator rules it needs; nothing else lists field names.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, Mapping

SIZE, FEATURE, FREE, LAYERS = "size", "feature", "free", "layers"
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_TYPES = ("learned_absolute", "rope")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu")


def megatron(name: str, default: Any = MISSING, role: str = FEATURE, invert: bool = False):
    """A record field spelled `name` in Megatron-LM's arguments (`invert`: a flag of the opposite sense)."""
    return dataclasses.field(default=default, metadata={"megatron": name, "role": role, "invert": invert})


def positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


class Record:
    """A record whose fields carry their Megatron-LM names (`megatron(...)`), read and written flat."""

    @classmethod
    def flat_keys(cls) -> dict[str, tuple[Any, str]]:
        """Flat name -> (type hint, role) of every field spelled in Megatron's arguments."""
        hints = typing.get_type_hints(cls)
        return {f.metadata["megatron"]: (hints[f.name], f.metadata["role"])
                for f in fields(cls) if "megatron" in f.metadata}

    @classmethod
    def flat_kwargs(cls, flat: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments `flat` names (fields it leaves out keep their defaults)."""
        out = {}
        for f in fields(cls):
            key = f.metadata.get("megatron")
            if key in flat:
                out[f.name] = (not flat[key]) if f.metadata["invert"] else flat[key]
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]):
        return cls(**cls.flat_kwargs(flat))

    def to_flat(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            if "megatron" in f.metadata:
                value = getattr(self, f.name)
                out[f.metadata["megatron"]] = (not value) if f.metadata["invert"] else value
        return out


@dataclass(frozen=True)
class Attention(Record):
    """Self-attention: heads in query groups (GQA; MHA when every head is its own group), causal,
    optionally within a sliding window on some layers (megatron-core's `window_size` and
    `window_attn_skip_freq`; transformers' `sliding_window` and `layer_types`)."""

    heads: int = megatron("num_attention_heads", role=SIZE)
    groups: int | None = megatron("num_query_groups", None, SIZE)  # None: one per head (MHA)
    head_dim: int | None = megatron("kv_channels", None, SIZE)  # None: hidden_size / heads
    qk_norm: bool = megatron("qk_layernorm", False)  # a norm over each head's q and k, before rope (Qwen3)
    # with qk_norm: one norm over all heads' q (and one over all k) at once, not per head (OLMo 2)
    qk_norm_across_heads: bool = megatron("qk_layernorm_across_heads", False)
    qkv_bias: bool = megatron("add_qkv_bias", False)  # q/k/v biases without the other linear ones (Qwen2)
    # (left, right): a query sees the `left` keys before it and itself (transformers' sliding_window
    # is left + 1); right is 0, causal. None: full attention everywhere
    window: tuple[int, int] | None = megatron("window_size", None)
    # which layers the window applies to: None every layer; N every layer but each N-th (1-based); or
    # one 1/0 per layer (1: the window). megatron-core's window_attn_skip_freq
    window_layers: int | tuple[int, ...] | None = megatron("window_attn_skip_freq", None, LAYERS)
    # what q·k is multiplied by; None: 1/√head_dim (Gemma: query_pre_attn_scalar^-½)
    softmax_scale: float | None = megatron("softmax_scale", None)
    softcap: float | None = megatron("attn_logit_softcapping", None)  # scores -> cap·tanh(scores/cap) (Gemma 2)

    @classmethod
    def flat_keys(cls) -> dict[str, tuple[Any, str]]:  # lists at the flat boundary (YAML, JSON, args)
        keys = super().flat_keys()
        return {**keys, "window_size": (list | None, FEATURE), "window_attn_skip_freq": (int | list | None, LAYERS)}

    @classmethod
    def flat_kwargs(cls, flat: Mapping[str, Any]) -> dict[str, Any]:
        out = super().flat_kwargs(flat)
        for name in ("window", "window_layers"):
            if isinstance(out.get(name), (list, tuple)):
                out[name] = tuple(int(v) for v in out[name])
        return out

    def to_flat(self) -> dict[str, Any]:
        out = super().to_flat()
        for key in ("window_size", "window_attn_skip_freq"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    def resolved(self, hidden_size: int) -> "Attention":
        """Megatron's "None means derived" defaults made concrete."""
        groups = self.heads if self.groups is None else self.groups
        head_dim = hidden_size // self.heads if self.head_dim is None and self.heads else self.head_dim
        return dataclasses.replace(self, groups=groups, head_dim=head_dim)

    def windowed(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) attends within the window (megatron-core's
        `is_layer_window_attention`, which counts layers from 1)."""
        if self.window is None:
            return False
        if self.window_layers is None:
            return True
        if isinstance(self.window_layers, int):
            return (layer + 1) % self.window_layers != 0
        return bool(self.window_layers[layer])

    @property
    def scale(self) -> float:
        """What q·k is multiplied by before the softmax."""
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim ** -0.5

    @property
    def per_group(self) -> int:
        return self.heads // self.groups

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV weight: [ng, (np/ng + 2), hn] flattened."""
        return self.groups * (self.per_group + 2) * self.head_dim

    @property
    def proj_in(self) -> int:
        """Columns of linear_proj: every q head's output."""
        return self.heads * self.head_dim

    def validate(self, hidden_size: int, num_layers: int) -> None:
        for name, value in (("num_attention_heads", self.heads), ("num_query_groups", self.groups),
                            ("kv_channels", self.head_dim)):
            positive(name, value)
        if hidden_size % self.heads:
            raise ValueError(f"num_attention_heads: {self.heads} does not divide hidden_size {hidden_size}")
        if self.heads % self.groups:
            raise ValueError(f"num_query_groups: {self.groups} does not divide num_attention_heads {self.heads}")
        self._validate_window(num_layers)
        if self.qk_norm_across_heads and not self.qk_norm:
            raise ValueError("qk_layernorm_across_heads: says how the q/k norms reach, so needs qk_layernorm")
        for name, value in (("softmax_scale", self.softmax_scale), ("attn_logit_softcapping", self.softcap)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: must be positive, got {value}")

    def _validate_window(self, num_layers: int) -> None:
        if self.window is not None and (len(self.window) != 2 or self.window[0] < 0 or self.window[1] != 0):
            raise ValueError(f"window_size: a causal window is [left, 0] with left >= 0, got {list(self.window)}")
        skip = self.window_layers
        if isinstance(skip, int) and skip <= 0:
            raise ValueError(f"window_attn_skip_freq: must be a positive integer or a list, got {skip}")
        if isinstance(skip, tuple) and (len(skip) != num_layers or set(skip) - {0, 1}):
            raise ValueError(f"window_attn_skip_freq: one 1 (window) or 0 (full) per layer, {num_layers} in all, "
                             f"got {list(skip)}")


@dataclass(frozen=True)
class Norm(Record):
    """The model's norms: before attention, before the MLP, at the end (and q/k norms); optionally
    also after attention and after the MLP, on each block's output before the residual add (Gemma 2/3's
    "sandwich"), or only there (OLMo 2: `pre` false, the blocks read the stream itself). A zero-centred
    norm stores w and scales by 1 + w (Megatron-LM's --apply-layernorm-1p, megatron-core's
    layernorm_zero_centered_gamma; Gemma's RMSNorm): operators that compute with a norm's gain read it
    through `gain` and write it back through `stored`."""

    kind: str = megatron("normalization", "LayerNorm")
    eps: float = megatron("norm_epsilon", 1e-5, FREE)
    zero_centered: bool = megatron("apply_layernorm_1p", False)
    pre: bool = megatron("pre_layernorms", True)  # input_layernorm, pre_mlp_layernorm (OLMo 2 has none)
    post: bool = megatron("post_layernorms", False)  # post_self_attn_layernorm, post_mlp_layernorm

    @property
    def has_bias(self) -> bool:
        return self.kind == "LayerNorm"

    def gain(self, weight):
        """The factor a stored norm weight multiplies by."""
        return weight + 1.0 if self.zero_centered else weight

    def stored(self, gain):
        """The norm weight stored for a gain (the inverse of `gain`)."""
        return gain - 1.0 if self.zero_centered else gain

    def validate(self) -> None:
        if self.kind not in NORMALIZATIONS:
            raise ValueError(f"normalization: {self.kind!r} is not one of {NORMALIZATIONS}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"norm_epsilon: must be positive, got {self.eps}")
        if self.post and self.kind != "RMSNorm":
            raise ValueError("post_layernorms: only with RMSNorm (the families that have them, Gemma 2/3 and "
                             "OLMo 2, use it)")


@dataclass(frozen=True)
class MLP(Record):
    """The FFN: fc1 (two halves, [gate; up], when gated), an activation, fc2.

    Megatron-LM spells it with two flags: `swiglu` (gated, SiLU) and `openai_gelu` (GELU's tanh
    approximation); neither is plain GELU."""

    ffn_hidden_size: int | None = megatron("ffn_hidden_size", None, SIZE)  # None: 4 * hidden_size
    activation: str = "gelu"  # one of ACTIVATIONS
    gated: bool = False  # fc1 rows [gate; up]: act(gate) * up

    @classmethod
    def flat_keys(cls) -> dict[str, tuple[Any, str]]:
        return {"ffn_hidden_size": (int | None, SIZE), "swiglu": (bool, FEATURE), "openai_gelu": (bool, FEATURE),
                "gated_linear_unit": (bool, FEATURE)}

    @classmethod
    def flat_kwargs(cls, flat: Mapping[str, Any]) -> dict[str, Any]:
        """`swiglu` is gated SiLU; `gated_linear_unit` (megatron-core's name) gates whichever activation
        the other flags choose (with `openai_gelu`: Gemma's GeGLU, GELU's tanh approximation)."""
        swiglu, tanh = bool(flat.get("swiglu", False)), bool(flat.get("openai_gelu", False))
        if swiglu and tanh:
            raise ValueError("openai_gelu: SwiGLU's activation is SiLU; the GELU approximation does not apply")
        return dict(ffn_hidden_size=flat.get("ffn_hidden_size"), gated=swiglu or bool(flat.get("gated_linear_unit")),
                    activation="silu" if swiglu else "gelu_tanh" if tanh else "gelu")

    def to_flat(self) -> dict[str, Any]:
        return {"ffn_hidden_size": self.ffn_hidden_size, "swiglu": self.gated and self.activation == "silu",
                "openai_gelu": self.activation == "gelu_tanh", "gated_linear_unit": self.gated}

    def rows(self, size: int) -> int:
        """fc1 rows of an FFN of `size` neurons (each neuron a gate and an up row when gated)."""
        return size * (2 if self.gated else 1)

    @property
    def fc1_rows(self) -> int:
        return self.rows(self.ffn_hidden_size)

    def validate(self) -> None:
        positive("ffn_hidden_size", self.ffn_hidden_size)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: {self.activation!r} is not one of {ACTIVATIONS}")


@dataclass(frozen=True)
class Embedding(Record):
    """Token (and learned position) embeddings, and whether the output layer is the token embedding."""

    position: str = megatron("position_embedding_type", "learned_absolute")
    tied: bool = megatron("untie_embeddings_and_output_weights", True, invert=True)
    scaled: bool = megatron("scale_embeddings", False)  # token embeddings times √hidden_size (Gemma)

    @property
    def learned_positions(self) -> bool:
        return self.position == "learned_absolute"

    def validate(self) -> None:
        if self.position not in POSITION_TYPES:
            raise ValueError(f"position_embedding_type: {self.position!r} is not one of {POSITION_TYPES}")


@dataclass(frozen=True)
class MoE(Record):
    """Mixture-of-Experts layers (Megatron-LM's --num-experts etc.): a top-k router, SequentialMLP
    experts, an optional shared expert. `ModelConfig.moe` is None for a dense model.

    Routing is megatron-core's `topk_routing_with_score_function`: softmax scores (after the top-k, or
    before it with `pre_softmax`), or DeepSeek-V3's sigmoid scores, normalised over the chosen k, with
    a per-expert bias that only steers the choice (`expert_bias`, the aux-loss-free balancing of
    arXiv 2408.15664); the choice optionally limited to the `group_topk` best of `num_groups` expert
    groups; the weights optionally times `scaling_factor`."""

    num_experts: int = megatron("num_moe_experts", role=SIZE)
    topk: int = megatron("moe_router_topk", 2, SIZE)
    ffn_hidden_size: int | None = megatron("moe_ffn_hidden_size", None, SIZE)  # None: the dense FFN's
    # which layers are MoE: N every N-th layer from the first (i % N == 0), or one 1/0 per layer
    # (DeepSeek's dense first layers: first_k_dense_replace)
    layer_freq: int | tuple[int, ...] = megatron("moe_layer_freq", 1, LAYERS)
    pre_softmax: bool = megatron("moe_router_pre_softmax", False)  # softmax over all experts, then top-k
    score_function: str = megatron("moe_router_score_function", "softmax")  # or "sigmoid" (DeepSeek-V3)
    expert_bias: bool = megatron("moe_router_enable_expert_bias", False)  # a bias on the scores that choose
    num_groups: int | None = megatron("moe_router_num_groups", None)  # experts in this many equal groups
    group_topk: int | None = megatron("moe_router_group_topk", None)  # ... of which a token uses the best few
    scaling_factor: float | None = megatron("moe_router_topk_scaling_factor", None)  # the weights times this
    aux_loss_coeff: float = megatron("moe_aux_loss_coeff", 0.0, FREE)  # the load-balancing loss's weight
    bias_update_rate: float = megatron("moe_router_bias_update_rate", 1e-3, FREE)  # expert_bias's step
    shared_size: int | None = megatron("moe_shared_expert_intermediate_size", None, SIZE)  # always-on FFN
    shared_gate: bool = megatron("moe_shared_expert_gate", False)  # its output times sigmoid(x · gate)

    @classmethod
    def flat_keys(cls) -> dict[str, tuple[Any, str]]:  # a per-layer list at the flat boundary
        return {**super().flat_keys(), "moe_layer_freq": (int | list, LAYERS)}

    @classmethod
    def flat_kwargs(cls, flat: Mapping[str, Any]) -> dict[str, Any]:
        out = super().flat_kwargs(flat)
        if isinstance(out.get("layer_freq"), (list, tuple)):
            out["layer_freq"] = tuple(int(v) for v in out["layer_freq"])
        return out

    def to_flat(self) -> dict[str, Any]:
        out = super().to_flat()
        if isinstance(out["moe_layer_freq"], tuple):
            out["moe_layer_freq"] = list(out["moe_layer_freq"])
        return out

    @classmethod
    def dense_flat(cls) -> dict[str, Any]:
        """What a dense model spells for these keys: no experts, every other field at its default."""
        return {f.metadata["megatron"]: None if f.default is MISSING else f.default for f in fields(cls)}

    def is_moe_layer(self, index: int) -> bool:
        if isinstance(self.layer_freq, tuple):
            return bool(self.layer_freq[index])
        return index % self.layer_freq == 0

    @property
    def every_layer(self) -> bool:
        return self.layer_freq == 1 or (isinstance(self.layer_freq, tuple) and all(self.layer_freq))

    def validate(self, add_bias_linear: bool, num_layers: int) -> None:
        for name, value in (("num_moe_experts", self.num_experts), ("moe_router_topk", self.topk),
                            ("moe_ffn_hidden_size", self.ffn_hidden_size)):
            positive(name, value)
        self._validate_layers(num_layers)
        if self.topk > self.num_experts:
            raise ValueError(f"moe_router_topk: {self.topk} exceeds num_moe_experts {self.num_experts}")
        self._validate_scores()
        if self.shared_size is not None:
            positive("moe_shared_expert_intermediate_size", self.shared_size)
        if self.shared_size and add_bias_linear:  # megatron-core asserts it
            raise ValueError("moe_shared_expert_intermediate_size: megatron-core's shared experts have no "
                             "biases (add_bias_linear must be false)")
        if self.shared_gate and not self.shared_size:
            raise ValueError("moe_shared_expert_gate: needs moe_shared_expert_intermediate_size")

    def _validate_layers(self, num_layers: int) -> None:
        freq = self.layer_freq
        if isinstance(freq, tuple):
            if len(freq) != num_layers or set(freq) - {0, 1}:
                raise ValueError(f"moe_layer_freq: one 1 (MoE) or 0 (dense) per layer, {num_layers} in all, "
                                 f"got {list(freq)}")
        else:
            positive("moe_layer_freq", freq)

    def _validate_scores(self) -> None:
        """megatron-core's TransformerConfig rules for the router."""
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"moe_router_score_function: {self.score_function!r} is not one of {SCORE_FUNCTIONS}")
        if self.topk == 1 and self.score_function == "softmax" and not self.pre_softmax:  # a softmax of one is 1
            raise ValueError("moe_router_pre_softmax: must be true when moe_router_topk is 1")
        if self.expert_bias and self.score_function != "sigmoid":
            raise ValueError("moe_router_enable_expert_bias: megatron-core's expert bias needs "
                             "moe_router_score_function sigmoid")
        if (self.num_groups is None) != (self.group_topk is None):
            raise ValueError("moe_router_group_topk: group-limited routing needs both it and moe_router_num_groups")
        if self.num_groups is not None:
            positive("moe_router_num_groups", self.num_groups)
            positive("moe_router_group_topk", self.group_topk)
            if self.num_experts % self.num_groups or self.group_topk > self.num_groups:
                raise ValueError(f"moe_router_num_groups: {self.num_groups} groups must divide num_moe_experts "
                                 f"{self.num_experts}, and moe_router_group_topk {self.group_topk} be at most that")
        if self.scaling_factor is not None and not (self.scaling_factor > 0 and math.isfinite(self.scaling_factor)):
            raise ValueError(f"moe_router_topk_scaling_factor: must be positive, got {self.scaling_factor}")


SCORE_FUNCTIONS = ("softmax", "sigmoid")
