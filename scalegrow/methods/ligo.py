"""LiGO's prepare step: train the growth operator with the LM loss (arXiv 2303.00980 §3.4).

The large model is a function of the operator (`LigoModel`): the small weights are frozen buffers,
the operator's maps are the only parameters (so ZeRO partitions and trains just these), and a
meta-device GPT skeleton runs through `torch.func.functional_call`. About 100 steps with AdamW on the
operator's own schedule, then `LigoGrowth` materialises plain weights through the executor.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT
from scalegrow.methods.base import Context
from scalegrow.methods.options import option
from scalegrow.operators.ligo import LigoGrowth, LigoOperator

WIDTH_INITS = ("select", "random")


@dataclass(frozen=True)
class LigoOptions:
    """LiGO's settings: `scalegrow grow --method ligo` flags and `growth.ligo` in a run."""

    steps: int = option(100, "operator training steps", minimum=1)
    lr: float = option(2e-4, "operator peak learning rate", minimum=0)
    warmup_steps: int | None = option(None, "operator warmup steps (default: a tenth of the steps)", minimum=0)
    width_init: str = option("select", "width maps start as one-hot copies with noise (select, Net2Net-like) "
                             "or as random rows of norm 1 (random)", choices=WIDTH_INITS)
    width_noise: float = option(0.01, "noise added to select width maps, to break the symmetry between copies",
                                minimum=0)
    depth_noise: float = option(0.03, "noise on the depth maps (StackBERT-noisy: one-hot + U(0, noise))", minimum=0)


def make_operator(src: ModelConfig, dst: ModelConfig, seed: int, opts: LigoOptions) -> LigoGrowth:
    return LigoGrowth(src, dst, seed=seed, width_init=opts.width_init, width_noise=opts.width_noise,
                      depth_noise=opts.depth_noise)


class LigoModel(nn.Module):
    """The large model as a function of the operator. forward(tokens, labels) -> loss, like the GPT."""

    def __init__(self, operator: LigoOperator, small: dict[str, torch.Tensor]):
        super().__init__()
        self.operator = operator
        self._names = {}
        for i, (name, tensor) in enumerate(small.items()):
            self.register_buffer(f"small_{i}", tensor.detach().float().clone(), persistent=False)
            self._names[f"small_{i}"] = name
        with torch.device("meta"):
            self.__dict__["skeleton"] = GPT(operator.dst)  # not a submodule: it owns no parameters here

    def small(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, buf) for buf, name in self._names.items()}

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.operator(self.small())
        return torch.func.functional_call(self.skeleton, weights, (tokens, labels))


def operator_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """The operator's own schedule: linear warmup, cosine to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_operator(op: LigoGrowth, opts: LigoOptions, ctx: Context) -> dict:
    """Train `op`'s operator on `ctx`'s data; keep `operator.pt` and `losses.json` in `ctx.artifacts`."""
    warmup = opts.warmup_steps if opts.warmup_steps is not None else max(1, opts.steps // 10)
    model = LigoModel(op.operator, ctx.source.state_dict())
    losses, state = ctx.trainer.fit(model, ctx.stream, opts.steps,
                                    lambda step: operator_lr(step, opts.lr, warmup, opts.steps), "ligo")
    op.use_weights({k.removeprefix("operator."): v for k, v in state.items()})
    if ctx.artifacts is not None:
        ctx.artifacts.mkdir(parents=True, exist_ok=True)
        torch.save(op.operator.state_dict(), ctx.artifacts / "operator.pt")
        (ctx.artifacts / "losses.json").write_text(json.dumps(losses))
    return {"ligo": {"steps": opts.steps, "lr": opts.lr, "data": ctx.data,
                     "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}}
