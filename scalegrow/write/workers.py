"""Writing one checkpoint with several worker processes, each owning a share of the output.

    plan -> fork N workers -> each streams its share and leaves its files -> the parent completes

What is divided are the format's work units (`Format.work_units`), in order and by bytes:
- a format written in order (Megatron legacy: torch's zip files) divides its rank files
  (stage, EP rank, TP rank): whole pipeline stages when there are at least as many stages as
  workers (no work is repeated), else the files of each stage (a stage's layers are then computed by
  every worker that writes one of its files, and each writes only its own shards);
- a format whose tensors have planned places (Hugging Face safetensors, torch_dist) divides pieces
  (stage, position): the embeddings (-1), each layer, the head (num_layers). Each piece is computed
  once, by one worker, and written into its place (a safetensors offset, or the worker's own `.distcp`
  file), so a single-stage model (every HF model) is shared among workers too.
Each worker's writer finishes its own part; the parent's writer then `complete`s the checkpoint once
(the tracker, HF's index and config.json, torch_dist's `.metadata`). Every tensor is computed exactly
as in one process (noise is seeded per tensor), so the tensors are bit-identical to `--workers 1`.
Workers are forked: they share the operator and the opened source, and nothing is pickled; each runs
one thread (OpenMP's pool does not survive a fork), so the default count is one worker per usable
core (and per MIN_SHARE of output). The first worker to
fail stops the others; its error is the command's, and the partial output goes with the atomic
directory.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass
from multiprocessing import connection
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from scalegrow.errors import InputError
from scalegrow.formats.base import Reader, Writer
from scalegrow.formats.io import written_bytes
from scalegrow.operators.base import Operator
from scalegrow.write import executor

GiB = 2**30
MIN_SHARE = 32 * 2**20  # by default no worker is forked for less output than this: the fork would cost more
File = tuple[int, int, int]  # (stage, EP rank, TP rank): a rank file, written in order by one worker
Piece = tuple[int, int]  # (stage, position): -1 the embeddings, j layer j, num_layers the head
Unit = File | Piece


@dataclass(frozen=True)
class Share:
    """What one worker writes: its units, and the stages it must stream to produce them."""

    units: frozenset[Unit]

    @property
    def stages(self) -> list[int]:
        return sorted({unit[0] for unit in self.units})

    @property
    def positions(self) -> frozenset[int] | None:
        """The pieces' positions to compute (None: rank files, whose stages are computed whole)."""
        if any(len(unit) == 3 for unit in self.units):
            return None
        return frozenset(position for _, position in self.units)


def divide(sizes: dict[Unit, int], workers: int) -> list[Share]:
    """Split the units into at most `workers` shares of about equal bytes, in order: rank files by
    whole stages while there are enough of them, else (and pieces always) unit by unit."""
    stages = sorted({u[0] for u in sizes})
    if len(stages) >= workers and all(len(u) == 3 for u in sizes):
        groups = [[u for u in sorted(sizes) if u[0] == s] for s in stages]
    else:
        groups = [[u] for u in sorted(sizes)]
    if not groups:
        return []
    weights = [sum(sizes[u] for u in group) for group in groups]
    cuts = _cuts(list(itertools.accumulate(weights)), min(workers, len(groups)))
    return [Share(frozenset(itertools.chain(*groups[a:b]))) for a, b in zip([0] + cuts, cuts + [len(groups)])]


def _cuts(cumulative: list[int], n: int) -> list[int]:
    """Where to cut a sequence of groups into `n` runs of about equal weight: each cut the one whose
    running total is nearest its share (k/n of the total), every run keeping at least one group."""
    cuts, total = [], cumulative[-1] if cumulative else 0
    for k in range(1, n):
        first, last = (cuts[-1] if cuts else 0) + 1, len(cumulative) - (n - k)
        cuts.append(min(range(first, last + 1), key=lambda c: abs(cumulative[c - 1] - total * k / n)))
    return cuts


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def per_worker_memory(largest_unit: int) -> int:
    """The memory bound one worker keeps: 1.5 x the largest unit it writes (a file, or a layer) + 0.5 GiB."""
    return int(1.5 * largest_unit + 0.5 * GiB)


def count(requested: int | None, sizes: dict[Unit, int], memory: int | None = None) -> tuple[int, str | None]:
    """(workers to run, a note when the count was lowered). `requested` None: as many as the usable
    cores, the units and the available memory allow, one per MIN_SHARE of output at most. A
    requested count that does not fit in memory is refused (InputError naming both figures)."""
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
    worth = max(1, sum(sizes.values()) // MIN_SHARE)
    n = min(usable_cores(), len(sizes), fits, worth)
    note = f"workers: {n} (memory for {fits})" if fits < min(usable_cores(), len(sizes), worth) else None
    return max(1, n), note


def run(source: Reader, op: Operator, make_writer: Callable[[], Writer], shares: list[Share], out: Path,
        bar: tqdm, poll: Callable[[], None] = lambda: None, rank: int = 0) -> None:
    """Write `op` applied to `source` into `out` with one forked process per share, moving `bar` by
    the bytes in `out`; `poll()` is called while waiting and may raise to stop them all (another
    rank failed). Worker k of `rank` names its files `{rank}_{k}`. Completing the checkpoint (the
    writer's `complete`) is the caller's, once every rank's workers are done."""
    ctx = mp.get_context("fork")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_work, args=(source, op, make_writer, share, f"{rank}_{k}", errors), daemon=True)
             for k, share in enumerate(shares)]
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
    bar.update(min(bar.total, written_bytes(out)) - bar.n)


def _work(source: Reader, op: Operator, make_writer, share: Share, name: str, errors) -> None:
    torch.set_num_threads(1)  # a forked child hangs in the parent's OpenMP pool: one thread, one core each
    try:
        writer = make_writer()
        writer.restrict(share.units, name)
        executor.run(source, op, writer, progress=False, stages=share.stages, positions=share.positions)
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
        connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)  # or sooner, as one ends
