"""Identity: every tensor passes through unchanged. `scalegrow convert` (and saving a model from
memory) is this operator, so re-partitioning and format changes run through the same streaming
executor as growth."""
from __future__ import annotations

import torch

from scalegrow.core.config import ModelConfig
from scalegrow.operators.base import LayerwiseOperator, require_equal


class Identity(LayerwiseOperator):
    name = "identity"
    handles_moe = True  # every tensor passes through, whatever its role
    handles_mla = True  # attention passes through

    def check(self, src: ModelConfig, dst: ModelConfig) -> None:
        for key in src.to_dict():
            require_equal(src, dst, key, why="identity keeps the model as it is")

    def map_layer(self, index, sources) -> dict[str, torch.Tensor]:
        return {spec.name: sources[index][spec.name] for spec in self.layer_specs(index)}
