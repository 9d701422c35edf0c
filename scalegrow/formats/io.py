"""Safe lazy loading, atomic output directories and a bounded-memory checkpoint file writer."""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import pathlib
import pickle
import queue
import re
import secrets
import shutil
import sys
import threading
import types
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from scalegrow import deps
from scalegrow.errors import InputError
from scalegrow.formats import zipcrc

# What a Megatron checkpoint may pickle besides tensors and plain containers: its `args` Namespace
# and the few path/namespace types Megatron puts in args. Nothing else is ever unpickled.
BASE_ALLOWED: list[Any] = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath]


def megatron_allowed() -> list[Any]:
    """megatron-core's own explicit list (its enums in args, numpy rng state). Importing
    megatron-core takes seconds, so it is consulted only when a file needs it."""
    try:
        return list(deps.megatron("safe_globals").SAFE_GLOBALS)
    except ImportError:
        return []


def _torch_load(path: Path | io.BytesIO, mmap: bool, allowed: list[Any]) -> Any:
    # `safe_globals` removes what it was given on exit, even entries registered before it, so
    # give it only what is not already allowed process-wide (e.g. by Megatron-LM at start-up).
    present = set(map(id, torch.serialization.get_safe_globals()))
    with torch.serialization.safe_globals([g for g in allowed if id(g) not in present]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def safe_load(path: str | Path, mmap: bool = True, allowed: list[Any] | None = None,
              data: bytes | None = None) -> Any:
    """`torch.load(weights_only=True)` with an explicit allow-list; every failure is an InputError.

    With `mmap=True` tensor data stays on disk until touched, so opening a shard costs only its pickle.
    The default list is BASE_ALLOWED, widened to megatron-core's own list only if a file needs it.
    `data`: the bytes to load when they lie inside another file (a DCP byte item); `path` names them.
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")

    def load(allow: list[Any]) -> Any:
        return _torch_load(path, mmap, allow) if data is None else _torch_load(io.BytesIO(data), False, allow)

    try:
        try:
            return load(allowed or BASE_ALLOWED)
        except pickle.UnpicklingError:
            if allowed is not None:
                raise
            return load(BASE_ALLOWED + megatron_allowed())
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

    A killed run leaves at most a `.partial-*` directory, never a half-written `dst`. The directory
    gets what a plain `mkdir` gives under the user's umask (a temporary directory's 0700 would hide
    the checkpoint from the rest of a cluster's group).
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise InputError(f"{dst}: destination exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = fresh_dir(dst.parent, f"{dst.name}.partial-")
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dst.exists():
        old = fresh_dir(dst.parent, f"{dst.name}.old-")
        os.replace(dst, old / dst.name)
        os.replace(partial, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, dst)


def fresh_dir(parent: Path, prefix: str) -> Path:
    """A new directory `parent/prefix<random>`, made by `mkdir` (mode 0777 less the umask)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@dataclass(eq=False)
class TensorSlot:
    """Stands in for a tensor in an object given to `StreamingTorchFile`: it pickles exactly as
    `torch.save` pickles a contiguous tensor, and its bytes are written later."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    key: str | None = None  # storage record key, assigned while pickling

    def __reduce_ex__(self, protocol):
        stride = [1] * len(self.shape)
        for i in range(len(self.shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * self.shape[i + 1]
        return (torch._utils._rebuild_tensor_v2,
                (_StorageRef(self), 0, torch.Size(self.shape), tuple(stride), False, OrderedDict()))


@dataclass(eq=False)
class _StorageRef:
    slot: TensorSlot


class _Pickler(pickle.Pickler):
    """torch.save's convention: storages become persistent ids ('storage', type, key, location, numel)."""

    def __init__(self, file, slots: list[TensorSlot]):
        super().__init__(file, protocol=2)
        self.slots = slots

    def persistent_id(self, obj):
        if not isinstance(obj, _StorageRef):
            return None
        slot = obj.slot
        slot.key = str(len(self.slots))
        self.slots.append(slot)
        storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[slot.dtype])
        return ("storage", storage_type, slot.key, "cpu", math.prod(slot.shape))


class StreamingTorchFile:
    """A `torch.save`-format file whose tensors are written one at a time, as they are produced.

    The pickle (args, keys, shapes) is written first from `TensorSlot` placeholders; each tensor's
    bytes then go through torch's own zip writer (`PyTorchFileWriter`, which aligns records); the
    CRCs are computed with zlib and patched in at the end (`zipcrc`). `torch.load` and Megatron read
    the result like any other checkpoint. Memory stays bounded by one tensor, not by the file.
    """

    def __init__(self, path: Path, obj: Any):
        buf = io.BytesIO()
        slots: list[TensorSlot] = []
        _Pickler(buf, slots).dump(obj)
        self.path, self._todo, self._crcs = path, {id(s): s for s in slots}, {}
        self._zip = torch._C.PyTorchFileWriter(str(path), False)  # CRCs by zlib, 5x faster (see zipcrc)
        for name, data in (("data.pkl", buf.getvalue()), (".format_version", b"1"),
                           (".storage_alignment", b"64"), ("byteorder", sys.byteorder.encode())):
            self._zip.write_record(name, data, len(data))
            self._crcs[name] = zipcrc.crc32(data)

    def write(self, slot: TensorSlot, tensor: torch.Tensor) -> None:
        assert self._todo.pop(id(slot), None) is slot, f"{self.path}: slot written twice or unknown"
        assert tuple(tensor.shape) == tuple(slot.shape) and tensor.dtype == slot.dtype, \
            (self.path, tuple(tensor.shape), slot.shape, tensor.dtype, slot.dtype)
        tensor = tensor.detach().contiguous()
        start = tensor.storage_offset() * tensor.element_size()  # a TP shard is a view into a larger
        data = tensor.untyped_storage()[start:start + tensor.nbytes]  # storage: slicing it shares memory
        self._zip.write_record(f"data/{slot.key}", data, tensor.nbytes)
        self._crcs[f"data/{slot.key}"] = zipcrc.crc32(tensor)

    def close(self) -> None:
        assert not self._todo, f"{self.path}: {len(self._todo)} tensors never written"
        self._zip.write_end_of_file()
        del self._zip
        zipcrc.patch(self.path, self._crcs)

    def abort(self) -> None:
        """Release the file after a failure (it is discarded): end the zip so that torch's writer
        does not try again when it is destroyed, whatever that attempt says (e.g. the disk is full)."""
        if hasattr(self, "_zip"):
            try:
                self._zip.write_end_of_file()
            except RuntimeError:
                pass
            del self._zip


def tree_bytes(root: Path) -> int:
    """Bytes of every file under `root`."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def written_bytes(root: Path) -> int:
    """Bytes written under `root` so far: a file's allocated blocks, since formats that write into
    planned places (safetensors) make each file its full size, empty, before any tensor is there."""
    return sum(min(st.st_size, st.st_blocks * 512) for st in (p.stat() for p in root.rglob("*") if p.is_file()))


class WriteError(Exception):
    """Writing `path` failed; the cause is the original error (e.g. no space left on the device)."""

    def __init__(self, path: Path, cause: BaseException):
        super().__init__(f"{path}: {cause}")
        self.path, self.__cause__ = Path(path), cause


class WriteQueue:
    """Writes on a background thread (torch's zip writer releases the GIL), so disk I/O overlaps
    the next tensor's computation. At most `depth` tensors wait: memory stays bounded. A failed
    write is re-raised in the caller's thread as a `WriteError` naming the file. The thread starts
    with the first job, so a writer made before workers are forked forks no thread."""

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="scalegrow-writer", daemon=True)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            job, path = item
            try:
                if self._error is None:
                    job()
            except BaseException as exc:  # re-raised in the caller's thread
                self._error = WriteError(path, exc)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None], path: Path) -> None:
        """Run `job`, which writes into `path`, on the writer thread."""
        self._check()
        if self._thread.ident is None:
            self._thread.start()
        self._queue.put((job, path))

    def drain(self) -> None:
        self._queue.join()
        self._check()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop the thread after a failure, ignoring what went wrong (the caller is handling that)."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")  # skip whatever is still queued
            self._queue.put(None)
            self._thread.join()


_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h), and glibc's defaults
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Within: this process reuses the memory of freed tensors instead of handing it back to the kernel.

    Streaming allocates and frees tensors of the same few sizes layer after layer. glibc serves each
    one above 32 MiB with a fresh mmap and unmaps it on free, so every layer pays page faults and
    zeroing for all of its memory again; with mmap off and no trimming the heap keeps the freed blocks
    for the next layer. Measured on an HF -> HF growth (2.7 GB out): ~70% fewer page faults, a third
    less system time, the same peak RSS (docs/BENCHMARKS.md). On leaving, glibc's default values are
    set again (explicitly set, so its mmap threshold no longer adapts to freed sizes) and the
    heap is trimmed. glibc only; elsewhere nothing changes.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        for param, value in _DEFAULTS.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)


def drop_mapped_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Let the pages of *mmap-loaded* tensors leave this process's RSS (they stay in the page cache).

    Only for tensors from `safe_load(mmap=True)`: the mapping is private and never written, so a
    later access simply reads the file again. On anonymous memory this would zero the data.
    """
    libc = _libc()
    if libc is None:
        return
    for t in tensors:
        if t.numel() == 0 or t.device.type != "cpu":
            continue
        start = t.data_ptr() & ~(_PAGE - 1)
        end = t.data_ptr() + t.numel() * t.element_size()
        libc.madvise(start, end - start, _MADV_DONTNEED)


def file_digest_line(path: Path, root: Path, head_bytes: int = 1 << 20) -> str:
    """One manifest line: relative path, size and sha256 of the file's first MiB (its pickle)."""
    import hashlib

    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(head_bytes)).hexdigest()
    return f"{path.relative_to(root).as_posix()} {path.stat().st_size} {head}"
