"""Training the LiGO operator (arXiv 2303.00980 §3.4): the ordinary LM loss through the large model
computed functionally from the operator, small weights frozen, for ~100 steps; then materialise.

Two drivers share `LigoModel`: a single-process PyTorch loop (`scalegrow grow --method ligo`) and the
DeepSpeed engine with ZeRO 1/2/3 (`grow_pretrain` with `growth.method: ligo`), where ZeRO-3 partitions
the operator's parameters, the only ones the module has.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tqdm import tqdm

from scalegrow.growth.ligo import LigoGrowth, LigoModel, operator_lr
from scalegrow.train.data import BatchPlan, TokenStream, batch


def train_local(op: LigoGrowth, small: dict[str, torch.Tensor], stream: TokenStream, steps: int, lr: float,
                warmup: int, micro_batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[float]:
    """Train the operator on this process (CPU or one GPU); returns the loss of every step."""
    model = LigoModel(op.operator, small)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    plan = BatchPlan(stream.num_samples, micro_batch_size, 1, 1, seed)
    losses = []
    bar = tqdm(range(steps), desc="ligo", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = operator_lr(step, lr, warmup, steps)
        tokens = batch(stream, plan.samples(step, 0, 0))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def train_deepspeed(op: LigoGrowth, small: dict[str, torch.Tensor], stream: TokenStream, cfg, dist,
                    writer=None) -> list[float]:
    """The same training under the DeepSpeed engine; logs ligo/loss and ligo/lr every step."""
    import dataclasses

    from scalegrow.train import engine as ds
    from scalegrow.train.loop import train_step

    lc = cfg.growth.ligo
    op_cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, lr=lc.lr),
                                 train=dataclasses.replace(cfg.train, weight_decay=0.0))
    engine = ds.initialize(LigoModel(op.operator, small), op_cfg, dist)
    t = cfg.train
    plan = BatchPlan(stream.num_samples, t.micro_batch_size, t.gradient_accumulation_steps, dist.world_size,
                     t.seed + 1)
    losses = []
    bar = tqdm(range(lc.steps), desc="ligo", unit="step", disable=not dist.is_main)
    for step in bar:
        lr = operator_lr(step, lc.lr, lc.warmup_steps, lc.steps)
        losses.append(train_step(engine, stream, plan, dist, step, lr)[0])
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if writer is not None:
            writer.add_scalar("ligo/loss", losses[-1], step + 1)
            writer.add_scalar("ligo/lr", lr, step + 1)
    with _gathered(engine, cfg.deepspeed.zero_stage):  # ZeRO-3: the partitioned operator, whole again
        trained = {k: v.detach().cpu().clone() for k, v in op.operator.state_dict().items()}
    op.use_weights(trained)  # a plain (unpartitioned) operator for materialising
    return losses


def _gathered(engine, zero_stage: int):
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.operator.parameters()), modifier_rank=None)


def save_operator(op: LigoGrowth, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in op.operator.state_dict().items()}, path)
