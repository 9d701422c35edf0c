"""Rotary position embeddings' settings as typed records (their angles are `core/rope.py`): the base
and the share of each head rotated, Llama 3's scaling, linear interpolation, YaRN, and the plain rope
of sliding-window layers (Gemma 3). Spelled flat in Megatron-LM's names, like every feature record."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from scalegrow.core.features import FEATURE, Record, megatron, positive


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
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor, 1.0)

    def softmax_mscale(self) -> float:
        """DeepSeek's (multi-latent attention's) extra softmax factor, mscale(factor, mscale_all_dim)²
        (megatron-core's MLA and transformers' DeepSeek-V2/V3 apply it; 1 without mscale_all_dim)."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    def validate(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"yarn_rotary_scaling_factor: must be positive, got {self.factor}")
        positive("yarn_original_max_position_embeddings", self.original_max_position)


def yarn_mscale(factor: float, mscale: float) -> float:
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
    # the plain, unscaled rope of sliding-window layers at this base (Gemma 3's local 10000 beside its
    # global 1e6); None: every layer has the same rope
    local_base: int | None = megatron("rotary_base_local", None)

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
        if self.local_base is not None:
            positive("rotary_base_local", self.local_base)
        if self.scaling is not None:
            self.scaling.validate()
        if self.yarn is not None:
            self.yarn.validate()
        if self.yarn is not None and (self.scaling is not None or self.interpolation is not None):
            raise ValueError("use_yarn: YaRN replaces Llama 3's scaling and linear interpolation; set one of them")
