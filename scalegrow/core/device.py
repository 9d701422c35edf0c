"""`--device`: where a command's own computing runs (calibration, LiGO's operator training, eval and
verify's forward passes). Writing checkpoints is memory-bound streaming and stays on the CPU."""
from __future__ import annotations

import re

import torch

from scalegrow.errors import InputError


def resolve(name: str | None) -> torch.device:
    """cpu, cuda or cuda:N; None: cuda when a GPU is available, else cpu. A device this machine does
    not have is refused by name."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise InputError(f"--device: {name!r} is not one of cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device: {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'})")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise InputError(f"--device: {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)
