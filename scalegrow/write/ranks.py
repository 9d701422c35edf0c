"""Several ranks (processes on one or many nodes) writing one checkpoint: the same command under
`torchrun` or `srun`.

    connect (torch.distributed's store) -> rank 0 makes DST.partial-* -> every rank writes its share
    of the output's files (with its own workers) -> every rank reports -> rank 0 renames into place

Ranks talk only through torch.distributed's key-value store (torchrun's, or one rank 0 serves under
srun); no tensor crosses the network, so the output directory must be on a filesystem every rank
sees. The files are divided as `--workers` divides them (`workers.divide`), and each tensor is
computed as in one process, so the output is bit-identical to a single-process run. The first rank
to fail records why; every other rank stops at its next look, rank 0 deletes the partial directory,
and every rank exits non-zero. A rank killed outright is the launcher's to notice (torchrun and
`srun --kill-on-bad-exit` stop the others; a stopped rank 0 still deletes the partial directory).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Mapping

from scalegrow.errors import InputError
from scalegrow.formats.io import atomic_output_dir
from scalegrow.write.workers import divide

CONNECT_TIMEOUT = timedelta(minutes=10)  # for every rank to reach the store
POLL = 0.2  # seconds between looks at the store


class Ranks:
    """This process's place among the ranks writing one checkpoint, and their shared store."""

    def __init__(self, rank: int, world: int, store):
        self.rank, self.world, self.store = rank, world, store
        self._stopped = False  # this rank has said it no longer writes

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    @classmethod
    def connect(cls, env: Mapping[str, str] = os.environ) -> "Ranks | None":
        """The ranks this process belongs to, from torchrun's or srun's environment (None: alone)."""
        place = detect(env)
        if place is None:
            return None
        import torch.distributed as dist

        rank, world, addr, port = place
        url = f"tcp://{addr}:{port}?rank={rank}&world_size={world}"  # under torchrun: its agent's store
        store, _, _ = next(dist.rendezvous(url, timeout=CONNECT_TIMEOUT))
        return cls(rank, world, dist.PrefixStore("scalegrow", store))

    def share(self, sizes: dict) -> dict:
        """The work units (and their bytes) this rank writes: its part of `workers.divide`."""
        shares = divide(sizes, self.world)
        mine = shares[self.rank].units if self.rank < len(shares) else frozenset()
        return {f: sizes[f] for f in mine}

    @contextlib.contextmanager
    def output_dir(self, dst: str | Path, overwrite: bool) -> Iterator[Path]:
        """Rank 0's atomic `DST.partial-*` directory, the same one on every rank. Rank 0 renames it
        into place once the body has run on every rank (`gather`), or deletes it on any failure."""
        try:
            if self.leader:
                try:
                    with atomic_output_dir(dst, overwrite) as out:
                        self.store.set("partial", str(out))
                        try:
                            yield out
                        except BaseException as exc:
                            self.fail(exc)  # before the directory goes: the others' errors are its echo
                            self._wait_stopped()  # then nobody writes into it any more
                            raise
                finally:
                    self.store.set("done", "1")  # renamed, or deleted
            else:
                out = Path(self._wait_for("partial").decode())
                if not out.is_dir():
                    raise InputError(f"{out}: rank 0's output directory is not visible from this rank "
                                     f"({os.uname().nodename}); --dst must be on a filesystem every node shares")
                yield out
                self._wait_for("done")  # rank 0 renamed it; or failed, and this raises its error
        except BaseException as exc:
            self.fail(exc)
            raise

    def fail(self, exc: BaseException) -> None:
        """Record this rank's failure, unless another rank's came first (that one is the cause). It
        has stopped writing (its workers are gone), which rank 0 waits for before it cleans up."""
        with contextlib.suppress(Exception):
            if self.store.add("failures", 1) == 1:
                kind = "input" if isinstance(exc, InputError) else "bug"
                why = str(exc) if isinstance(exc, Exception) and str(exc) else type(exc).__name__
                self.store.set("failed", f"{kind}:{self.rank}:{why}")
            if not self.leader and not self._stopped:
                self._stopped = True
                self.store.add("stopped", 1)

    def _wait_stopped(self, patience: float = 60) -> None:
        deadline = time.time() + patience
        with contextlib.suppress(Exception):
            while self.store.add("stopped", 0) < self.world - 1 and time.time() < deadline:
                time.sleep(POLL)

    def check(self) -> None:
        """Raise if any rank has failed: InputError when it was bad input (exit 2), else RuntimeError."""
        if not self.store.check(["failed"]):
            return
        kind, rank, message = self.store.get("failed").decode().split(":", 2)
        if int(rank) == self.rank:
            return  # our own failure is already on its way up
        error = InputError if kind == "input" else RuntimeError
        raise error(f"rank {rank} of {self.world} failed: {message}")

    def gather(self, tick: Callable[[], None] = lambda: None) -> None:
        """This rank's files are written. Rank 0 waits for every rank's (calling `tick` meanwhile,
        e.g. to move the progress bar); the others go on to wait for the rename in `output_dir`."""
        self.store.add("written", 1)
        while self.leader and self.store.add("written", 0) < self.world:
            self.check()
            tick()
            time.sleep(POLL)
        self.check()

    def _wait_for(self, key: str) -> bytes:
        while not self.store.check([key]):
            self.check()
            time.sleep(POLL)
        return self.store.get(key)

    def close(self, patience: float = 60) -> None:
        """Leave, whatever happened. Rank 0 waits (`patience` seconds at most) for the others to go
        first, since under srun it serves the store they may still be reading."""
        deadline = time.time() + patience
        with contextlib.suppress(Exception):
            if not self.leader:
                self.store.add("left", 1)
            while self.leader and self.store.add("left", 0) < self.world - 1 and time.time() < deadline:
                time.sleep(POLL)


def detect(env: Mapping[str, str]) -> tuple[int, int, str, int] | None:
    """(rank, world size, rendezvous host, port) when this process is one of several ranks: torchrun
    sets RANK and WORLD_SIZE; srun sets SLURM_PROCID and SLURM_STEP_NUM_TASKS (a batch script itself,
    outside any srun step, does not). MASTER_ADDR and MASTER_PORT win when set (launch/slurm/env.sh
    sets them); else the step's first node and a port derived from the job id, as env.sh derives it."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
    else:
        return None
    if world <= 1:
        return None
    addr = env.get("MASTER_ADDR") or _first_node(env)
    port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return rank, world, addr, port


def _first_node(env: Mapping[str, str]) -> str:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise InputError("running as one of several ranks, but neither MASTER_ADDR nor SLURM's node list is set")
    out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]
