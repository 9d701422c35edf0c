"""What a method's prepare step gets (`Context`), and how it trains: a `Trainer` runs steps of a
module's loss. `LocalTrainer` is a plain loop on this process; a training run supplies its DeepSpeed
engine instead (`scalegrow.train.trainer`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from scalegrow.data import BatchOrder, TokenStream, batch
from scalegrow.formats.base import Reader


class Trainer(Protocol):
    def fit(self, module: torch.nn.Module, stream: TokenStream, steps: int, lr_at: Callable[[int], float],
            name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        """Train `module` (forward(tokens, labels) -> loss) for `steps` steps at `lr_at(step)`; return
        every step's loss and the trained state dict, whole on this process."""
        ...


@dataclass
class Context:
    """What a prepare step may use: the source checkpoint, token data (its training split and what it
    is, for the record), a trainer, the device it computes on, and a directory for what it learns
    (None: keep nothing)."""

    source: Reader
    stream: TokenStream
    data: str
    trainer: Trainer
    progress: bool = True
    artifacts: Path | None = None
    device: torch.device = torch.device("cpu")


class LocalTrainer:
    """AdamW without weight decay on this process, on its `device` (the CPU or one GPU), micro-batches
    drawn by `BatchOrder`. The trained state comes back on the CPU."""

    def __init__(self, micro_batch_size: int = 8, seed: int = 0, progress: bool = True,
                 device: torch.device = torch.device("cpu")):
        self.micro_batch_size, self.seed, self.progress, self.device = micro_batch_size, seed, progress, device

    def fit(self, module, stream, steps, lr_at, name):
        module.to(self.device)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr_at(0),
                                      weight_decay=0.0)
        order = BatchOrder(stream.num_samples, self.micro_batch_size, 1, 1, self.seed)
        losses = []
        bar = tqdm(range(steps), desc=name, unit="step", disable=not self.progress)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            tokens = batch(stream, order.samples(step, 0, 0)).to(self.device)
            loss = module(tokens[:, :-1], tokens[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        return losses, {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
