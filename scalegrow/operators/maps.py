"""Width maps shared by function-preserving growth operators.

`UnitMap` replicates units (heads, query groups, FFN neurons); `ResidualMap` is LEMON's average
expansion of the residual stream. Both offer `expand` (copy the weights that *produce* the units) and
`split_fanin` (divide the weights that *read* the units among the copies so that the copies sum to
the original, plus zero-sum noise that breaks the symmetry between copies).

Work runs in row chunks (bounded temporaries), and circular maps (unit j copies j mod n, the common
case) use block slices instead of gathers. Everything also runs on the meta device, for plans.
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import torch

CHUNK_BYTES = 64 * 2**20  # temporaries per chunk of rows
POOL_SIZE = 2**24  # standard normals in the noise pool (64 MiB)


def seeded_generator(seed: int, *names: object) -> torch.Generator:
    """A generator keyed by (seed, names): results never depend on the order tensors are visited."""
    key = zlib.crc32(repr(names).encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + key) % (2**63))


@functools.lru_cache(maxsize=2)
def _pool(seed: int) -> torch.Tensor:
    return torch.randn(POOL_SIZE, generator=torch.Generator().manual_seed(seed))


class Noise:
    """N(0, std²) noise for one tensor, read from a seeded pool of 2^24 standard normals at an offset
    drawn from the tensor's own generator. Drawing hundreds of millions of fresh normals costs seconds
    per GB; reading the pool runs at memory speed. Values repeat only 2^24 elements apart, far beyond
    any row, so two copies of a unit never share their noise."""

    def __init__(self, seed: int, gen: torch.Generator, std: float):
        self.seed, self.std = seed, std
        self.offset = int(torch.randint(0, POOL_SIZE, (1,), generator=gen))

    def take(self, start: int, shape: tuple[int, ...], device: torch.device,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The noise at flat positions [start, start + numel) of the tensor, shaped `shape`
        (written into `out`, a contiguous tensor of that shape, if given)."""
        if device.type == "meta":
            return torch.empty(shape, device=device)
        pool, n = _pool(self.seed), math.prod(shape)
        result = torch.empty(shape) if out is None else out
        out = result.view(-1)
        done, at = 0, (self.offset + start) % POOL_SIZE
        while done < n:  # contiguous pieces of the pool, wrapping around its end
            piece = min(n - done, POOL_SIZE - at)
            torch.mul(pool[at:at + piece], self.std, out=out[done:done + piece])
            done, at = done + piece, 0
        return result


def _as_3d(t: torch.Tensor, dim: int) -> torch.Tensor:
    """View t as [A, n, B] around `dim` (A: dims before it, B: dims after it)."""
    a = math.prod(t.shape[:dim])
    return t.reshape(a, t.shape[dim], -1)


def _row_chunks(a: int, row_bytes: int):
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    return [(i, min(a, i + step)) for i in range(0, a, step)]


@dataclass(frozen=True)
class UnitMap:
    """Target unit j copies source unit index[j] (index -1: a free unit that copies nothing)."""

    index: torch.Tensor  # [n_dst] long
    n_src: int

    @classmethod
    def circular(cls, n_src: int, n_dst: int, free: int = 0) -> "UnitMap":
        """Unit j copies j mod n_src (the first n_dst mod n_src units get one extra copy); `free`
        more units at the end copy nothing."""
        if n_dst < n_src:
            raise ValueError(f"cannot map {n_src} units onto fewer ({n_dst})")
        index = torch.cat([torch.arange(n_dst) % n_src, torch.full((free,), -1)])
        return cls(index, n_src)

    @property
    def n_dst(self) -> int:
        return self.index.numel()

    @functools.cached_property
    def n_copied(self) -> int:
        return int((self.index >= 0).sum())

    @functools.cached_property
    def is_circular(self) -> bool:
        copied = self.index[: self.n_copied]
        return bool((copied == torch.arange(self.n_copied) % self.n_src).all()) and \
            bool((self.index[self.n_copied:] == -1).all())

    def counts(self) -> torch.Tensor:
        """Copies of each source unit, [n_src]."""
        return torch.bincount(self.index[self.index >= 0], minlength=self.n_src)

    # ---- producing side ----------------------------------------------------------------------
    def expand(self, t: torch.Tensor, dim: int, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Replicate the units along `dim`; free units take `fill` (broadcast over them), else zero."""
        src = _as_3d(t, dim)
        shape = (src.shape[0], self.n_dst, src.shape[2])
        if self.is_circular:  # every unit is written below: no zeros first (a pass over the output)
            out = src.new_empty(shape)
            for b in range(0, self.n_copied, self.n_src):
                width = min(self.n_src, self.n_copied - b)
                out[:, b:b + width] = src[:, :width]
            out[:, self.n_copied:] = 0.0
        else:
            out = src.new_zeros(shape)
            pos = torch.nonzero(self.index >= 0).flatten()
            out.index_copy_(1, pos.to(src.device), src.index_select(1, self.index[pos].to(src.device)))
        if fill is not None and self.n_copied < self.n_dst:
            out[:, self.n_copied:] = fill.to(out.dtype).reshape(src.shape[0], 1, -1)
        return out.reshape(*t.shape[:dim], self.n_dst, *t.shape[dim + 1:])

    # ---- reading side ------------------------------------------------------------------------
    def split_fanin(self, t: torch.Tensor, dim: int, noise: Noise) -> torch.Tensor:
        """Weights that read the units: copy j of unit u gets t_u / c_u + R_j - mean_{copies of u} R.

        The copies sum to t_u exactly (LEMON's `proj` rule, R the noise); free units get R.
        A unit with a single copy keeps its weights bit for bit.
        """
        if t.device.type == "meta":  # a plan needs the shape only (meta arithmetic costs ~1 ms an op)
            return t.new_empty((*t.shape[:dim], self.n_dst, *t.shape[dim + 1:]))
        src = _as_3d(t, dim)
        a, _, b = src.shape
        out = torch.empty((a, self.n_dst, b), dtype=torch.float32, device=src.device)
        for lo, hi in _row_chunks(a, self.n_dst * b * 4 * 4):
            r = noise.take(lo * self.n_dst * b, (hi - lo, self.n_dst, b), src.device, out=out[lo:hi])
            split = self._split_rows(src[lo:hi].float(), r)
            if split is not r:  # circular maps split in place
                out[lo:hi] = split
        return out.reshape(*t.shape[:dim], self.n_dst, *t.shape[dim + 1:]).to(t.dtype)

    def _split_rows(self, src: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        counts = self.counts()
        if self.is_circular:
            return self._split_circular(src, r, counts)
        pos = torch.nonzero(self.index >= 0).flatten()
        copies_of = counts[self.index[pos]]
        dev = src.device
        r.index_fill_(1, pos[copies_of == 1].to(dev), 0.0)
        pos, idx = pos.to(dev), self.index[pos].to(dev)
        per_copy = copies_of.to(dev, src.dtype).view(1, -1, 1)
        per_src = counts.clamp(min=1).to(dev, src.dtype).view(1, -1, 1)
        copies_noise = r.index_select(1, pos)
        mean = torch.zeros_like(src).index_add_(1, idx, copies_noise) / per_src
        return r.index_copy(1, pos, src.index_select(1, idx) / per_copy + copies_noise - mean.index_select(1, idx))

    def _split_circular(self, src: torch.Tensor, r: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The block form of `_split_rows` for circular maps: copy j of u is u's column in block j // n.
        In place, block by block, with one temporary of the source's size (the hot loop of a grow)."""
        n, m = self.n_src, self.n_copied
        blocks = [(s, min(n, m - s)) for s in range(0, m, n)]
        if m < 2 * n:  # units m - n .. n - 1 have one copy, in the first block only: no noise there
            r[:, m - n:n] = 0.0
        base = torch.sub(src, r[:, :n])  # the first block is always whole
        for s, width in blocks[1:]:
            base[:, :width] -= r[:, s:s + width]
        if len(blocks) > 1:  # copy j of u: r_j + (t_u - Σ_copies r) / c_u
            base /= counts.to(src.device, src.dtype).view(1, -1, 1)
        for s, width in blocks:
            r[:, s:s + width] += base[:, :width]
        return r  # free units keep their noise


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

    @functools.cached_property
    def copies(self) -> UnitMap:
        """The k copies as a circular unit map; the r residue channels are free."""
        return UnitMap.circular(self.src, self.k * self.src, free=self.r)

    def expand(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Map anything that writes the residual stream (embeddings, block output rows, biases)."""
        fill = t.mean(dim) if self.mean_fill else None
        return self.copies.expand(t, dim, fill)

    def split_fanin(self, t: torch.Tensor, dim: int, noise: Noise) -> torch.Tensor:
        """Map weights that read the normalised stream [y × k, 0_r]; residue columns are free."""
        return self.copies.split_fanin(t, dim, noise)
