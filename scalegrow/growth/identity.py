"""Identity: every tensor passes through unchanged. `scalegrow convert` is growth by identity, so
re-partitioning and format changes run through the same streaming executor as growth."""
from __future__ import annotations

import torch

from scalegrow.config import ModelConfig
from scalegrow.growth.base import GrowthOperator, require_equal


class Identity(GrowthOperator):
    name = "identity"

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        for key in src.to_dict():
            require_equal(src, dst, key, why="identity keeps the model as it is")

    def layer_sources(self, index: int) -> tuple[int, ...]:
        return (index,)

    def grow_embeddings(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)

    def grow_layer(self, index, sources, specs) -> dict[str, torch.Tensor]:
        return {spec.name: sources[index][spec.name] for spec in specs}

    def grow_head(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)
