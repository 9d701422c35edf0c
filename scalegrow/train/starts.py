"""Where a run's weights come from: random init (scratch), a checkpoint, or a grown checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from scalegrow.core.sharding import padded_vocab_size
from scalegrow.errors import InputError
from scalegrow.formats import metadata
from scalegrow.formats.optimizer import AdamMoments
from scalegrow.formats.registry import open_checkpoint
from scalegrow.methods import registry as methods
from scalegrow.methods.base import Context
from scalegrow.train.config import RunConfig
from scalegrow.train.engine import latest_tag
from scalegrow.train.loop import Start
from scalegrow.train.prepare import PreparedData
from scalegrow.train.trainer import DeepSpeedTrainer
from scalegrow.write import executor, moments


def recorded_lr(reader) -> float | None:
    """The peak LR a checkpoint was trained with, where it says: Megatron-LM's `args.lr`, else the run
    config of the scalegrow training that exported it."""
    lr = getattr(reader.args, "lr", None)
    if lr is None and reader.on_disk and (reader.root / metadata.METADATA).is_file():
        training = json.loads((reader.root / metadata.METADATA).read_text()).get("training") or {}
        lr = training.get("run_config", {}).get("schedule", {}).get("lr")
    return float(lr) if isinstance(lr, (int, float)) and lr > 0 else None


def scratch_or_continue(cfg: RunConfig, data: PreparedData, dist) -> Start:
    """`model` sized to the tokenizer; weights from `init.from` if given, else random."""
    if cfg.init.from_:
        src = open_checkpoint(cfg.init.from_)
        adam = held_adam(src, "init.optimizer_state") if cfg.init.optimizer_state else None
        return Start(src.config, src.state_dict(), metadata.source_record(src), src.hf_origin(), recorded_lr(src),
                     adam)
    model = cfg.model_config()
    padded = max(model.padded_vocab_size, padded_vocab_size(data.vocab_size, model.make_vocab_size_divisible_by, 1))
    return Start(model.replace(vocab_size=data.vocab_size, padded_vocab_size=padded), None)


def grown(cfg: RunConfig, data: PreparedData, dist) -> Start:
    """`init.from` grown by `growth.method` to `growth.target`: the method's operator, prepared on the
    run's own data and DeepSpeed engine where it needs that (LiGO trains its operator first)."""
    if not cfg.init.from_:
        raise InputError("init.from: grow_pretrain needs the checkpoint to grow")
    src = open_checkpoint(cfg.init.from_)
    target = cfg.model_config(base=src.config, source="growth")
    out = Path(cfg.output.dir)
    resuming = latest_tag(out / "checkpoints") is not None
    trainer = DeepSpeedTrainer(cfg, dist, out / "tensorboard" if dist.is_main else None)
    context = Context(src, data.train, cfg.data.corpus, trainer, progress=dist.is_main,
                      artifacts=out / cfg.growth.method if dist.is_main else None)
    op, _ = methods.build_operator(cfg.growth.method, methods.GROW, src.config, target, seed=cfg.growth.seed,
                                   options=cfg.growth.options(cfg.growth.method), where="growth.target",
                                   context=None if resuming else methods.ready(context))
    if resuming:  # the checkpoint holds the weights: nothing to prepare or grow
        return Start(op.dst, None, metadata.source_record(src), src.hf_origin(), recorded_lr(src))
    adam = grown_adam(cfg, src, op, dist) if cfg.growth.optimizer_state else None
    return Start(op.dst, executor.materialise(src, op), metadata.source_record(src), src.hf_origin(),
                 recorded_lr(src), adam)


def grown_adam(cfg: RunConfig, src, op, dist) -> AdamMoments:
    """The source's Adam moments and step count, grown with the weights (write/moments.py)."""
    moments.require_entrywise(op, "growth.optimizer_state", cfg.growth.method)
    grown = moments.grow(op, held_adam(src, "growth.optimizer_state"))
    if dist.is_main:
        print(f"grow_pretrain: Adam's moments grown with the weights ({len(grown.exp_avg)} parameters, step "
              f"{grown.step} of the source)", flush=True)
    return grown


def held_adam(src, key: str) -> AdamMoments:
    """The Adam state `src` holds, or a clear refusal naming `key`."""
    moments.require_held(src, key)
    return src.optimizer_state()
