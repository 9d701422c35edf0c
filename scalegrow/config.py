"""Typed model config with Megatron-LM argument names.

`ModelConfig` is the single description of a GPT model that every other module reads. It is built
from a Megatron checkpoint's `args` Namespace, from a YAML file of Megatron names, or from a source
config plus YAML overrides (`--target`), and it writes itself back into a Megatron `args` Namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from scalegrow.errors import InputError

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_TYPES = ("learned_absolute", "rope")


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    padded_vocab_size: int
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size
    num_query_groups: int | None = None  # None: MHA (= num_attention_heads)
    kv_channels: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False  # a norm over each head's queries and keys, before rope (Qwen3)
    openai_gelu: bool = False  # GELU's tanh approximation (GPT-2) instead of the exact one
    init_method_std: float = 0.02
    # Mixture-of-Experts (Megatron-LM's --num-experts etc.; None: a dense FFN in every layer)
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None  # None: ffn_hidden_size
    moe_layer_freq: int = 1  # layer i is MoE when i % moe_layer_freq == 0
    moe_router_pre_softmax: bool = False  # softmax over all experts before top-k (else over the top k)
    moe_aux_loss_coeff: float = 0.0  # weight of the load-balancing loss in training (Megatron-LM's default)
    moe_shared_expert_intermediate_size: int | None = None  # an always-on FFN beside the routed experts
    moe_shared_expert_gate: bool = False  # its output times sigmoid(x · gate_weight) (Qwen2-MoE)
    make_vocab_size_divisible_by: int = 128
    vocab_size: int | None = None  # unpadded tokenizer size, when known

    def __post_init__(self) -> None:
        # Resolve the Megatron "None means derived" defaults so every reader sees concrete numbers.
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.kv_channels is None and self.num_attention_heads:
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        if self.num_moe_experts and self.moe_ffn_hidden_size is None:
            object.__setattr__(self, "moe_ffn_hidden_size", self.ffn_hidden_size)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV weight: [ng, (np/ng + 2), hn] flattened."""
        return self.num_query_groups * (self.heads_per_group + 2) * self.kv_channels

    @property
    def fc1_rows(self) -> int:
        return self.ffn_hidden_size * (2 if self.swiglu else 1)

    def is_moe_layer(self, index: int) -> bool:
        return bool(self.num_moe_experts) and index % self.moe_layer_freq == 0

    @property
    def expert_fc1_rows(self) -> int:
        return self.moe_ffn_hidden_size * (2 if self.swiglu else 1)

    @property
    def shared_fc1_rows(self) -> int:
        return (self.moe_shared_expert_intermediate_size or 0) * (2 if self.swiglu else 1)

    @property
    def has_linear_bias(self) -> bool:
        return self.add_bias_linear

    @property
    def has_qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

    @property
    def has_norm_bias(self) -> bool:
        return self.normalization == "LayerNorm"

    @property
    def tied(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size",
                     "ffn_hidden_size", "num_query_groups", "kv_channels", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads: {self.num_attention_heads} does not divide "
                             f"hidden_size {self.hidden_size}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_query_groups: {self.num_query_groups} does not divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization: {self.normalization!r} is not one of {NORMALIZATIONS}")
        if self.position_embedding_type not in POSITION_TYPES:
            raise ValueError(f"position_embedding_type: {self.position_embedding_type!r} is not one of "
                             f"{POSITION_TYPES}")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent: must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding_type == "rope" and int(self.kv_channels * self.rotary_percent) % 2:
            raise ValueError(f"rotary_percent: kv_channels * rotary_percent must be even, got "
                             f"{self.kv_channels} * {self.rotary_percent}")
        if not (self.norm_epsilon > 0 and math.isfinite(self.norm_epsilon)):
            raise ValueError(f"norm_epsilon: must be positive, got {self.norm_epsilon}")
        if self.openai_gelu and self.swiglu:
            raise ValueError("openai_gelu: SwiGLU's activation is SiLU; the GELU approximation does not apply")
        if self.num_moe_experts is not None:
            self._validate_moe()
        if self.vocab_size is not None and self.vocab_size > self.padded_vocab_size:
            raise ValueError(f"vocab_size: {self.vocab_size} exceeds padded_vocab_size "
                             f"{self.padded_vocab_size}")

    def _validate_moe(self) -> None:
        for name in ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.moe_router_topk > self.num_moe_experts:
            raise ValueError(f"moe_router_topk: {self.moe_router_topk} exceeds num_moe_experts {self.num_moe_experts}")
        if self.moe_router_topk == 1 and not self.moe_router_pre_softmax:  # megatron-core's rule: a softmax
            raise ValueError("moe_router_pre_softmax: must be true when moe_router_topk is 1")  # of one is 1
        shared = self.moe_shared_expert_intermediate_size
        if shared is not None and (not isinstance(shared, int) or isinstance(shared, bool) or shared <= 0):
            raise ValueError(f"moe_shared_expert_intermediate_size: must be a positive integer, got {shared!r}")
        if shared and self.add_bias_linear:  # megatron-core asserts it
            raise ValueError("moe_shared_expert_intermediate_size: megatron-core's shared experts have no "
                             "biases (add_bias_linear must be false)")
        if self.moe_shared_expert_gate and not shared:
            raise ValueError("moe_shared_expert_gate: needs moe_shared_expert_intermediate_size")

    def check_tp(self, tp: int) -> None:
        """Raise if this model cannot be split over `tp` tensor-parallel ranks."""
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "padded_vocab_size",
                     "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if getattr(self, name) is not None and getattr(self, name) % tp:
                raise ValueError(f"{name}: {getattr(self, name)} is not divisible by tensor parallel "
                                 f"size {tp}")
        if self.num_moe_experts and self.has_linear_bias and tp > 1:  # megatron-core's rule, as it asserts
            raise ValueError(f"add_bias_linear: megatron-core supports MoE biases only without tensor "
                             f"parallel experts; write this model at tensor parallel size 1, not {tp}")

    # ---- conversions ---------------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: "ModelConfig | None" = None) -> "ModelConfig":
        """Build from Megatron-named keys; keys left out keep `base`'s value. Unknown keys raise."""
        known = {f.name: f for f in fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in data:
            if key not in known:
                raise ValueError(f"{key}: unknown model config key (known: {', '.join(sorted(known))})")
        values = base.to_dict() if base is not None else {}
        if base is not None:
            _drop_derived(values, base, data)
        values.update({k: coerce(hints[k], v, k) for k, v in data.items()})
        try:
            return cls(**values)
        except TypeError as exc:  # a required key is missing
            missing = sorted(k for k, f in known.items() if f.default is dataclasses.MISSING
                             and k not in values)
            raise ValueError(f"{missing[0] if missing else 'config'}: required key missing") from exc

    @classmethod
    def from_yaml(cls, path: str | Path, base: "ModelConfig | None" = None) -> "ModelConfig":
        data = load_yaml_mapping(path)
        try:
            return cls.from_dict(data, base=base)
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from exc

    @classmethod
    def from_megatron_args(cls, args: argparse.Namespace) -> "ModelConfig":
        a = vars(args)
        gqa = bool(a.get("group_query_attention"))
        norm_eps = a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))
        return cls(
            num_layers=a["num_layers"], hidden_size=a["hidden_size"],
            num_attention_heads=a["num_attention_heads"],
            padded_vocab_size=a["padded_vocab_size"],
            ffn_hidden_size=a.get("ffn_hidden_size"),
            num_query_groups=a.get("num_query_groups") if gqa else None,
            kv_channels=a.get("kv_channels"),
            max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length") or 2048,
            normalization=a.get("normalization", "LayerNorm"),
            norm_epsilon=float(norm_eps),
            swiglu=bool(a.get("swiglu", False)),
            position_embedding_type=a.get("position_embedding_type", "learned_absolute"),
            rotary_base=int(a.get("rotary_base", 10000)),
            rotary_percent=float(a.get("rotary_percent", 1.0)),
            untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights", False)),
            add_bias_linear=bool(a.get("add_bias_linear", True)),
            add_qkv_bias=bool(a.get("add_qkv_bias", False)),
            qk_layernorm=bool(a.get("qk_layernorm", False)),
            openai_gelu=bool(a.get("openai_gelu", False)),
            init_method_std=float(a.get("init_method_std", 0.02)),
            **_moe_from_args(a),
            make_vocab_size_divisible_by=int(a.get("make_vocab_size_divisible_by", 128)),
            vocab_size=a.get("vocab_size"),
        )

    def to_megatron_args(self, base: argparse.Namespace | None = None, *, tp: int = 1,
                         pp: int = 1) -> argparse.Namespace:
        """Return a copy of `base` (or fresh Megatron-style args) describing this model at TP/PP."""
        args = argparse.Namespace(**vars(base)) if base is not None else _default_megatron_args()
        updates = self.to_dict()
        updates.update(
            group_query_attention=self.num_query_groups != self.num_attention_heads,
            norm_epsilon=self.norm_epsilon,
            layernorm_epsilon=self.norm_epsilon,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            gated_linear_unit=self.swiglu,
        )
        if base is not None and not hasattr(base, "layernorm_epsilon"):
            updates.pop("layernorm_epsilon")
        if base is not None and not hasattr(base, "gated_linear_unit"):
            updates.pop("gated_linear_unit")
        if self.vocab_size is None:
            updates.pop("vocab_size")
        updates["num_experts"] = updates.pop("num_moe_experts")  # Megatron-LM's name
        if getattr(args, "seq_length", None) is None:
            updates["seq_length"] = self.max_position_embeddings
        for key, value in updates.items():
            setattr(args, key, value)
        return args

    def _mlp_parameters(self, index: int) -> int:
        """An FFN's weights, or a router and its experts' in an MoE layer (biases included)."""
        h, bias = self.hidden_size, self.has_linear_bias
        if not self.is_moe_layer(index):
            return self.fc1_rows * h + self.ffn_hidden_size * h + (self.fc1_rows + h if bias else 0)
        shared = self.shared_fc1_rows * h + (self.moe_shared_expert_intermediate_size or 0) * h
        shared += h if self.moe_shared_expert_gate else 0
        return self.num_moe_experts * (h + (1 if bias else 0) + self._expert_parameters()) + shared

    def _expert_parameters(self) -> int:
        h, bias = self.hidden_size, self.has_linear_bias
        return self.expert_fc1_rows * h + self.moe_ffn_hidden_size * h + (self.expert_fc1_rows + h if bias else 0)

    def num_parameters(self) -> int:
        h, L = self.hidden_size, self.num_layers
        attn_out = self.num_attention_heads * self.kv_channels
        norm = h * (2 if self.has_norm_bias else 1)
        layer = 2 * norm + self.qkv_rows * h + attn_out * h
        if self.qk_layernorm:
            layer += 2 * self.kv_channels * (2 if self.has_norm_bias else 1)
        if self.has_qkv_bias:
            layer += self.qkv_rows
        if self.has_linear_bias:
            layer += h
        total = L * layer + norm + self.padded_vocab_size * h
        total += sum(self._mlp_parameters(i) for i in range(L))
        if self.position_embedding_type == "learned_absolute":
            total += self.max_position_embeddings * h
        if not self.tied:
            total += self.padded_vocab_size * h
        return total

    def num_active_parameters(self) -> int:
        """Parameters a token passes through: in an MoE layer the router and only top-k experts."""
        if not self.num_moe_experts:
            return self.num_parameters()
        idle = sum(map(self.is_moe_layer, range(self.num_layers))) * (self.num_moe_experts - self.moe_router_topk)
        return self.num_parameters() - idle * self._expert_parameters()

    def flops_per_token(self, seq_length: int, training: bool = True) -> float:
        """Matmul FLOPs per token (Kaplan 2020 §2.1): 2 per active weight and attention product; training 3x."""
        learned = self.position_embedding_type == "learned_absolute"  # (lookup tables are not matmuls)
        lookups = self.hidden_size * ((not self.tied) * self.padded_vocab_size + learned * self.max_position_embeddings)
        attention = self.num_layers * seq_length * self.num_attention_heads * self.kv_channels
        return (6.0 if training else 2.0) * (self.num_active_parameters() - lookups + attention)


def _moe_from_args(a: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields from Megatron-LM args (`num_experts`, `moe_*`); a layer pattern list is not read."""
    if not a.get("num_experts"):
        return {}
    freq = a.get("moe_layer_freq", 1)
    if not isinstance(freq, int):
        raise ValueError(f"moe_layer_freq: only an every-Nth-layer integer is supported, got {freq!r}")
    return dict(num_moe_experts=int(a["num_experts"]), moe_router_topk=int(a.get("moe_router_topk", 2)),
                moe_ffn_hidden_size=a.get("moe_ffn_hidden_size"), moe_layer_freq=freq,
                moe_router_pre_softmax=bool(a.get("moe_router_pre_softmax", False)),
                moe_aux_loss_coeff=float(a.get("moe_aux_loss_coeff", 0.0) or 0.0),
                moe_shared_expert_intermediate_size=a.get("moe_shared_expert_intermediate_size"),
                moe_shared_expert_gate=bool(a.get("moe_shared_expert_gate", False)))


def _drop_derived(values: dict[str, Any], base: ModelConfig, overrides: Mapping[str, Any]) -> None:
    """Re-derive defaults that followed a changed size, unless the source set them explicitly.

    A key left out keeps its source value, except the query groups of an MHA source:
    MHA stays MHA when the number of heads grows.
    """
    if base.num_query_groups == base.num_attention_heads and "num_query_groups" not in overrides:
        values["num_query_groups"] = None


def coerce(hint: Any, value: Any, where: str) -> Any:
    """Check (and normalise) a YAML value against a type hint; errors name the key.

    Used by ModelConfig and the run configs. `None` passes (validation decides whether it may);
    PyYAML reads `1e-3` (no dot) as a string, so numeric strings are accepted as floats.
    """
    if hint is Any or value is None:
        return value
    args = typing.get_args(hint)
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    if target is bool:
        if isinstance(value, bool):
            return value
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif target is dict:
        if isinstance(value, dict):
            return value
    raise InputError(f"{where}: expected {getattr(target, '__name__', target)}, got {value!r}")


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; every failure is an `InputError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read YAML file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of Megatron argument names, got "
                         f"{type(data).__name__}")
    return data


def _default_megatron_args() -> argparse.Namespace:
    """The Megatron-LM arguments a fresh checkpoint carries besides the model shape."""
    return argparse.Namespace(
        iteration=0, params_dtype=torch.float32, fp16=False, bf16=False,
        tokenizer_type="NullTokenizer", consumed_train_samples=0, consumed_valid_samples=0,
        attention_dropout=0.0, hidden_dropout=0.0, apply_residual_connection_post_layernorm=False,
        transformer_impl="local", use_legacy_models=False, rotary_interleaved=False,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
    )
