"""Width maps shared by function-preserving growth operators.

`UnitMap` replicates units (heads, query groups, FFN neurons) circularly; `ResidualMap` is LEMON's
average expansion of the residual stream. Both offer `expand` (copy rows/entries that *produce* the
units) and `split_fanin` (divide the weights that *read* the units among the copies so that the
copies sum to the original, with random cancelling noise that breaks symmetry).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch


def seeded_generator(seed: int, *names: object) -> torch.Generator:
    """A generator keyed by (seed, names): results never depend on the order tensors are visited."""
    key = zlib.crc32(repr(names).encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + key) % (2**63))


def _along(t: torch.Tensor, dim: int):
    return t.movedim(dim, 0)


@dataclass(frozen=True)
class UnitMap:
    """Target unit j copies source unit index[j] (index -1: a free unit that copies nothing)."""

    index: torch.Tensor  # [n_dst] long
    n_src: int

    @classmethod
    def circular(cls, n_src: int, n_dst: int) -> "UnitMap":
        """Unit j copies j mod n_src: the first n_dst mod n_src units get one extra copy."""
        if n_dst < n_src:
            raise ValueError(f"cannot map {n_src} units onto fewer ({n_dst})")
        return cls(torch.arange(n_dst) % n_src, n_src)

    @property
    def n_dst(self) -> int:
        return self.index.numel()

    @property
    def copied(self) -> torch.Tensor:
        return self.index >= 0

    def counts(self) -> torch.Tensor:
        """Copies of each source unit, [n_src]."""
        return torch.bincount(self.index[self.copied], minlength=self.n_src)

    def expand(self, t: torch.Tensor, dim: int, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Replicate the units along `dim`; free units take `fill` (broadcast), else zero."""
        src = _along(t, dim)
        out = src.new_zeros((self.n_dst, *src.shape[1:]))
        out[self.copied] = src.index_select(0, self.index[self.copied])
        if fill is not None and not bool(self.copied.all()):
            out[~self.copied] = fill.to(out.dtype)
        return out.movedim(0, dim)

    def split_fanin(self, t: torch.Tensor, dim: int, gen: torch.Generator, std: float) -> torch.Tensor:
        """Weights that read the units: copy j of unit u gets t_u / c_u + R_j - mean_{copies of u} R.

        The copies sum to t_u exactly (LEMON's `proj` rule with R ~ N(0, std²)); free units get R.
        With one copy the noise cancels and the weights are unchanged.
        """
        src = _along(t, dim).float()
        noise = torch.randn((self.n_dst, *src.shape[1:]), generator=gen) * std
        idx = self.index[self.copied]
        single = torch.zeros(self.n_dst, dtype=torch.bool)
        single[self.copied] = self.counts()[idx] == 1
        noise[single] = 0.0  # a unit with one copy keeps its weights bit for bit
        out = noise.clone()
        counts = self.counts().clamp(min=1).to(src.dtype).view(-1, *[1] * (src.dim() - 1))
        noise_mean = torch.zeros_like(src).index_add_(0, idx, noise[self.copied]) / counts
        out[self.copied] = src.index_select(0, idx) / counts.index_select(0, idx) \
            + noise[self.copied] - noise_mean.index_select(0, idx)
        return out.movedim(0, dim).to(t.dtype)


@dataclass(frozen=True)
class ResidualMap:
    """LEMON §4.1 average expansion: x* = [x, x, ... (k copies), fill·1_r] with r = D_T - k·D_S.

    The fill is mean(x) for LayerNorm, which keeps the mean and scales the variance by s = k·D_S/D_T,
    and 0 for RMSNorm (derived here: a zero residue scales the mean square by the same s).
    """

    src: int
    dst: int
    mean_fill: bool

    @property
    def k(self) -> int:
        return self.dst // self.src

    @property
    def r(self) -> int:
        return self.dst - self.k * self.src

    @property
    def s(self) -> float:
        """Variance (or mean-square) ratio of the expanded stream: k·D_S / D_T."""
        return self.k * self.src / self.dst

    @property
    def copies(self) -> UnitMap:
        """The k copies as a unit map; the r residue channels are free."""
        idx = torch.cat([torch.arange(self.src).repeat(self.k), torch.full((self.r,), -1)])
        return UnitMap(idx, self.src)

    def expand(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Map anything that writes the residual stream (embeddings, block output rows, biases)."""
        fill = _along(t, dim).mean(0) if self.mean_fill else None
        return self.copies.expand(t, dim, fill)

    def split_fanin(self, t: torch.Tensor, dim: int, gen: torch.Generator, std: float) -> torch.Tensor:
        """Map weights that read the normalised stream [y × k, 0_r]; residue columns are free."""
        return self.copies.split_fanin(t, dim, gen, std)
