"""A prepare step's `Trainer` under the DeepSpeed engine, for training runs (`grow_pretrain`): the same
ZeRO stage, batch size and data as the run, its own learning rate and no weight decay. With ZeRO-3 the
module's parameters (e.g. LiGO's operator, the only ones it has) are partitioned across ranks and
gathered whole again at the end."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from tqdm import tqdm

from scalegrow.data import BatchOrder, TokenStream
from scalegrow.train import engine as ds
from scalegrow.train.config import RunConfig
from scalegrow.train.loop import train_step


class DeepSpeedTrainer:
    """Logs `{name}/loss` and `{name}/lr` to TensorBoard in `log_dir` (the main rank's; None elsewhere)."""

    def __init__(self, cfg: RunConfig, dist: ds.Dist, log_dir: Path | None = None):
        self.cfg, self.dist, self.log_dir = cfg, dist, log_dir

    def fit(self, module: torch.nn.Module, stream: TokenStream, steps: int, lr_at, name: str):
        with _summary_writer(self.log_dir) as writer:
            return self._fit(module, stream, steps, lr_at, name, writer)

    def _fit(self, module, stream, steps, lr_at, name, writer):
        cfg, t = self.cfg, self.cfg.train
        own = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, lr=lr_at(0)),
                                  train=dataclasses.replace(t, weight_decay=0.0))
        engine = ds.initialize(module, own, self.dist)
        order = BatchOrder(stream.num_samples, t.micro_batch_size, t.gradient_accumulation_steps,
                           self.dist.world_size, t.seed + 1)
        losses = []
        bar = tqdm(range(steps), desc=name, unit="step", disable=not self.dist.is_main)
        for step in bar:
            lr = lr_at(step)
            losses.append(train_step(engine, stream, order, self.dist, step, lr)[0])
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if writer is not None:
                writer.add_scalar(f"{name}/loss", losses[-1], step + 1)
                writer.add_scalar(f"{name}/lr", lr, step + 1)
        with _gathered(engine, cfg.deepspeed.zero_stage):  # ZeRO-3: the partitioned parameters, whole again
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return losses, state


def _gathered(engine, zero_stage: int):
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _summary_writer(log_dir: Path | None):
    if log_dir is None:
        return contextlib.nullcontext()
    from torch.utils.tensorboard import SummaryWriter

    return contextlib.closing(SummaryWriter(str(log_dir)))
