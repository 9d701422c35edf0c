"""The training run behind `launch/pretrain.py` and `launch/grow_pretrain.py`.

data -> initial weights (random, a checkpoint, or grown from one) -> DeepSpeed engine -> train with
val/loss at step 0, every eval_interval and at the end -> DeepSpeed checkpoints -> Megatron export.
Re-running the same command resumes from the latest checkpoint, bit-identically on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import flops_per_token, num_parameters
from scalegrow.core.layout import Layout
from scalegrow.core.model import GPT, init_weights
from scalegrow.data import BatchOrder, TokenStream, batch, tokenizer_bundle
from scalegrow.formats import metadata
from scalegrow.formats.base import MemoryReader
from scalegrow.formats.megatron_args import config_to_args
from scalegrow.formats.optimizer import AdamMoments
from scalegrow.formats.options import LayoutOptions, OutputOptions
from scalegrow.operators.identity import Identity
from scalegrow.train import engine as ds
from scalegrow.train.config import RunConfig, save_run_config
from scalegrow.train.distill import student
from scalegrow.train.guard import DivergenceGuard
from scalegrow.train.prepare import PreparedData, prepare_data
from scalegrow.train.schedule import learning_rate
from scalegrow.train.schedule import resolve as resolve_schedule
from scalegrow.write import session


@dataclass
class Start:
    """What a run starts from: the model config, its weights (None: fresh random init, or the
    checkpoint being resumed), and the provenance of the checkpoint it came from (`scalegrow.json`'s
    `source`; None from scratch), the Hugging Face family it was (so an HF export keeps it), and
    the peak LR it was trained with (for `schedule.lr: auto`)."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor] | None
    source: dict | None = None
    hf_origin: dict | None = None
    recorded_lr: float | None = None  # the peak LR the source was trained with, where it says
    adam: AdamMoments | None = None  # Adam's state grown with the weights (growth.optimizer_state)


class Logger:
    """TensorBoard scalars and a tqdm bar, on the main rank only."""

    def __init__(self, out: Path, dist: ds.Dist, total: int, start: int):
        self.writer = self.bar = None
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run replaces what a killed one logged after its checkpoint `start`
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def advance(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.bar.close()


def _mean_over_ranks(value: float, count: float = 1.0) -> float:
    if not torch_dist.is_initialized():
        return value / count
    t = torch.tensor([value, count], dtype=torch.float64)
    torch_dist.all_reduce(t)
    return (t[0] / t[1]).item()


def evaluate(engine, valid: TokenStream, cfg: RunConfig, dist: ds.Dist) -> float:
    """Mean next-token loss over a fixed held-out set: the first eval_iters × micro × dp windows."""
    engine.eval()
    micro, per_round = cfg.train.micro_batch_size, cfg.train.micro_batch_size * dist.world_size
    rounds = max(1, min(cfg.train.eval_iters, valid.num_samples // per_round))
    total = 0.0
    with torch.no_grad():  # every rank runs the same number of forwards (ZeRO-3 gathers collectively)
        for r in range(rounds):
            samples = [(r * per_round + dist.rank * micro + i) % valid.num_samples for i in range(micro)]
            tokens = batch(valid, samples).to(engine.device)
            total += engine(tokens[:, :-1], tokens[:, 1:]).item()
    engine.train()
    return _mean_over_ranks(total, rounds)


def run(cfg: RunConfig, dist: ds.Dist, start_fn: Callable[[RunConfig, PreparedData, ds.Dist], Start],
        kind: str) -> dict:
    out = Path(cfg.output.dir)
    ckpt_dir = out / "checkpoints"
    finished = completed(cfg)
    if finished is not None:
        if dist.is_main:
            print(f"{kind}: {out} is complete: {finished['steps']} steps trained, exported to {out / 'export'}; "
                  f"nothing was changed. To train longer, raise train.steps (e.g. train.steps="
                  f"{2 * finished['steps']}) and run the same command again.", flush=True)
        return finished
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, out / "run_config.yaml")
    data = prepare_data(cfg, dist)
    start = start_fn(cfg, data, dist)
    schedule, said = resolve_schedule(cfg.schedule, start.recorded_lr)
    cfg = dataclasses.replace(cfg, schedule=schedule)
    if dist.is_main:
        print(f"{kind}: {said}", flush=True)
    torch.manual_seed(cfg.train.seed)
    model = student(start.config, cfg.distill)
    if start.state_dict is None:
        init_weights(model, cfg.train.seed)
    else:
        model.load_state_dict(start.state_dict, strict=True)
    fresh = ds.latest_tag(ckpt_dir) is None
    engine = ds.initialize(model, cfg, dist)
    step = ds.resume(engine, ckpt_dir)
    if fresh and start.adam is not None:  # a resumed run's checkpoint holds its own
        ds.load_adam(engine, start.adam)
    order = BatchOrder(data.train.num_samples, cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps,
                       dist.world_size, cfg.train.seed)
    log = Logger(out, dist, cfg.train.steps, step)
    history = {"val_loss": {}, "train_loss": {}}
    guard = DivergenceGuard(cfg.train.divergence_factor, cfg.schedule.lr, ckpt_dir, last_saved=step or None)
    if step == 0 or step < cfg.train.steps:  # where this process starts from
        guard.reference = evaluate(engine, data.valid, cfg, dist)
    if step == 0:
        history["val_loss"][0] = guard.reference
        log.scalars(0, {"val/loss": history["val_loss"][0]})
    began = time.time()
    tokens = order.micro_batch_size * order.accumulation * order.data_parallel * cfg.data.seq_length
    flops = tokens * step_flops(start.config, model, cfg.data.seq_length)  # per step, the teacher's included
    try:
        while step < cfg.train.steps:
            lr = learning_rate(step, cfg.schedule, cfg.train.steps)
            loss, seconds, parts = train_step(engine, data.train, order, dist, step, lr)
            step += 1
            history["train_loss"][step] = loss
            log.scalars(step, {"train/loss": loss, "train/lr": lr,
                               "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                               "train/tokens_per_s": tokens / seconds, "train/flops": step * flops,
                               **{PART_TAGS[k]: v for k, v in parts.items() if k in PART_TAGS}})
            log.advance(loss=loss)
            guard.check(step, loss)  # the loss of the weights before this step's update
            saving = step % cfg.train.save_interval == 0 or step == cfg.train.steps
            if saving or step % cfg.train.eval_interval == 0:  # a checkpoint's own weights pass the guard first
                history["val_loss"][step] = evaluate(engine, data.valid, cfg, dist)
                log.scalars(step, {"val/loss": history["val_loss"][step]})
                guard.check(step, history["val_loss"][step], "validation loss")
            if saving:
                save(engine, ckpt_dir, step, start, kind, dist)
                guard.last_saved = step
        if cfg.train.steps == 0:  # nothing to train: export the starting point (e.g. a materialised LiGO)
            save(engine, ckpt_dir, 0, start, kind, dist)
    finally:  # a diverged run closes its log too
        log.close()
    return finish(cfg, dist, engine, start, data, history, time.time() - began, kind, flops * cfg.train.steps)


def completed(cfg: RunConfig) -> dict | None:
    """The summary of this run if it already trained `train.steps` steps (or more) and exported them."""
    out = Path(cfg.output.dir)
    tag, summary = ds.latest_tag(out / "checkpoints"), out / "summary.json"
    if tag is None or not summary.is_file() or not (out / "export" / metadata.METADATA).is_file():
        return None
    done = json.loads(summary.read_text())
    return done if done.get("steps", -1) >= cfg.train.steps and tag == f"step{done['steps']}" else None


def save(engine, ckpt_dir: Path, step: int, start: Start, kind: str, dist: ds.Dist) -> None:
    """A DeepSpeed checkpoint, and the `scalegrow.json` that makes the directory a scalegrow source."""
    ds.save(engine, ckpt_dir, step)
    if dist.is_main:
        cfg = start.config
        metadata.write(ckpt_dir, metadata.record("deepspeed", cfg, Layout.single(cfg.num_layers), step, kind,
                                                 start.source))


PART_TAGS = {"moe_aux": "train/moe_aux_loss", "kl": "distill/kl", "lm": "distill/ce"}  # lm: with a teacher


def step_flops(cfg: ModelConfig, model: GPT, seq_length: int) -> float:
    """Training FLOPs per token of a step: the student's forward and backward, and the teacher's
    forward when there is one."""
    teacher = getattr(model, "teacher", None)
    return flops_per_token(cfg, seq_length) + (flops_per_token(teacher.cfg, seq_length, training=False)
                                              if teacher is not None else 0.0)


def train_step(engine, train: TokenStream, order: BatchOrder, dist: ds.Dist, step: int,
               lr: float) -> tuple[float, float, dict[str, float]]:
    """One optimizer step over this step's micro-batches: (LM loss averaged over micro-steps and
    ranks, seconds, the loss's parts likewise: an MoE's balancing loss, a distillation's KL and CE).
    The engine handles accumulation and applies the optimizer at the boundary."""
    tic = time.perf_counter()
    ds.set_lr(engine, lr)
    total, parts = 0.0, {}
    for micro in range(order.accumulation):
        tokens = batch(train, order.samples(step, micro, dist.rank)).to(engine.device)
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        last = getattr(engine.module, "last_losses", None) or {"lm": loss.item()}
        total += last["lm"]
        for key, value in last.items():
            parts[key] = parts.get(key, 0.0) + value
    balance = getattr(engine.module, "balance_experts", None)  # a GPT's routing biases (LiGO's operator has none)
    if balance is not None:
        balance(torch_dist.all_reduce if torch_dist.is_initialized() else None)
    seconds = time.perf_counter() - tic
    distilled = "kl" in parts
    parts = {k: _mean_over_ranks(v, order.accumulation) for k, v in parts.items() if distilled or k != "lm"}
    return _mean_over_ranks(total, order.accumulation), seconds, parts


def finish(cfg: RunConfig, dist: ds.Dist, engine, start: Start, data: PreparedData, history: dict,
           seconds: float, kind: str, flops: float) -> dict:
    """Export the final model as a Megatron checkpoint (main rank) and print a short summary."""
    out = Path(cfg.output.dir)
    if torch_dist.is_initialized():
        torch_dist.barrier()
    summary = {"steps": cfg.train.steps, "seconds": round(seconds, 1), "flops": flops,
               "params": num_parameters(start.config), "export": str(out / "export"),
               "val_loss": history["val_loss"], "final_train_loss": history["train_loss"].get(cfg.train.steps)}
    if dist.is_main:
        state = ds.full_state_dict(engine, out / "checkpoints", cfg.deepspeed.zero_stage)
        export(cfg, start, state, data, kind, summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{kind}: {summary['params'] / 1e6:.2f}M params, {cfg.train.steps} steps in {seconds:.0f}s, "
              f"final train loss {summary['final_train_loss']}, val loss "
              f"{history['val_loss'].get(cfg.train.steps)}; exported to {summary['export']}", flush=True)
    if torch_dist.is_initialized():
        torch_dist.barrier()
    return summary


def export(cfg: RunConfig, start: Start, state: dict, data: PreparedData, kind: str, summary: dict) -> None:
    """The trained model as a checkpoint at `export.tp`/`export.pp` in `export.format`, written in this
    process through the format's writer, with the tokenizer beside it."""
    out = Path(cfg.output.dir)
    args = config_to_args(start.config)
    hf = data.tokenizer.suffix == ".json"  # Megatron-LM reads an HF tokenizer from the checkpoint directory
    args.tokenizer_type = "HuggingFaceTokenizer" if hf else "GPTSentencePieceTokenizer"
    args.tokenizer_model = "." if hf else "tokenizer.model"
    args.seq_length = cfg.data.seq_length
    args.lr, args.min_lr = cfg.schedule.lr, cfg.schedule.min_lr  # what the next run's `schedule.lr: auto` reads
    model = MemoryReader.of(state, start.config, iteration=cfg.train.steps, args=args, origin=start.hf_origin)
    training = {**summary, "run_config": cfg.to_dict()}
    session.write(model, Identity(start.config, start.config), out / "export",
                 OutputOptions(cfg.export.format, LayoutOptions(tp=cfg.export.tp, pp=cfg.export.pp)), method=kind,
                 source_record=start.source, training=training, files=tokenizer_bundle(data.tokenizer),
                 overwrite=True, progress=False)
