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
from scalegrow.formats.io import BASE_ALLOWED, megatron_allowed, safe_load
from scalegrow.formats.metadata import read_model


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


def open_deepspeed(path: Path, validate: bool = True) -> DeepSpeedReader:
    """The config from `scalegrow.json`; the weights are read (merged) only when first asked for."""
    config = read_model(path)
    tag = (path / "latest").read_text().strip()
    match = re.fullmatch(r"(?:step|global_step)(\d+)", tag)
    return DeepSpeedReader(path, int(match.group(1)) if match else "release", None, config,
                           Layout.single(config.num_layers), torch.float32, tag)


FORMAT = Format("deepspeed", "DeepSpeed", is_deepspeed, open_deepspeed)
