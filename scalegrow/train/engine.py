"""The DeepSpeed engine: its config from the run config, and checkpoint save/resume/export.

Ranks and groups come from the launcher (`launch/` calls `deepspeed.init_distributed`); nothing here
initialises global state.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from scalegrow.errors import InputError
from scalegrow.formats.optimizer import EXP_AVG, EXP_AVG_SQ, AdamMoments
from scalegrow.train.config import RunConfig


@dataclass(frozen=True)
class Dist:
    """This process's place in the job, as the launcher set it up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def deepspeed_config(cfg: RunConfig, world_size: int, gpu: bool) -> dict:
    """train_batch_size = micro × accumulation × data-parallel size, checked against any override."""
    t = cfg.train
    bf16 = cfg.deepspeed.bf16 == "true" or (cfg.deepspeed.bf16 == "auto" and gpu)
    batch = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    ds = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.clip_grad,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.schedule.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps,
            "weight_decay": t.weight_decay, "torch_adam": not gpu}},
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    ds.update(cfg.deepspeed.config)
    if ds["train_batch_size"] != batch:
        raise InputError(f"deepspeed.config.train_batch_size: {ds['train_batch_size']} != micro_batch_size "
                         f"{t.micro_batch_size} × gradient_accumulation_steps {t.gradient_accumulation_steps} "
                         f"× data parallel {world_size} = {batch}")
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases (and nothing else 1-D) are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def initialize(model: torch.nn.Module, cfg: RunConfig, dist: Dist):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.train.weight_decay),
                                      config=deepspeed_config(cfg, dist.world_size, on_gpu()))
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def load_adam(engine, moments: AdamMoments) -> None:
    """Adam's state (full tensors by parameter name) into the engine's optimizer, whatever the ZeRO
    stage: each parameter's moments through DeepSpeed's `safe_set_full_optimizer_state` (each rank keeps
    its partition), and the source's step count, so the bias correction goes on."""
    from deepspeed.utils import safe_set_full_optimizer_state

    make_optimizer_state(engine)
    link_optimizer_states(engine)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO's wrapped torch optimizer
    for name, p in engine.module.named_parameters():
        for key in (EXP_AVG, EXP_AVG_SQ):
            value = getattr(moments, key)[name].to(torch.float32)
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO-3, ZeRO 1/2 (and bf16)
                safe_set_full_optimizer_state(p, value.reshape(p.ds_shape if hasattr(p, "ds_id") else p.shape), key)
            else:  # no ZeRO: the torch optimizer holds the parameter itself
                base.state[p][key].copy_(value.reshape(p.shape))
    for state in base.state.values():
        state["step"] = torch.full_like(state["step"], moments.step) if torch.is_tensor(state["step"]) else moments.step
    for group in base.param_groups:  # DeepSpeed's FusedAdam (GPU) counts steps per group
        if "step" in group:
            group["step"] = moments.step


def make_optimizer_state(engine) -> None:
    """DeepSpeed makes Adam's state at the first optimizer step: take it at LR 0 with zero gradients.
    The weights stay bit for bit (AdamW moves them by lr × its update and decays them by 1 − lr × decay)."""
    lrs = [group["lr"] for group in engine.optimizer.param_groups]
    set_lr(engine, 0.0)
    tokens = torch.zeros((1, 2), dtype=torch.long, device=engine.device)  # any batch: its loss counts 0 times
    for _ in range(engine.gradient_accumulation_steps()):  # the optimizer steps at the boundary
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]) * 0.0)
        engine.step()
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr


def link_optimizer_states(engine) -> None:
    """ZeRO 1/2 (DeepSpeed 0.19.8) link each parameter's view of Adam's state at the first optimizer step
    of the first param group, before the other groups' states exist: the second group's parameters
    (norms, biases: `param_groups`) then have no view, and `safe_{get,set}_full_optimizer_state` fail for
    them. Linking again once every group has stepped gives every parameter its view."""
    relink = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if relink is not None and hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        relink()


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save(engine, ckpt_dir: Path, step: int, extra: dict | None = None) -> None:
    """DeepSpeed's own checkpoint, made kill-safe: DeepSpeed's rank 0 writes `latest` without waiting
    for the other ranks' shards, so a kill in between leaves `latest` naming a half-written tag. Here
    `latest` moves (atomically) only after a barrier, once every rank's files are complete."""
    import torch.distributed as torch_dist

    client = {"step": step, "torch_rng": torch.get_rng_state(), **(extra or {})}
    tag = f"step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    if torch_dist.is_initialized():
        torch_dist.barrier()
    if engine.global_rank == 0:
        partial = ckpt_dir / "latest.partial"
        partial.write_text(tag)
        os.replace(partial, ckpt_dir / "latest")
    if torch_dist.is_initialized():
        torch_dist.barrier()


def resume(engine, ckpt_dir: Path) -> int:
    """Load the latest checkpoint if there is one; returns the step to continue from (0: fresh)."""
    if latest_tag(ckpt_dir) is None:
        return 0
    path, client = engine.load_checkpoint(str(ckpt_dir), load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise InputError(f"{ckpt_dir}: could not load the latest DeepSpeed checkpoint")
    torch.set_rng_state(client["torch_rng"])
    return int(client["step"])


def full_state_dict(engine, ckpt_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole model in fp32 on this (main) rank, from the checkpoint just saved: DeepSpeed's
    `get_fp32_state_dict_from_zero_checkpoint` merges the ZeRO partitions of the fp32 master weights."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from scalegrow.formats.deepspeed import deepspeed_chatter

    with deepspeed_chatter(quiet=True):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=latest_tag(ckpt_dir))
