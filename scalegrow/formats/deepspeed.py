"""DeepSpeed checkpoints (a training run's `output.dir/checkpoints`) as sources for grow/convert/verify.

The model config comes from the `scalegrow.json` training writes beside the checkpoints; the weights
from DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`, which merges the ZeRO partitions of
the fp32 master weights (in memory: DeepSpeed offers no lazy path). That function unpickles with
`weights_only=False`, so every file is first loaded here with `weights_only=True` and an explicit
allow-list (DeepSpeed's loss scaler and ZeRO-stage enum besides Megatron's); anything else is refused.
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalegrow.core.arch import TensorSpec
from scalegrow.core.layout import Layout
from scalegrow.formats.base import Format, Reader
from scalegrow.errors import InputError
from scalegrow.formats.io import BASE_ALLOWED, megatron_allowed, safe_load
from scalegrow.formats.metadata import read_model
from scalegrow.formats.optimizer import EXP_AVG, EXP_AVG_SQ, AdamMoments


def is_deepspeed(path: Path) -> bool:
    latest = path / "latest"
    return path.is_dir() and latest.is_file() and any((path / latest.read_text().strip()).glob("*model_states.pt"))


def _deepspeed_allowed() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return BASE_ALLOWED + megatron_allowed() + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _Stderr:
    """Whatever `sys.stderr` is when something is written (it may be replaced after set-up)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _deepspeed_logs_to_stderr() -> None:
    """scalegrow's commands print their results on stdout (verify: one JSON line); DeepSpeed's
    logger writes to the stdout of its first import (and logs while importing), so import it under
    a redirect and point its handlers at stderr for later calls."""
    import logging

    from deepspeed.utils.logging import logger

    for handler in logger.handlers:  # DeepSpeed's own handler only (a test harness may add its own)
        if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _Stderr):
            handler.setStream(_Stderr())


@contextlib.contextmanager
def deepspeed_chatter(quiet: bool):
    """Where DeepSpeed's prints and progress bars go while it merges a checkpoint: stderr, since
    stdout is scalegrow's (verify prints one JSON line), or nowhere when `quiet`. Its messages
    ('Processing zero checkpoint', 'Reconstructed fp32 state dict') report progress, not problems."""
    sink = io.StringIO() if quiet else sys.stderr
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink if quiet else sys.stderr):
        _deepspeed_logs_to_stderr()
        yield


@dataclass
class DeepSpeedReader(Reader):
    tag: str = ""
    _state: dict | None = field(default=None, repr=False)

    format = "deepspeed"

    def files(self) -> list[Path]:
        return sorted((self.root / self.tag).glob("*.pt"))

    def _sd(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            with deepspeed_chatter(self.quiet):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                allowed = _deepspeed_allowed()
                for f in self.files():
                    safe_load(f, allowed=allowed)  # refuse anything outside the allow-list first
                self._state = get_fp32_state_dict_from_zero_checkpoint(str(self.root), tag=self.tag)
        return self._state

    def tensor(self, key: str, spec: TensorSpec) -> torch.Tensor:
        return self._sd()[key]

    def release(self) -> None:
        self._state = None

    @property
    def holds_optimizer_state(self) -> bool:
        return any((self.root / self.tag).glob("*optim_states.pt"))

    def optimizer_state(self) -> AdamMoments | None:
        """Adam's moments per parameter and its step count, merged from every rank's ZeRO 1-3 partitions
        by DeepSpeed's own `zero_to_fp32` merge (the one that merges the fp32 weights, given the moments'
        flat partitions instead: they are laid out alike, partition for partition); None without them."""
        from deepspeed.utils import zero_to_fp32 as merge

        if not self.holds_optimizer_state:
            return None
        folder = str(self.root / self.tag)
        with deepspeed_chatter(quiet=True):
            optim = [safe_load(f, allowed=_deepspeed_allowed())["optimizer_state_dict"]
                     for f in merge.get_optim_files(folder)]
            models = merge.parse_model_states(merge.get_model_state_files(folder))
            key = _BASE_STATE[int(optim[0]["zero_stage"])]
            states = [[o[key]["state"][i] for i in sorted(o[key]["state"])] for o in optim]  # [rank][partition]
            merged = {m: _merged([[s[m] for s in rank] for rank in states], optim[0], models)
                      for m in (EXP_AVG, EXP_AVG_SQ)}
        steps = {int(s["step"]) for rank in states for s in rank}
        if len(steps) != 1:
            raise InputError(f"{folder}: Adam's step counts differ between partitions: {sorted(steps)}")
        return AdamMoments(merged[EXP_AVG], merged[EXP_AVG_SQ], steps.pop())


_BASE_STATE = {1: "base_optimizer_state", 2: "base_optimizer_state", 3: "optimizer_state_dict"}  # the torch
# optimizer's own state_dict inside DeepSpeed's: one entry per flat fp32 partition (ZeRO-3: per sub-group)


def _merged(flat: list[list[torch.Tensor]], optim: dict, models) -> dict[str, torch.Tensor]:
    """One moment's full tensors by parameter name from its flat partitions ([rank][partition])."""
    from deepspeed.utils import zero_to_fp32 as merge

    if int(optim["zero_stage"]) <= 2:
        sd = merge._get_fp32_state_dict_from_zero2_checkpoint(len(flat), flat, models, True,
                                                              optim.get("param_alignment_paddings"))
    else:
        sd = merge.to_torch_tensor(merge._get_fp32_state_dict_from_zero3_checkpoint(len(flat), flat, models, True))
    return {k: v for k, v in sd.items() if any(k in shapes for shapes in models[0].param_shapes)}  # not buffers


def open_deepspeed(path: Path, validate: bool = True) -> DeepSpeedReader:
    """The config from `scalegrow.json`; the weights are read (merged) only when first asked for."""
    config = read_model(path)
    tag = (path / "latest").read_text().strip()
    match = re.fullmatch(r"(?:step|global_step)(\d+)", tag)
    return DeepSpeedReader(path, int(match.group(1)) if match else "release", None, config,
                           Layout.single(config.num_layers), torch.float32, tag)


FORMAT = Format("deepspeed", "DeepSpeed", is_deepspeed, open_deepspeed)
