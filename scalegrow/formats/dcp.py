"""torch.distributed.checkpoint (DCP) files, read and written one chunk at a time.

    DIR/.metadata        pickled `Metadata`: every tensor's global size and chunks, where each chunk is
    DIR/__0_0.distcp     the chunks, each a `torch.save` record at an offset; byte items likewise

This is the storage under megatron-core's `torch_dist` format. DCP's own reader and writer work on a
whole state dict at once; these work chunk by chunk, so memory stays bounded by one chunk. The
`.metadata` pickle is read through an allow-list of DCP's own dataclasses before anything sees it.
"""
from __future__ import annotations

import enum
import importlib
import io
import pickle
from collections import OrderedDict
from pathlib import Path

import torch

from scalegrow.errors import InputError

METADATA = ".metadata"
DATA_FILE = "__0_0.distcp"
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")


def _enum_member(cls, name: str):
    """What `getattr(cls, name)` means in a pickle of an enum member (Python versions that pickle
    enums that way): allowed for the allow-listed enum classes' members only, nothing else."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"GLOBAL builtins.getattr of {getattr(cls, '__name__', cls)}.{name}")


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only DCP's metadata dataclasses/enums, torch.Size, dtypes and layouts."""

    def find_class(self, module: str, name: str):
        if module == "builtins" and name == "getattr":
            return _enum_member
        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING":
                return obj
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def _dcp():
    """torch.distributed.checkpoint's metadata classes, imported on first use (the import takes ~1 s,
    which every command would otherwise pay at start-up)."""
    from torch.distributed.checkpoint import filesystem, metadata

    return metadata, filesystem


def read_metadata(path: Path):
    """DCP's `.metadata`, unpickled through the allow-list above."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise InputError(f"{path}: missing torch_dist metadata file") from None
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: refused to unpickle {exc}: not in the allow-list of checkpoint types") from exc
    except Exception as exc:  # truncated or garbage
        raise InputError(f"{path}: unreadable torch_dist metadata ({type(exc).__name__}: {exc})") from exc


class ChunkReader:
    """Reads any box of a stored tensor from the chunks that overlap it (torch.load per chunk,
    weights_only), so a layer of a [num_layers, ...] stacked tensor costs one layer of memory."""

    def __init__(self, root: Path):
        self.root = root
        self.meta = read_metadata(root / METADATA)
        stored = {(i.fqn, tuple(i.offset)): info for i, info in self.meta.storage_data.items()
                  if i.offset is not None}  # byte items (`_extra_state`, the common state) have no offset
        self._objects = {i.fqn: info for i, info in self.meta.storage_data.items() if i.offset is None}
        self._chunks: dict[str, list] = {}  # key -> [(offsets, sizes, storage info)]
        for key, md in self.meta.state_dict_metadata.items():
            for chunk in getattr(md, "chunks", ()):
                at = tuple(chunk.offsets)
                self._chunks.setdefault(key, []).append((at, tuple(chunk.sizes), stored.get((key, at))))

    def has(self, key: str) -> bool:
        return key in self.meta.state_dict_metadata

    def object_bytes(self, key: str) -> bytes | None:
        """A byte item's bytes (DCP stores a non-tensor object as its `torch.save`); None if absent."""
        info = self._objects.get(key)
        if info is None:
            return None
        with open(self.root / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.meta.state_dict_metadata[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.meta.state_dict_metadata[key].properties.dtype

    def read(self, key: str, offsets: tuple[int, ...] | None = None,
             sizes: tuple[int, ...] | None = None) -> torch.Tensor:
        """The box [offsets, offsets + sizes) of tensor `key` (default: all of it)."""
        shape = self.shape(key)
        offsets = offsets or (0,) * len(shape)
        sizes = sizes or shape
        out = torch.empty(sizes, dtype=self.dtype(key))
        covered = 0
        for chunk_offsets, chunk_sizes, info in self._chunks.get(key, []):
            lo = [max(a, c) for a, c in zip(offsets, chunk_offsets)]
            hi = [min(a + n, c + m) for a, n, c, m in zip(offsets, sizes, chunk_offsets, chunk_sizes)]
            if any(h <= l for l, h in zip(lo, hi)) or info is None:
                continue
            data = self._load_chunk(key, info)
            src = data[tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, chunk_offsets))]
            out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))] = src
            covered += src.numel()
        if covered != out.numel():
            raise InputError(f"{self.root}: {key}: stored chunks cover {covered} of {out.numel()} "
                             f"elements of the requested slice")
        return out

    def _load_chunk(self, key: str, info) -> torch.Tensor:
        if getattr(info, "transform_descriptors", None):
            raise InputError(f"{self.root / info.relative_path}: {key}: stored with transforms "
                             f"{info.transform_descriptors}, which scalegrow cannot read")
        with open(self.root / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{self.root / info.relative_path}: {key}: unreadable chunk ({exc})") from exc


class ChunkWriter:
    """Appends chunks to one DCP data file as they come (opened at the first), then writes the
    `.metadata` that indexes them. Tensors are declared with their global size and dtype; each chunk
    names its offsets. Several writers, one data file each, may fill one checkpoint: each hands its
    `records()` to the one that writes `.metadata` (`finish(others)`)."""

    def __init__(self, root: Path, data_file: str = DATA_FILE):
        self.root, self.data_file = root, data_file
        self._md, self._fs = _dcp()
        self.path = root / data_file
        self._file = None
        self._declared: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._records: list[list] = []  # [key, offsets or None (a byte item), sizes, file, start, length]

    def declare(self, key: str, size: tuple[int, ...], dtype: torch.dtype) -> None:
        self._declared[key] = (tuple(size), dtype)

    def add_chunk(self, key: str, offsets: tuple[int, ...], chunk: torch.Tensor) -> None:
        """One box of a declared tensor, stored the way DCP stores it: `torch.save` of that box alone."""
        chunk = chunk.detach().contiguous()
        if chunk.untyped_storage().nbytes() != chunk.nbytes:  # a view into a larger tensor
            chunk = chunk.clone()
        self._save(key, chunk, list(offsets), list(chunk.shape))

    def add_object(self, key: str, obj) -> None:
        """A byte item (DCP pickles non-tensor objects with `torch.save`)."""
        self._save(key, obj, None, None)

    def _save(self, key: str, obj, offsets: list | None, sizes: list | None) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")  # after the chunks of an earlier writer of this file, if any
        start = self._file.tell()
        torch.save(obj, self._file)
        self._records.append([key, offsets, sizes, self.data_file, start, self._file.tell() - start])

    def records(self) -> list[list]:
        """What this writer stored and where (JSON-able), once its file is closed."""
        self.close()
        return list(self._records)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    abort = close

    def finish(self, others: list[list] = ()) -> None:
        """`.metadata` over this writer's records and `others` (other writers' `records()`), every
        declared tensor covered exactly, chunks listed in offset order whichever writer stored them."""
        md, fs = self._md, self._fs
        records = sorted(self.records() + [list(r) for r in others], key=lambda r: (r[0], r[1] or []))
        items = {key: md.TensorStorageMetadata(md.TensorProperties(dtype=dtype), torch.Size(size), [])
                 for key, (size, dtype) in self._declared.items()}
        storage = {}
        for key, offsets, sizes, file, start, length in records:
            if offsets is None:
                items[key], index = md.BytesStorageMetadata(), md.MetadataIndex(key)
            else:
                items[key].chunks.append(md.ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
                index = md.MetadataIndex(key, torch.Size(offsets))
            storage[index] = fs._StorageInfo(file, start, length)
        for key, item in items.items():
            if isinstance(item, md.TensorStorageMetadata):
                covered = sum(c.sizes.numel() for c in item.chunks)
                assert covered == item.size.numel(), f"{key}: chunks cover {covered} of {item.size.numel()}"
        with open(self.root / METADATA, "wb") as f:
            pickle.dump(md.Metadata(items, storage_data=storage, version="1.0.0"), f)
