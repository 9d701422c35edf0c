"""Learning-rate schedules: pure functions of the step (resuming needs no scheduler state).

- `cosine`: the from-scratch baseline. Linear warmup to the peak, cosine decay to `min_lr` over
  `decay_steps` (default: the whole run).
- `lemon`: for grown models, following LEMON (Wang et al., ICLR 2024, §5 "optimization"): keep the
  *same peak LR* as training from scratch (a smaller one hurts), but decay *faster*: the cosine reaches
  `min_lr` after `decay_fraction` of the run and holds there. The paper's BERT run decays over 132k
  steps against scratch's 220k (0.6), its ViT run over 130 epochs against 300.

`schedule.lr: auto` is for a run that starts from pretrained weights: the peak LR the source was
trained with where it records one (LEMON's rule), else `PRETRAINED_LR`, a conservative peak for
continued pretraining (a 135M model grown to 289M fell 3.796 -> 3.772 in 6 steps at 3e-5 and
diverged at 3e-3). `min_lr: auto` is a tenth of the peak.
"""
from __future__ import annotations

import dataclasses
import math

from scalegrow.train.config import AUTO, ScheduleConfig

PRETRAINED_LR = 3e-5


def warmup_cosine(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    return warmup_cosine(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps or total_steps)


def lemon(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    horizon = cfg.decay_steps or max(cfg.warmup_steps + 1, round(cfg.decay_fraction * total_steps))
    return warmup_cosine(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, horizon)


SCHEDULES = {"cosine": cosine, "lemon": lemon}


def learning_rate(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    return SCHEDULES[cfg.name](step, cfg, total_steps)


def resolve(cfg: ScheduleConfig, recorded: float | None) -> tuple[ScheduleConfig, str]:
    """`cfg` with `auto` made a number (`recorded`: the source's peak LR, if it records one), and
    where the peak came from, to print."""
    if cfg.lr != AUTO:
        peak, why = cfg.lr, "schedule.lr"
    elif recorded is not None:
        peak, why = recorded, "auto: the source's recorded peak"
    else:
        peak, why = PRETRAINED_LR, "auto: the source records none; the default for pretrained weights"
    floor = peak / 10 if cfg.min_lr == AUTO else cfg.min_lr
    return dataclasses.replace(cfg, lr=float(peak), min_lr=float(floor)), f"peak lr {peak:g} ({why}), min {floor:g}"
