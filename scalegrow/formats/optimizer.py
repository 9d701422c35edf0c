"""Adam's state as a checkpoint holds it, by parameter name: what a growth carries into the grown run
(`growth.optimizer_state`, `scalegrow grow --optimizer-state`; write/moments.py grows it). DeepSpeed
checkpoints read theirs from their ZeRO partitions (formats/deepspeed.py); any other checkpoint holds
one as `optimizer_state.pt` beside its weights (`save`/`load`: a torch file of tensors only)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"
FILE = "optimizer_state.pt"  # beside a checkpoint's weights


@dataclass
class AdamMoments:
    """Adam's first and second moments per parameter (reference-model names, full fp32 tensors) and the
    step count its bias correction has reached."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int

    def names(self) -> list[str]:
        return list(self.exp_avg)


def save(moments: AdamMoments, path: Path) -> None:
    torch.save({"step": moments.step, EXP_AVG: moments.exp_avg, EXP_AVG_SQ: moments.exp_avg_sq}, path)


def load(path: Path) -> AdamMoments:
    data = torch.load(path, weights_only=True)
    return AdamMoments(data[EXP_AVG], data[EXP_AVG_SQ], int(data["step"]))


# ---- a plain torch optimizer ------------------------------------------------------------------------
def from_torch(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> AdamMoments:
    """The moments of a torch Adam/AdamW by parameter name (every parameter must have taken a step)."""
    state, steps = {}, set()
    for name, p in model.named_parameters():
        s = optimizer.state[p]
        state[name] = s
        steps.add(int(s["step"]))
    if len(steps) != 1:
        raise ValueError(f"optimizer state: parameters at different steps {sorted(steps)}")
    return AdamMoments({k: s[EXP_AVG].detach().clone() for k, s in state.items()},
                       {k: s[EXP_AVG_SQ].detach().clone() for k, s in state.items()}, steps.pop())


def into_torch(optimizer: torch.optim.Optimizer, model: torch.nn.Module, moments: AdamMoments) -> None:
    """Set a torch Adam/AdamW's state from `moments` (every parameter of `model`)."""
    for name, p in model.named_parameters():
        optimizer.state[p] = {"step": torch.tensor(float(moments.step)),
                              EXP_AVG: moments.exp_avg[name].to(p.dtype).clone().reshape(p.shape),
                              EXP_AVG_SQ: moments.exp_avg_sq[name].to(p.dtype).clone().reshape(p.shape)}
