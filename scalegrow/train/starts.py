"""Where a run's weights come from: random init (scratch), a checkpoint, or a grown checkpoint."""
from __future__ import annotations

from scalegrow.checkpoint import open_checkpoint
from scalegrow.checkpoint.sharding import padded_vocab_size
from scalegrow.errors import InputError
from scalegrow.growth import get_operator
from scalegrow.stream import grow_state_dict
from scalegrow.train.config import RunConfig
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
    """`init.from` grown by `growth.method` to `growth.target` (function-preserving for LEMON)."""
    if not cfg.init.from_:
        raise InputError("init.from: grow_pretrain needs the checkpoint to grow")
    src = open_checkpoint(cfg.init.from_)
    target = cfg.model_config(base=src.config, source="growth")
    try:
        op = get_operator(cfg.growth.method)(src.config, target, seed=cfg.growth.seed)
    except ValueError as exc:
        raise InputError(f"growth.target: {exc}") from exc
    return Start(op.dst, grow_state_dict(op, src.state_dict()), str(src.root))
