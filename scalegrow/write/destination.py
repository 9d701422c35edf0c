"""Where an output goes: it may not exist or overlap the source, its device must have room, and a
device that fills up anyway is reported as one line naming the file."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from scalegrow.errors import InputError
from scalegrow.formats.io import WriteError


def overlap(path: str | Path, other: str | Path) -> str | None:
    """How `path` relates to `other` once symlinks are resolved: 'is', 'lies inside', 'contains', or
    None when neither holds the other."""
    a, b = Path(path).resolve(), Path(other).resolve()
    return "is" if a == b else "lies inside" if b in a.parents else "contains" if a in b.parents else None


def check_destination(dst: str | Path, overwrite: bool, source: str | Path | None = None) -> None:
    """Fail before any work when the output exists (atomic_output_dir checks again at the end), or
    when it would overlap the source: equal to it, inside it, or containing it."""
    relation = overlap(dst, source) if source is not None else None
    if relation:
        raise InputError(f"{dst}: the destination {relation} the source {source}; the source is only ever read, "
                         f"so write somewhere else")
    if Path(dst).exists() and not overwrite:
        raise InputError(f"{dst}: destination exists (pass --overwrite to replace it)")


def human(nbytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def free_bytes(path: Path) -> int:
    """Free space on the device that `path` (or its nearest existing ancestor) lives on."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_room(need: int, dst: str | Path) -> None:
    free = free_bytes(Path(dst).parent)
    if need > free:
        raise InputError(f"{dst}: the output needs {human(need)} but its device has {human(free)} free")


def explain_full_device(exc: BaseException, out: Path, dst: str | Path) -> None:
    """A write that failed because the device is full becomes one line naming the file; anything
    else is left as it is. (torch's zip writer reports ENOSPC only as 'iostream error'.)"""
    cause = exc.__cause__ if isinstance(exc, WriteError) else exc
    if getattr(cause, "errno", None) != errno.ENOSPC and free_bytes(out) > 2**20:
        return
    if isinstance(exc, WriteError):
        file = exc.path
    else:  # failed in this thread, opening a file: the newest one
        file = max((p for p in out.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime, default=out)
    raise InputError(f"no space left on the device of {dst} while writing "
                     f"{Path(dst) / file.relative_to(out)}") from None
