"""A model's features as typed records: attention, rope, norm, MLP, embedding and MoE.

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
    qkv_bias: bool = megatron("add_qkv_bias", False)  # q/k/v biases without the other linear ones (Qwen2)
    # (left, right): a query sees the `left` keys before it and itself (transformers' sliding_window
    # is left + 1); right is 0, causal. None: full attention everywhere
    window: tuple[int, int] | None = megatron("window_size", None)
    # which layers the window applies to: None every layer; N every layer but each N-th (1-based); or
    # one 1/0 per layer (1: the window). megatron-core's window_attn_skip_freq
    window_layers: int | tuple[int, ...] | None = megatron("window_attn_skip_freq", None, LAYERS)

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
class RopeScaling(Record):
    """Llama 3's frequency-dependent rope scaling (transformers' rope_type "llama3"; Megatron-LM's
    --use-rope-scaling --rope-scaling-factor). Wavelengths shorter than original/high are kept, those
    longer than original/low are stretched by `factor`, and the band between is interpolated smoothly.
    megatron-core fixes low 1, high 4 and original 8192; only `factor` is one of its arguments."""

    factor: float = megatron("rope_scaling_factor", 8.0)
    low_freq_factor: float = megatron("rope_scaling_low_freq_factor", 1.0)
    high_freq_factor: float = megatron("rope_scaling_high_freq_factor", 4.0)
    original_max_position: int = megatron("rope_scaling_original_max_position_embeddings", 8192)

    @property
    def megatron_core_constants(self) -> bool:
        """Whether megatron-core's fixed low/high/original are this model's."""
        return (self.low_freq_factor, self.high_freq_factor, self.original_max_position) == (1.0, 4.0, 8192)

    def validate(self) -> None:
        if not self.factor >= 1.0:
            raise ValueError(f"rope_scaling_factor: must be at least 1, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"rope_scaling_high_freq_factor: must exceed rope_scaling_low_freq_factor > 0, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")
        positive("rope_scaling_original_max_position_embeddings", self.original_max_position)


@dataclass(frozen=True)
class Yarn(Record):
    """YaRN (Peng et al., arXiv 2309.00071, §3.2-3.4; transformers' rope_type "yarn", Qwen2.5 and Qwen3's
    long contexts): frequencies that turn fewer than `beta_slow` times over the original context are
    divided by `factor`, those turning more than `beta_fast` times are kept, a linear ramp between; cos
    and sin are scaled by the attention factor (0.1 ln(factor) + 1 unless given, or the ratio of the
    mscale and mscale_all_dim terms). Flat names are megatron-core's GPTModel's `yarn_*` settings."""

    factor: float = megatron("yarn_rotary_scaling_factor", 1.0)
    original_max_position: int = megatron("yarn_original_max_position_embeddings", 4096)
    beta_fast: float = megatron("yarn_beta_fast", 32.0)
    beta_slow: float = megatron("yarn_beta_slow", 1.0)
    mscale: float | None = megatron("yarn_mscale", None)
    mscale_all_dim: float | None = megatron("yarn_mscale_all_dim", None)
    attention_factor: float | None = megatron("yarn_attention_factor", None)  # None: derived as above
    truncate: bool = megatron("yarn_correction_range_round_to_int", True)  # round the ramp's ends outward

    def scale(self) -> float:
        """What cos and sin are multiplied by (transformers' attention_factor)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor, 1.0)

    def validate(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"yarn_rotary_scaling_factor: must be positive, got {self.factor}")
        positive("yarn_original_max_position_embeddings", self.original_max_position)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class Rope(Record):
    """Rotary position embeddings (read where `embedding.position` is 'rope'), optionally scaled:
    Llama 3's `scaling` (a record of its own), linear position interpolation (transformers' rope_type
    "linear"; Megatron-LM's --rotary-seq-len-interpolation-factor: positions / factor), or YaRN."""

    base: int = megatron("rotary_base", 10000)
    percent: float = megatron("rotary_percent", 1.0)  # the share of each head's channels rotated
    interpolation: float | None = megatron("rotary_seq_len_interpolation_factor", None)
    scaling: RopeScaling | None = None  # flat: use_rope_scaling and RopeScaling's keys
    yarn: Yarn | None = None  # flat: use_yarn and Yarn's keys

    @classmethod
    def flat_keys(cls) -> dict[str, tuple[Any, str]]:
        return {**super().flat_keys(), "use_rope_scaling": (bool, FEATURE), **RopeScaling.flat_keys(),
                "use_yarn": (bool, FEATURE), **Yarn.flat_keys()}

    @classmethod
    def flat_kwargs(cls, flat: Mapping[str, Any]) -> dict[str, Any]:
        scaling = RopeScaling.from_flat(flat) if flat.get("use_rope_scaling") else None
        yarn = Yarn.from_flat(flat) if flat.get("use_yarn") else None
        return {**super().flat_kwargs(flat), "scaling": scaling, "yarn": yarn}

    def to_flat(self) -> dict[str, Any]:
        # an unscaled rope spells RopeScaling's and Yarn's defaults, as a dense model spells MoE's
        return {**super().to_flat(), "use_rope_scaling": self.scaling is not None,
                **(self.scaling or RopeScaling()).to_flat(), "use_yarn": self.yarn is not None,
                **(self.yarn or Yarn()).to_flat()}

    def dim(self, head_dim: int) -> int:
        """Channels rotated per head."""
        return head_dim if self.percent >= 1.0 else int(head_dim * self.percent)

    def validate(self, head_dim: int, used: bool) -> None:
        if not 0.0 < self.percent <= 1.0:
            raise ValueError(f"rotary_percent: must be in (0, 1], got {self.percent}")
        if used and int(head_dim * self.percent) % 2:
            raise ValueError(f"rotary_percent: kv_channels * rotary_percent must be even, got "
                             f"{head_dim} * {self.percent}")
        if self.interpolation is not None and not self.interpolation > 0:
            raise ValueError(f"rotary_seq_len_interpolation_factor: must be positive, got {self.interpolation}")
        if self.scaling is not None:
            self.scaling.validate()
        if self.yarn is not None:
            self.yarn.validate()
        if self.yarn is not None and (self.scaling is not None or self.interpolation is not None):
            raise ValueError("use_yarn: YaRN replaces Llama 3's scaling and linear interpolation; set one of them")


@dataclass(frozen=True)
class Norm(Record):
    """The model's norms: before attention, before the MLP, at the end (and q/k norms)."""

    kind: str = megatron("normalization", "LayerNorm")
    eps: float = megatron("norm_epsilon", 1e-5, FREE)

    @property
    def has_bias(self) -> bool:
        return self.kind == "LayerNorm"

    def validate(self) -> None:
        if self.kind not in NORMALIZATIONS:
            raise ValueError(f"normalization: {self.kind!r} is not one of {NORMALIZATIONS}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"norm_epsilon: must be positive, got {self.eps}")


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
        return {"ffn_hidden_size": (int | None, SIZE), "swiglu": (bool, FEATURE), "openai_gelu": (bool, FEATURE)}

    @classmethod
    def flat_kwargs(cls, flat: Mapping[str, Any]) -> dict[str, Any]:
        swiglu, tanh = bool(flat.get("swiglu", False)), bool(flat.get("openai_gelu", False))
        if swiglu and tanh:
            raise ValueError("openai_gelu: SwiGLU's activation is SiLU; the GELU approximation does not apply")
        return dict(ffn_hidden_size=flat.get("ffn_hidden_size"), gated=swiglu,
                    activation="silu" if swiglu else "gelu_tanh" if tanh else "gelu")

    def to_flat(self) -> dict[str, Any]:
        return {"ffn_hidden_size": self.ffn_hidden_size, "swiglu": self.gated and self.activation == "silu",
                "openai_gelu": self.activation == "gelu_tanh"}

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

    @property
    def learned_positions(self) -> bool:
        return self.position == "learned_absolute"

    def validate(self) -> None:
        if self.position not in POSITION_TYPES:
            raise ValueError(f"position_embedding_type: {self.position!r} is not one of {POSITION_TYPES}")


@dataclass(frozen=True)
class MoE(Record):
    """Mixture-of-Experts layers (Megatron-LM's --num-experts etc.): a top-k router, SequentialMLP
    experts, an optional shared expert. `ModelConfig.moe` is None for a dense model."""

    num_experts: int = megatron("num_moe_experts", role=SIZE)
    topk: int = megatron("moe_router_topk", 2, SIZE)
    ffn_hidden_size: int | None = megatron("moe_ffn_hidden_size", None, SIZE)  # None: the dense FFN's
    layer_freq: int = megatron("moe_layer_freq", 1)  # layer i is MoE when i % layer_freq == 0
    pre_softmax: bool = megatron("moe_router_pre_softmax", False)  # softmax over all experts, then top-k
    aux_loss_coeff: float = megatron("moe_aux_loss_coeff", 0.0, FREE)  # the load-balancing loss's weight
    shared_size: int | None = megatron("moe_shared_expert_intermediate_size", None, SIZE)  # always-on FFN
    shared_gate: bool = megatron("moe_shared_expert_gate", False)  # its output times sigmoid(x · gate)

    @classmethod
    def dense_flat(cls) -> dict[str, Any]:
        """What a dense model spells for these keys: no experts, every other field at its default."""
        return {f.metadata["megatron"]: None if f.default is MISSING else f.default for f in fields(cls)}

    def validate(self, add_bias_linear: bool) -> None:
        for name, value in (("num_moe_experts", self.num_experts), ("moe_router_topk", self.topk),
                            ("moe_ffn_hidden_size", self.ffn_hidden_size), ("moe_layer_freq", self.layer_freq)):
            positive(name, value)
        if self.topk > self.num_experts:
            raise ValueError(f"moe_router_topk: {self.topk} exceeds num_moe_experts {self.num_experts}")
        if self.topk == 1 and not self.pre_softmax:  # megatron-core's rule: a softmax of one is 1
            raise ValueError("moe_router_pre_softmax: must be true when moe_router_topk is 1")
        if self.shared_size is not None:
            positive("moe_shared_expert_intermediate_size", self.shared_size)
        if self.shared_size and add_bias_linear:  # megatron-core asserts it
            raise ValueError("moe_shared_expert_intermediate_size: megatron-core's shared experts have no "
                             "biases (add_bias_linear must be false)")
        if self.shared_gate and not self.shared_size:
            raise ValueError("moe_shared_expert_gate: needs moe_shared_expert_intermediate_size")
