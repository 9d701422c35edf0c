"""Rotary angles (RoFormer, arXiv 2104.09864, §3.4) as megatron-core's RotaryEmbedding and
transformers' rope functions compute them: the plain inverse frequencies, Llama 3's scaling of them,
linear position interpolation (Chen et al., arXiv 2306.15595, §2.3), and YaRN's blend of the two
with its attention factor (Peng et al., arXiv 2309.00071, §3.2-3.4).

Growth keeps the head dimension (rope's `dim`), so a scaled rope stays the same function in a grown model.
"""
from __future__ import annotations

import math

import torch

from scalegrow.core.rope_config import Rope, RopeScaling, Yarn


def inv_freq(rope: Rope, dim: int, device=None) -> torch.Tensor:
    """[dim / 2] inverse frequencies: 1 / base^(2i / dim), then Llama 3's scaling or YaRN's blend."""
    plain = 1.0 / (rope.base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if rope.yarn is not None:
        return yarn_blended(plain, rope.yarn, rope.base, dim)
    return plain if rope.scaling is None else llama3_scaled(plain, rope.scaling)


def yarn_blended(freqs: torch.Tensor, y: Yarn, base: float, dim: int) -> torch.Tensor:
    """YaRN §3.2 ("NTK-by-parts"): the frequency of pair d turns original/(2π/f_d) times over the original
    context; pairs below `low` (turning more than beta_fast times) keep f_d, pairs above `high` (fewer
    than beta_slow times) become f_d / factor, and a linear ramp in d blends the two between."""
    def pair_turning(turns: float) -> float:  # the pair index whose frequency turns `turns` times
        return dim * math.log(y.original_max_position / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_turning(y.beta_fast), pair_turning(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=freqs.device) - low) /
            (high - low if high != low else 0.001)).clamp(0, 1)
    return freqs / y.factor * ramp + freqs * (1 - ramp)


def attention_factor(rope: Rope) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor (§3.4), else 1."""
    return rope.yarn.scale() if rope.yarn is not None else 1.0


def llama3_scaled(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rule (Meta's `apply_scaling`): a frequency whose wavelength 2π/f is under
    original/high is kept, one over original/low is divided by `factor`, and between the two the
    result blends f/factor into f linearly in original/wavelength."""
    wavelen = 2 * math.pi / freqs
    long_wave, short_wave = s.original_max_position / s.low_freq_factor, s.original_max_position / s.high_freq_factor
    scaled = torch.where(wavelen > long_wave, freqs / s.factor, freqs)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    between = (wavelen >= short_wave) & (wavelen <= long_wave)
    return torch.where(between, blended, scaled)


def rotary_freqs(rope: Rope, head_dim: int, seq_len: int, device=None) -> torch.Tensor:
    """[seq, rot_dim] angles, cat(freqs, freqs) (non-interleaved, as megatron-core and transformers)."""
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    if rope.interpolation is not None:
        positions = positions / rope.interpolation
    freqs = torch.outer(positions, inv_freq(rope, rope.dim(head_dim), device))
    return torch.cat((freqs, freqs), dim=-1)
