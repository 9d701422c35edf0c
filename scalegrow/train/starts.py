"""Where a run's weights come from: random init (scratch), a checkpoint, or a grown checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from scalegrow.checkpoint import open_checkpoint
from scalegrow.checkpoint.sharding import padded_vocab_size
from scalegrow.errors import InputError
from scalegrow.growth import get_operator
from scalegrow.stream import grow_state_dict
from scalegrow.train.config import RunConfig
from scalegrow.train.engine import latest_tag
from scalegrow.train.loop import Start
from scalegrow.train.prepare import PreparedData


def scratch_or_continue(cfg: RunConfig, data: PreparedData, dist) -> Start:
    """`model` sized to the tokenizer; weights from `init.from` if given, else random."""
    if cfg.init.from_:
        src = open_checkpoint(cfg.init.from_)
        return Start(src.config, src.state_dict(), str(src.root))
    model = cfg.model_config()
    padded = max(model.padded_vocab_size, padded_vocab_size(data.vocab_size, model.make_vocab_size_divisible_by, 1))
    return Start(model.replace(vocab_size=data.vocab_size, padded_vocab_size=padded), None)


def grown(cfg: RunConfig, data: PreparedData, dist) -> Start:
    """`init.from` grown by `growth.method` to `growth.target` (function-preserving for LEMON; for
    LiGO the operator is first trained with the LM loss under the DeepSpeed engine)."""
    if not cfg.init.from_:
        raise InputError("init.from: grow_pretrain needs the checkpoint to grow")
    src = open_checkpoint(cfg.init.from_)
    target = cfg.model_config(base=src.config, source="growth")
    lc = cfg.growth.ligo
    extra = dict(width_init=lc.width_init, width_noise=lc.width_noise, depth_noise=lc.depth_noise) \
        if cfg.growth.method == "ligo" else {}
    try:
        op = get_operator(cfg.growth.method)(src.config, target, seed=cfg.growth.seed, **extra)
    except ValueError as exc:
        raise InputError(f"growth.target: {exc}") from exc
    small = src.state_dict()
    if cfg.growth.method == "ligo":
        out = Path(cfg.output.dir)
        if latest_tag(out / "checkpoints") is not None:
            return Start(op.dst, None, str(src.root))  # resuming: the checkpoint holds the weights
        _train_ligo(cfg, op, small, data, dist, out)
    return Start(op.dst, grow_state_dict(op, small), str(src.root))


def _train_ligo(cfg: RunConfig, op, small, data: PreparedData, dist, out: Path) -> None:
    from scalegrow.train.ligo import save_operator, train_deepspeed

    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    losses = train_deepspeed(op, small, data.train, cfg, dist, writer)
    if dist.is_main:
        writer.close()
        save_operator(op, out / "ligo" / "operator.pt")
        (out / "ligo" / "losses.json").write_text(json.dumps(losses))
