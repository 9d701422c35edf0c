"""`ModelConfig`: the one description of a GPT model that every other module reads.

Its sizes sit at the top (layers, hidden size, vocabulary); each feature is a typed record of its own
(`core/features.py`: attention, rope, norm, MLP, embedding, MoE). At the boundary it is spelled in
Megatron-LM's flat argument names: YAML targets (`from_yaml`, keys left out keep a base config's
values), `to_dict`/`from_dict` (what `scalegrow.json` records), and Megatron `args`
(`formats/megatron_args.py`). Parameter and FLOP counts come from the tensor table (`core/counts.py`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Mapping

from scalegrow.core.features import (
    FEATURE,
    FREE,
    MLP,
    SIZE,
    Attention,
    Embedding,
    MoE,
    Norm,
    Record,
    megatron,
    positive,
)
from scalegrow.core.mla_config import MLA
from scalegrow.core.rope_config import Rope
from scalegrow.core.typed import coerce, load_yaml_mapping
from scalegrow.errors import InputError

RECORDS = {"attention": Attention, "mlp": MLP, "norm": Norm, "embedding": Embedding, "rope": Rope, "moe": MoE,
           "mla": MLA}
ABSENT = {"moe": MoE.dense_flat, "mla": MLA.absent_flat}  # how a model without the record spells its keys


@dataclass(frozen=True)
class ModelConfig(Record):
    """A GPT model: its sizes, and a record per feature (see the module docstring)."""

    num_layers: int = megatron("num_layers", role=SIZE)
    hidden_size: int = megatron("hidden_size", role=SIZE)
    padded_vocab_size: int = megatron("padded_vocab_size")  # the embedding's rows (Megatron pads the vocabulary)
    attention: Attention = field(default=None)  # required: its heads
    mlp: MLP = field(default_factory=MLP)
    norm: Norm = field(default_factory=Norm)
    embedding: Embedding = field(default_factory=Embedding)
    rope: Rope = field(default_factory=Rope)
    moe: MoE | None = None  # None: a dense FFN in every layer
    mla: MLA | None = None  # None: the usual attention (QKV in query groups)
    add_bias_linear: bool = megatron("add_bias_linear", True)  # biases on every linear layer
    max_position_embeddings: int = megatron("max_position_embeddings", 2048)
    init_method_std: float = megatron("init_method_std", 0.02, FREE)
    make_vocab_size_divisible_by: int = megatron("make_vocab_size_divisible_by", 128, FREE)
    vocab_size: int | None = megatron("vocab_size", None, FREE)  # the tokenizer's, when known
    final_softcap: float | None = megatron("final_logit_softcapping", None)  # logits -> cap·tanh(logits/cap)

    def __post_init__(self) -> None:
        # Resolve the Megatron "None means derived" defaults so every reader sees concrete numbers.
        if self.attention is None:
            raise ValueError("num_attention_heads: required key missing")
        resolve = {"attention": self.attention.resolved(self.hidden_size)}
        if self.mlp.ffn_hidden_size is None:
            resolve["mlp"] = dataclasses.replace(self.mlp, ffn_hidden_size=4 * self.hidden_size)
        if self.moe is not None and self.moe.ffn_hidden_size is None:
            ffn = resolve.get("mlp", self.mlp).ffn_hidden_size
            resolve["moe"] = dataclasses.replace(self.moe, ffn_hidden_size=ffn)
        for name, value in resolve.items():
            object.__setattr__(self, name, value)
        self.validate()

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "padded_vocab_size", "max_position_embeddings"):
            positive(name, getattr(self, name))
        self.mlp.validate()
        self.attention.validate(self.hidden_size, self.num_layers)
        self.norm.validate()
        self.embedding.validate()
        rope_dim = self.mla.qk_pos_emb_head_dim if self.mla else self.attention.head_dim
        self.rope.validate(rope_dim, used=self.embedding.position == "rope")
        if self.moe is not None:
            self.moe.validate(self.add_bias_linear, self.num_layers)
        if self.mla is not None:
            self._validate_mla()
        if self.final_softcap is not None and not self.final_softcap > 0:
            raise ValueError(f"final_logit_softcapping: must be positive, got {self.final_softcap}")
        if self.vocab_size is not None and self.vocab_size > self.padded_vocab_size:
            raise ValueError(f"vocab_size: {self.vocab_size} exceeds padded_vocab_size {self.padded_vocab_size}")

    def _validate_mla(self) -> None:
        """What megatron-core's MLASelfAttention has: every head its own (no query groups), rope on its
        own channels (all of them), no q/k/v biases, no windows or soft-caps."""
        self.mla.validate()
        a = self.attention
        not_mla = {  # flat name -> whether this model has it, which MLA does not
            "num_query_groups": a.groups != a.heads,
            "position_embedding_type": self.embedding.position != "rope",
            "rotary_percent": self.rope.percent != 1.0,
            "add_qkv_bias": a.qkv_bias,
            "qk_layernorm_across_heads": a.qk_norm_across_heads,
            "window_size": a.window is not None,
            "attn_logit_softcapping": a.softcap is not None,
            "rotary_base_local": self.rope.local_base is not None,
            "normalization": self.norm.kind != "RMSNorm",
        }
        for name, bad in not_mla.items():
            if bad:
                raise ValueError(f"{name}: {self.to_dict()[name]!r} does not apply to multi-latent attention")

    # ---- what the records say together ------------------------------------------------------
    @property
    def proj_in(self) -> int:
        """Columns of linear_proj: every head's output (v_head_dim each under MLA)."""
        return self.attention.heads * self.mla.v_head_dim if self.mla else self.attention.proj_in

    @property
    def has_qkv_bias(self) -> bool:
        return self.add_bias_linear or self.attention.qkv_bias

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(index)

    def window_pattern(self) -> list[bool]:
        """Per layer, whether it attends within the sliding window."""
        return [self.attention.windowed(i) for i in range(self.num_layers)]

    def with_layer_origins(self, src: "ModelConfig", origins: list[int]) -> "ModelConfig":
        """This model with each layer j's per-layer settings (the sliding window, dense or MoE) taken
        from source layer `origins[j]`: what an operator whose target layer j comes from that layer writes."""
        changes = {}
        if src.attention.window is not None:
            changes["window_attn_skip_freq"] = compact_pattern([int(src.attention.windowed(i)) for i in origins])
        if src.moe is not None and self.moe is not None:  # a target layer has its source layer's type
            changes["moe_layer_freq"] = moe_pattern([int(src.is_moe_layer(i)) for i in origins])
        return self.replace(**changes) if changes else self

    def features(self) -> dict[str, Any]:
        """The settings no width or depth operator changes (flat names): a target keeps its source's."""
        return self._with_role(FEATURE)

    def sizes(self) -> dict[str, Any]:
        """What growth and shrinking change (flat names): layers, widths, heads, experts."""
        return self._with_role(SIZE)

    def _with_role(self, role: str) -> dict[str, Any]:
        roles = flat_keys()
        return {key: value for key, value in self.to_dict().items() if roles[key][1] == role}

    def check_tp(self, tp: int) -> None:
        """Raise if this model cannot be split over `tp` tensor-parallel ranks."""
        flat = self.to_dict()
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "padded_vocab_size",
                     "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if flat[name] is not None and flat[name] % tp:
                raise ValueError(f"{name}: {flat[name]} is not divisible by tensor parallel size {tp}")
        if self.mla and any(rows % tp for rows in (self.mla.q_lora_rank or 0, self.mla.kv_down_rows)):  # split downs
            raise ValueError(f"q_lora_rank: {self.mla.q_lora_rank} and kv_lora_rank + qk_pos_emb_head_dim "
                             f"{self.mla.kv_down_rows} must be divisible by tensor parallel size {tp} (megatron-core's "
                             f"local spec splits the latents' down projections)")
        if self.moe and self.add_bias_linear and tp > 1:  # megatron-core's rule, as it asserts
            raise ValueError(f"add_bias_linear: megatron-core supports MoE biases only without tensor "
                             f"parallel experts; write this model at tensor parallel size 1, not {tp}")

    # ---- the flat boundary (Megatron-LM names) ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = self.to_flat()
        for name, record in RECORDS.items():
            value = getattr(self, name)
            out.update(ABSENT[name]() if value is None else value.to_flat())
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "ModelConfig":
        """From Megatron-named values (checked and typed already); missing ones take defaults."""
        records = {name: record.from_flat(flat) for name, record in RECORDS.items() if name not in ABSENT}
        moe = MoE.from_flat(flat) if flat.get("num_moe_experts") is not None else None
        mla = MLA.from_flat(flat) if flat.get("multi_latent_attention") else None
        return cls(**cls.flat_kwargs(flat), **records, moe=moe, mla=mla)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some Megatron-named values changed (`replace(hidden_size=128, swiglu=True)`)."""
        unknown = set(changes) - set(flat_keys())
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown model config key")
        return ModelConfig.from_flat({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: "ModelConfig | None" = None) -> "ModelConfig":
        """Build from Megatron-named keys; keys left out keep `base`'s value. Unknown keys raise."""
        known = flat_keys()
        for key in data:
            if key not in known:
                raise ValueError(f"{key}: unknown model config key (known: {', '.join(sorted(known))})")
        values = base.to_dict() if base is not None else {}
        if base is not None:
            _drop_derived(values, base, data)
        values.update({k: coerce(known[k][0], v, k) for k, v in data.items()})
        for key in REQUIRED:
            if values.get(key) is None:
                raise ValueError(f"{key}: required key missing")
        return cls.from_flat(values)

    @classmethod
    def from_yaml(cls, path: str | Path, base: "ModelConfig | None" = None) -> "ModelConfig":
        data = load_yaml_mapping(path)
        try:
            return cls.from_dict(data, base=base)
        except ValueError as exc:
            raise InputError(f"{path}: {exc}") from exc


REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")


@cache
def flat_keys() -> dict[str, tuple[Any, str]]:
    """Every flat (Megatron-LM) name a model config is spelled in -> (type hint, role)."""
    return {**ModelConfig.flat_keys(), **{k: v for record in RECORDS.values() for k, v in record.flat_keys().items()}}


def _drop_derived(values: dict[str, Any], base: ModelConfig, overrides: Mapping[str, Any]) -> None:
    """Re-derive defaults that followed a changed size, unless the source set them explicitly.

    A key left out keeps its source value, except the query groups of an MHA source (MHA stays MHA
    when the number of heads grows) and the per-layer lists at a new depth (the window's repeated,
    the MoE layers' stretched, so DeepSeek's dense first layers stay first; an operator then gives
    each layer its source layer's).
    """
    if base.attention.groups == base.attention.heads and "num_query_groups" not in overrides:
        values["num_query_groups"] = None
    layers, pattern = overrides.get("num_layers", base.num_layers), base.attention.window_layers
    if isinstance(pattern, tuple) and "window_attn_skip_freq" not in overrides and layers != base.num_layers:
        values["window_attn_skip_freq"] = compact_pattern([pattern[i % len(pattern)] for i in range(layers)])
    moe = base.moe.layer_freq if base.moe else None
    if isinstance(moe, tuple) and "moe_layer_freq" not in overrides and layers != base.num_layers:
        values["moe_layer_freq"] = moe_pattern([moe[i * len(moe) // layers] for i in range(layers)])


def compact_pattern(pattern: list[int]) -> int | list[int] | None:
    """megatron-core's spelling of a per-layer window pattern (1: window): None when every layer has
    it, N when exactly every N-th layer (1-based) has full attention, else the list itself."""
    if all(pattern):
        return None
    for n in range(2, len(pattern) + 1):
        if pattern == [int((i + 1) % n != 0) for i in range(len(pattern))]:
            return n
    return list(pattern)


def moe_pattern(pattern: list[int]) -> int | list[int]:
    """megatron-core's spelling of which layers are MoE (1): N when exactly every N-th layer from the
    first is, else the list itself."""
    for n in range(1, len(pattern) + 1):
        if pattern == [int(i % n == 0) for i in range(len(pattern))]:
            return n
    return list(pattern)
