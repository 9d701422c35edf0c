"""Calibration passes: the calibration tokens' residual stream through the source model, one layer at
a time (only that layer's weights in memory), on the prepare step's device.

Each layer sees the stream in micro-batches of about `BATCH_TOKENS` tokens: large enough to keep a GPU
busy, small enough to bound the activations (a 70B layer's FFN over 16k tokens at once would hold
GBs). Whatever a pass measures (subcloning's statistics and rescale, expert pruning's routing mass)
is summed across micro-batches in float64 (`Mean`, `Moments`), so the result does not depend on how
the tokens were split.
"""
from __future__ import annotations

from typing import Callable

import torch

from scalegrow.core.config import ModelConfig
from scalegrow.core.model import Embedding, Rotary, TransformerLayer, rotary_tables
from scalegrow.formats.base import Reader
from scalegrow.operators.subclone import NormSite

BATCH_TOKENS = 4096  # tokens a layer sees at once
Visit = Callable[[int, TransformerLayer, torch.Tensor, Rotary | None], torch.Tensor]


class Mean:
    """A running mean over micro-batches, in float64: `add(sum, count)`. A count may be a tensor
    that broadcasts against the sums (e.g. tokens per expert); a mean over nothing is 0."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, total: torch.Tensor | float, count: int | torch.Tensor) -> None:
        self.total = self.total + (total.double().cpu() if torch.is_tensor(total) else total)
        self.count = self.count + (count.cpu() if torch.is_tensor(count) else count)

    @property
    def value(self):
        count = self.count.clamp(min=1) if torch.is_tensor(self.count) else max(1, self.count)
        return self.total / count


class Moments:
    """Per-dimension E[x], E[x²] and E|x| of a norm's input (a `NormSite`), over every token seen."""

    def __init__(self):
        self.mean, self.mean_sq, self.mean_abs = Mean(), Mean(), Mean()

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()
        n = flat.shape[0]
        self.mean.add(flat.sum(0), n)
        self.mean_sq.add((flat ** 2).sum(0), n)
        self.mean_abs.add(flat.abs().sum(0), n)

    def site(self, gain: torch.Tensor | None = None) -> NormSite:
        return NormSite(self.mean.value, self.mean_sq.value, self.mean_abs.value, gain)


def embed(source: Reader, tokens: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Rotary | None]:
    """The residual stream entering layer 0 [n, s, h] on `device`, and the rotary tables (None without rope)."""
    cfg = source.config
    embedding = Embedding(cfg).to(device)
    embedding.load_state_dict({k.removeprefix("embedding."): v.float() for k, v in source.embeddings().items()})
    freqs = rotary_tables(cfg, tokens.shape[1], device)
    with torch.no_grad():
        return embedding(tokens.to(device)), freqs


def load_layer(cfg: ModelConfig, index: int, tensors: dict[str, torch.Tensor], modules: dict[tuple, TransformerLayer],
               device: torch.device) -> TransformerLayer:
    """Layer `index` with its weights, on `device`, in a module reused for every layer of its kind
    (dense or MoE, full or sliding-window attention)."""
    kind = (cfg.is_moe_layer(index), cfg.attention.windowed(index))
    if kind not in modules:
        modules[kind] = TransformerLayer(cfg, index).to(device)
    modules[kind].load_state_dict({k: v.float() for k, v in tensors.items()})
    return modules[kind]


@torch.no_grad()
def walk(source: Reader, tokens: torch.Tensor, visit: Visit, device: torch.device, progress: bool = False,
         desc: str = "calibrate") -> torch.Tensor:
    """Run `tokens` [n, s] through every layer of `source`: `visit(i, layer, x, freqs)` gets each
    micro-batch of layer i's input [b, s, h] and returns the layer's output. Returns the stream after
    the last layer [n, s, h] (on `device`)."""
    x, freqs = embed(source, tokens, device)
    modules = {}
    for i, tensors in source.layers(progress, desc):
        layer = load_layer(source.config, i, tensors, modules, device)
        for span in spans(x):
            x[span] = visit(i, layer, x[span], freqs)
    return x


def spans(x: torch.Tensor) -> list[slice]:
    """The micro-batches of `x` [n, s, ...]: slices of windows, about `BATCH_TOKENS` tokens each."""
    step = max(1, BATCH_TOKENS // x.shape[1])
    return [slice(lo, lo + step) for lo in range(0, len(x), step)]
