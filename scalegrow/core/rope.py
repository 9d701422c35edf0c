"""Rotary angles (RoFormer, arXiv 2104.09864, §3.4) as megatron-core's RotaryEmbedding and
transformers' rope functions compute them: the plain inverse frequencies, Llama 3's scaling of them,
and linear position interpolation (Chen et al., arXiv 2306.15595, §2.3).

Growth keeps the head dimension (rope's `dim`), so a scaled rope stays the same function in a grown model.
"""
from __future__ import annotations

import math

import torch

from scalegrow.core.features import Rope, RopeScaling


def inv_freq(rope: Rope, dim: int, device=None) -> torch.Tensor:
    """[dim / 2] inverse frequencies: 1 / base^(2i / dim), then Llama 3's scaling where it applies."""
    plain = 1.0 / (rope.base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    return plain if rope.scaling is None else llama3_scaled(plain, rope.scaling)


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
