"""Writing one checkpoint with several worker processes, each owning a share of the output files.

    plan -> fork N workers -> each streams its stages into its own files -> the parent finishes

The output's rank files (stage, EP rank, TP rank) are divided among the workers: whole pipeline
stages when there are at least as many stages as workers (no work is repeated), else the files of
each stage (a stage's layers are then computed by every worker that writes one of its files, and
each writes only its own shards). Every tensor is computed exactly as in one process (noise is
seeded per tensor), so the files are bit-identical to `--workers 1`. Workers are forked: they share
the operator and the opened source, and nothing is pickled; each runs one thread (OpenMP's pool
does not survive a fork), so the default count is one worker per usable core. The first worker to
fail stops the others; its error is the command's, and the partial output goes with the atomic
directory.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from scalegrow.errors import InputError
from scalegrow.formats.base import Reader, Writer
from scalegrow.formats.io import tree_bytes
from scalegrow.operators.base import Operator
from scalegrow.write import executor

GiB = 2**30
File = tuple[int, int, int]  # (stage, EP rank, TP rank)


@dataclass(frozen=True)
class Share:
    """What one worker writes: its files, and the stages it must stream to produce them."""

    files: frozenset[File]

    @property
    def stages(self) -> list[int]:
        return sorted({stage for stage, _, _ in self.files})


def divide(sizes: dict[File, int], workers: int) -> list[Share]:
    """Split the files into at most `workers` shares of about equal bytes, in file order: whole
    stages while there are enough of them, else files of a stage (see the module docstring)."""
    stages = sorted({f[0] for f in sizes})
    if len(stages) >= workers:
        units = [[f for f in sorted(sizes) if f[0] == s] for s in stages]
    else:
        units = [[f] for f in sorted(sizes)]
    weights = [sum(sizes[f] for f in unit) for unit in units]
    total, shares, current, done = sum(weights), [], [], 0
    for unit, weight in zip(units, weights):
        current += unit
        done += weight
        if done >= total * (len(shares) + 1) / workers and len(shares) < workers - 1:
            shares.append(Share(frozenset(current)))
            current = []
    if current:
        shares.append(Share(frozenset(current)))
    return shares


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def per_worker_memory(largest_file: int) -> int:
    """The memory bound one worker keeps: 1.5 x the largest file it writes + 0.5 GiB."""
    return int(1.5 * largest_file + 0.5 * GiB)


def count(requested: int | None, sizes: dict[File, int], memory: int | None = None) -> tuple[int, str | None]:
    """(workers to run, a note when the count was lowered). `requested` None: as many as the usable
    cores, the files and the available memory allow. A requested count that does not fit in memory
    is refused (InputError naming both figures)."""
    memory = available_memory() if memory is None else memory
    each = per_worker_memory(max(sizes.values(), default=0))
    fits = max(1, memory // each)
    if requested is not None:
        if requested < 1:
            raise InputError(f"--workers: must be >= 1, got {requested}")
        if requested > 1 and requested > fits:
            raise InputError(f"--workers: {requested} workers need {requested * each / GiB:.1f} GiB "
                             f"({each / GiB:.2f} GiB each) but {memory / GiB:.1f} GiB is available; "
                             f"use --workers {fits}")
        return max(1, min(requested, len(sizes))), None
    n = min(usable_cores(), len(sizes), fits)
    note = f"workers: {n} (memory for {fits})" if fits < min(usable_cores(), len(sizes)) else None
    return max(1, n), note


def run(source: Reader, op: Operator, make_writer: Callable[[], Writer], shares: list[Share], out: Path,
        bar: tqdm, poll: Callable[[], None] = lambda: None) -> None:
    """Write `op` applied to `source` into `out` with one forked process per share, moving `bar` by
    the bytes in `out`; `poll()` is called while waiting and may raise to stop them all (another
    rank failed). The tracker is the caller's, once every file is there."""
    ctx = mp.get_context("fork")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_work, args=(source, op, make_writer, share, errors), daemon=True)
             for share in shares]
    for p in procs:
        p.start()
    try:
        _watch(procs, errors, out, bar, poll)
    except BaseException:
        for p in procs:
            p.kill()
            p.join()
        raise


def progress_bar(total: int, progress: bool, desc: str) -> tqdm:
    """One bar for every worker and rank, in bytes written, with tqdm's ETA."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress)


def move(bar: tqdm, out: Path) -> None:
    bar.update(min(bar.total, tree_bytes(out)) - bar.n)


def _work(source: Reader, op: Operator, make_writer, share: Share, errors) -> None:
    torch.set_num_threads(1)  # a forked child hangs in the parent's OpenMP pool: one thread, one core each
    try:
        writer = make_writer()
        writer.restrict(share.files)
        executor.run(source, op, writer, progress=False, stages=share.stages)
    except BaseException as exc:  # the parent re-raises it: one line for bad input, else the traceback
        errors.put((isinstance(exc, InputError), str(exc) if isinstance(exc, InputError) else traceback.format_exc()))
        os._exit(1)
    os._exit(0)


def _watch(procs, errors, out: Path, bar: tqdm, poll: Callable[[], None]) -> None:
    """Wait for the workers, moving the bar; raise the first failure, here or (`poll`) elsewhere."""
    while True:
        done = [p for p in procs if p.exitcode is not None]  # a worker reports its error, then exits
        dead = [p for p in done if p.exitcode != 0]
        poll()  # after looking here: a failure here may only have tripped over another rank's cleanup
        if not errors.empty():
            is_input, message = errors.get()
            raise InputError(message) if is_input else RuntimeError(f"a worker failed:\n{message}")
        if dead:
            raise RuntimeError(f"worker {procs.index(dead[0])} died with exit code {dead[0].exitcode}")
        move(bar, out)
        if len(done) == len(procs):
            return
        time.sleep(0.2)
