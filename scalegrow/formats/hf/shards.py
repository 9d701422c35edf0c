"""safetensors shard files, planned up front and filled tensor by tensor.

    model-00001-of-00003.safetensors ...   8-byte header length, JSON header, then the raw tensors
    model.safetensors.index.json           {"metadata": {"total_size": N}, "weight_map": {name: file}}

A checkpoint's tensors (names, shapes, dtypes: the checkpoint's, and fp32 for the few tensors a
model keeps in fp32, DeepSeek's routing bias) are known before any is computed, so every shard's
header is written first and each tensor goes straight to its offset when it arrives, in any order:
memory stays bounded by one tensor. One shard is named `model.safetensors` and has no index, as
`transformers`' `save_pretrained` does.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    file: str
    offset: int  # absolute, in the file
    shape: tuple[int, ...]
    dtype: torch.dtype


def always_fp32(name: str) -> bool:
    """An HF tensor stored in fp32 whatever the checkpoint's dtype (as DeepSeek-V3's release has it)."""
    return name.endswith("e_score_correction_bias")


def dtype_of(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if always_fp32(name) else dtype


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                max_shard_size: int) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Tensors in order, into files of at most `max_shard_size` bytes (a larger tensor gets its own)."""
    groups: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * dtype_of(name, dtype).itemsize
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors": g for k, g in enumerate(groups)}


class ShardWriter:
    """Plans every shard's header; `write` puts a tensor at its place. A shard is created by the
    first write into it, the same way by every writer (header, then its full size; nothing truncated),
    so several workers and ranks can fill the same files at once."""

    def __init__(self, out_dir: Path, shards: dict[str, list[tuple[str, tuple[int, ...]]]], dtype: torch.dtype):
        self.out_dir, self.dtype, self.entries = out_dir, dtype, {}
        self._heads: dict[str, tuple[bytes, int]] = {}  # file -> (header bytes, file size)
        self._fds: dict[str, int] = {}
        for file, tensors in shards.items():
            self._plan(file, tensors)

    def _plan(self, file: str, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
        header, at = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in tensors:
            dtype = dtype_of(name, self.dtype)
            end = at + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [at, end]}
            at = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        start = 8 + len(raw)
        self._heads[file] = (struct.pack("<Q", len(raw)) + raw, start + at)
        for name, shape in tensors:
            self.entries[name] = Entry(file, start + header[name]["data_offsets"][0], tuple(shape),
                                       dtype_of(name, self.dtype))

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            head, size = self._heads[file]
            fd = os.open(self.out_dir / file, os.O_WRONLY | os.O_CREAT, 0o666)  # less the umask
            _pwrite(fd, memoryview(head), 0)
            os.ftruncate(fd, size)  # every writer makes it the same size: no data is cut
            self._fds[file] = fd
        return self._fds[file]

    def path(self, name: str) -> Path:
        return self.out_dir / self.entries[name].file

    def write(self, name: str, tensor: torch.Tensor, index: int | None = None) -> None:
        """`tensor` at its place; with `index`, as slice `index` along dim 0 of a stacked tensor."""
        entry = self.entries[name]
        shape, offset = entry.shape, entry.offset
        if index is not None:
            shape = shape[1:]
            offset += index * math.prod(shape) * entry.dtype.itemsize
        assert tuple(tensor.shape) == shape and tensor.dtype == entry.dtype, (name, tensor.shape, shape)
        data = memoryview(tensor.detach().contiguous().view(torch.uint8).numpy()).cast("B")
        _pwrite(self._fd(entry.file), data, offset)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def write_index(self) -> None:
        """With several shards, `model.safetensors.index.json`: every tensor's file, and the total size."""
        if len(self._heads) > 1:
            total = sum(math.prod(e.shape) * e.dtype.itemsize for e in self.entries.values())
            index = {"metadata": {"total_size": total}, "weight_map": {n: e.file for n, e in self.entries.items()}}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
