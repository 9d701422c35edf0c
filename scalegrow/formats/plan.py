"""The output plan of `--dry-run` and of meta-device plans at real model sizes: every file a legacy
Megatron checkpoint would hold, with its tensors' keys and shard shapes, recorded and not written."""
from __future__ import annotations

import torch

from scalegrow.core import arch

from scalegrow.formats.megatron import MegatronWriter


class PlanWriter(MegatronWriter):
    """Writes nothing: records every output shard's keys and shapes, and checks that the operator
    hands over exactly those tensors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan: dict[str, dict[str, tuple[int, ...]]] = {}

    def _open_file(self, stage: int, tp_rank: int, ep_rank: int, shapes: dict[str, tuple[int, ...]]):
        name = str(self.file_path(tp_rank, stage, ep_rank).relative_to(self.out_dir))
        self.plan[name] = dict(shapes)
        return _PlanFile(name, shapes, self.dtype)

    def finish(self) -> None:
        assert not self._files
        self._queue.close()


class _PlanFile:
    def __init__(self, name: str, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
        self.name, self.path, self._todo, self.dtype = name, name, dict(shapes), dtype

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want = self._todo.pop(key)
        dtype = arch.stored_dtype(key, self.dtype)
        assert tuple(tensor.shape) == want and tensor.dtype == dtype, (self.name, key, tensor.shape, want)

    def close(self) -> None:
        assert not self._todo, f"{self.name}: tensors never written: {sorted(self._todo)[:3]}"

    def abort(self) -> None:
        pass
