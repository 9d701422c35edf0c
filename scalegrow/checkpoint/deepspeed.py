"""DeepSpeed checkpoints (a training run's `output.dir/checkpoints`) as sources for grow/convert/verify.

The model config comes from the `scalegrow.json` training writes beside the checkpoints; the weights
from DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`, which merges the ZeRO partitions of
the fp32 master weights (in memory: DeepSpeed offers no lazy path). That function unpickles with
`weights_only=False`, so every file is first loaded here with `weights_only=True` and an explicit
allow-list (DeepSpeed's loss scaler and ZeRO-stage enum besides Megatron's); anything else is refused.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalegrow import arch
from scalegrow.checkpoint.base import Checkpoint
from scalegrow.checkpoint.io import BASE_ALLOWED, megatron_allowed, safe_load
from scalegrow.checkpoint.sharding import StageLayout
from scalegrow.config import ModelConfig
from scalegrow.errors import InputError

META = "scalegrow.json"


def is_deepspeed(path: Path) -> bool:
    latest = path / "latest"
    return latest.is_file() and any((path / latest.read_text().strip()).glob("*model_states.pt"))


def _deepspeed_allowed() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return BASE_ALLOWED + megatron_allowed() + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _deepspeed_logs_to_stderr() -> None:
    """scalegrow's commands print their results on stdout (verify: one JSON line); DeepSpeed's
    logger writes to the stdout of its first import (and logs while importing), so import it under
    a redirect and point its handlers at stderr for later calls."""
    import logging

    from deepspeed.utils.logging import logger

    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is not sys.stderr:
            handler.setStream(sys.stderr)


@dataclass
class DeepSpeedCheckpoint(Checkpoint):
    tag: str = ""
    _state: dict | None = field(default=None, repr=False)

    format = "deepspeed"

    def files(self) -> list[Path]:
        return sorted((self.root / self.tag).glob("*.pt"))

    def _sd(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs and prints; stdout is ours
                _deepspeed_logs_to_stderr()
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                allowed = _deepspeed_allowed()
                for f in self.files():
                    safe_load(f, allowed=allowed)  # refuse anything outside the allow-list first
                self._state = get_fp32_state_dict_from_zero_checkpoint(str(self.root), tag=self.tag)
        return self._state

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return {s.name: self._sd()[arch.layer_key(index, s.name)] for s in arch.layer_specs(self.config)}

    def embeddings(self) -> dict[str, torch.Tensor]:
        return {s.name: self._sd()[s.name] for s in arch.embedding_specs(self.config)}

    def head(self) -> dict[str, torch.Tensor]:
        sd = self._sd()
        out = {s.name: sd[s.name] for s in arch.head_specs(self.config) if s.role != "output_layer"}
        out[arch.OUTPUT_LAYER] = sd[arch.WORD_EMBEDDINGS if self.config.tied else arch.OUTPUT_LAYER]
        return out

    def release(self) -> None:
        self._state = None


def open_deepspeed(path: Path) -> DeepSpeedCheckpoint:
    meta = path / META
    try:
        config = ModelConfig(**json.loads(meta.read_text())["model"])
    except FileNotFoundError:
        raise InputError(f"{meta}: missing (a DeepSpeed checkpoint needs the model config scalegrow "
                         f"training writes beside it)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{meta}: unreadable model config ({exc})") from exc
    tag = (path / "latest").read_text().strip()
    match = re.fullmatch(r"(?:step|global_step)(\d+)", tag)
    return DeepSpeedCheckpoint(path, int(match.group(1)) if match else "release", config.to_megatron_args(), config,
                               1, StageLayout((config.num_layers,)), torch.float32, tag)
