"""Safe lazy loading, atomic output directories and a bounded-memory checkpoint file writer."""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import pickle
import re
import shutil
import struct
import tempfile
import types
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

from scalegrow.errors import InputError


# What a Megatron checkpoint may pickle besides tensors and plain containers: its `args` Namespace
# and the few path/namespace types Megatron puts in args. Nothing else is ever unpickled.
BASE_ALLOWED: list[Any] = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath]


def _megatron_allowed() -> list[Any]:
    """megatron-core's own explicit list (its enums in args, numpy rng state). Importing
    megatron-core takes seconds, so it is consulted only when a file needs it."""
    try:
        from megatron.core.safe_globals import SAFE_GLOBALS
    except ImportError:
        return []
    return list(SAFE_GLOBALS)


def _torch_load(path: Path, mmap: bool, allowed: list[Any]) -> Any:
    # `safe_globals` removes what it was given on exit, even entries registered before it, so
    # give it only what is not already allowed process-wide (e.g. by Megatron-LM at start-up).
    present = set(map(id, torch.serialization.get_safe_globals()))
    with torch.serialization.safe_globals([g for g in allowed if id(g) not in present]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def safe_load(path: str | Path, mmap: bool = True) -> Any:
    """`torch.load(weights_only=True)` with an explicit allow-list; every failure is an InputError.

    With `mmap=True` tensor data stays on disk until touched, so opening a shard costs only its pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        try:
            return _torch_load(path, mmap, BASE_ALLOWED)
        except pickle.UnpicklingError:
            return _torch_load(path, mmap, BASE_ALLOWED + _megatron_allowed())
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = found.group(1) if found else "an object"
        raise InputError(f"{path}: refused to unpickle {what}: not in the allow-list of checkpoint types") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: unreadable or truncated checkpoint file ({first})") from exc


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh `DST.partial-*` sibling; rename it to `dst` on success, delete it on failure.

    A killed run leaves at most a `.partial-*` directory, never a half-written `dst`.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise InputError(f"{dst}: destination exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{dst.name}.partial-", dir=dst.parent))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(partial, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, dst)


class PreallocatedTorchFile:
    """A `torch.save` file whose tensor bytes are written one tensor at a time.

    `torch.save` lays the whole file out from fake tensors under `skip_data` (torch's own format, so
    `torch.load` and Megatron read it unchanged); each real tensor is then `pwrite`n into its record
    and the zip CRCs are patched on close. Memory stays bounded by one tensor, not by the file.
    """

    def __init__(self, path: Path, obj: dict, tensor_keys: list[tuple[str, ...]]):
        """`obj` holds fake tensors at the paths in `tensor_keys` (tuples of nested dict keys),
        listed in pickling order (dict insertion order), which is torch's storage-key order."""
        self.path = path
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(obj, path)
        records = _data_records(path)
        assert len(records) == len(tensor_keys), (len(records), len(tensor_keys))
        self._slots = {key: records[str(i)] for i, key in enumerate(tensor_keys)}
        self._crc: dict[str, int] = {}
        self._fd = os.open(path, os.O_WRONLY)

    def write(self, key: tuple[str, ...], tensor: torch.Tensor) -> None:
        record, offset, nbytes = self._slots.pop(key)
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes, (key, data.nbytes, nbytes)
        os.pwrite(self._fd, memoryview(data), offset)
        self._crc[record] = zlib.crc32(memoryview(data))

    def close(self) -> None:
        assert not self._slots, f"{self.path}: tensors never written: {sorted(self._slots)[:3]}"
        os.close(self._fd)
        _patch_crcs(self.path, self._crc)


def _data_records(path: Path) -> dict[str, tuple[str, int, int]]:
    """storage key -> (record name, byte offset of its data, size) for every `*/data/<key>` record."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[1] == "data":
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                out[parts[2]] = (info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def _patch_crcs(path: Path, crcs: dict[str, int]) -> None:
    """Write each record's CRC-32 into its local header and central-directory entry."""
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        cd_offset = zf.start_dir
    with open(path, "r+b") as f:
        for name, crc in crcs.items():
            f.seek(infos[name].header_offset + 14)
            f.write(struct.pack("<I", crc))
        pos = cd_offset
        while True:  # walk the central directory entries
            f.seek(pos)
            head = f.read(46)
            if len(head) < 46 or head[:4] != b"PK\x01\x02":
                break
            name_len, extra_len, comment_len = struct.unpack("<HHH", head[28:34])
            name = f.read(name_len).decode()
            if name in crcs:
                f.seek(pos + 16)
                f.write(struct.pack("<I", crcs[name]))
            pos += 46 + name_len + extra_len + comment_len


def file_digest_line(path: Path, root: Path, head_bytes: int = 1 << 20) -> str:
    """One manifest line: relative path, size and sha256 of the file's first MiB (its pickle)."""
    import hashlib

    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(head_bytes)).hexdigest()
    return f"{path.relative_to(root).as_posix()} {path.stat().st_size} {head}"
