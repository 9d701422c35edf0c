"""Learning-rate schedules: pure functions of the step (resuming needs no scheduler state).

- `cosine`: the from-scratch baseline. Linear warmup to the peak, cosine decay to `min_lr` over
  `decay_steps` (default: the whole run).
- `lemon`: for grown models, following LEMON (Wang et al., ICLR 2024, §5 "optimization"): keep the
  *same peak LR* as training from scratch (a smaller one hurts), but decay *faster*: the cosine reaches
  `min_lr` after `decay_fraction` of the run and holds there. The paper's BERT run decays over 132k
  steps against scratch's 220k (0.6), its ViT run over 130 epochs against 300.
"""
from __future__ import annotations

import math

from scalegrow.train.config import ScheduleConfig


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
