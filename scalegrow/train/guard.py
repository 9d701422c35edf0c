"""The divergence guard: a run whose loss turns NaN or climbs far above where it started stops at
once, before it saves or exports the diverged weights, so its last checkpoint is a good one.

A grown model starts at its source's loss; a peak learning rate meant for training from scratch can
throw it off in a few steps (a 135M model grown to 289M went 3.80 -> 13.4 -> 22.6 in 4 steps at 3e-3).
The guard compares each step's training loss (and each validation loss) with `train.divergence_factor`
times the validation loss at the start of this process (step 0, or the step it resumed from).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


class Diverged(RuntimeError):
    """The loss diverged; the message says where, what was kept, and what to change."""


@dataclass
class DivergenceGuard:
    factor: float | None  # None: no guard
    lr: float  # the peak learning rate, for the message
    checkpoints: Path
    reference: float | None = None  # the validation loss this process started from
    last_saved: int | None = None  # the step of the last checkpoint, if any

    def check(self, step: int, loss: float, what: str = "training loss") -> None:
        if self.factor is None:
            return
        if not math.isfinite(loss):
            self._stop(step, f"the {what} is {loss}")
        if self.reference is not None and loss > self.factor * self.reference:
            self._stop(step, f"the {what} {loss:.4g} is over {self.factor:g} x {self.reference:.4g}, where it "
                             f"started (train.divergence_factor)")

    def _stop(self, step: int, why: str) -> None:
        kept = (f"the last checkpoint, step {self.last_saved} in {self.checkpoints}, is kept and the run resumes "
                f"from it" if self.last_saved is not None else "no checkpoint was saved, so the run starts over")
        raise Diverged(f"training diverged at step {step}: {why}. Nothing of this step was saved or exported; "
                       f"{kept}. Lower schedule.lr (peak {self.lr:g}) or raise schedule.warmup_steps, and run the "
                       f"same command again")
