"""The entry point of `launch/pretrain.py` and `launch/grow_pretrain.py`: parse the run config, set up
the distributed job (DeepSpeed; gloo on CPU), run."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator

from scalegrow.errors import InputError
from scalegrow.train import loop, starts
from scalegrow.train.config import RunConfig, load_run_config
from scalegrow.train.engine import Dist
from scalegrow.train.guard import Diverged

EXIT_DIVERGED = 3  # the loss diverged (train/guard.py); 2 is bad input


def parse_args(argv: list[str] | None = None, description: str = "") -> tuple[RunConfig, argparse.Namespace]:
    """`--config FILE` plus trailing `dotted.key=value` overrides; accepts the launcher's --local_rank."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="run YAML (configs/runs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="this process's GPU on its node (default: $LOCAL_RANK, else 0)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=100")
    args = parser.parse_args(argv)
    return load_run_config(args.config, args.overrides), args


def extensions_dir() -> Path | None:
    """Where DeepSpeed keeps the ops it compiles (on CPU: its shared-memory all-reduce): inside the
    virtual environment, which `tools/venv.sh` builds them into at install time, so neither the first
    run nor a second environment compiles them again. None outside a virtual environment."""
    return Path(sys.prefix) / "torch_extensions" if sys.prefix != sys.base_prefix else None


def quiet_known_warnings() -> None:
    """DeepSpeed 0.19.8's ZeRO all-gathers through `torch.distributed.all_gather_into_tensor`, which
    torch 2.13 deprecates (same result, another name): a FutureWarning every run, about their code."""
    warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def quiet_deepspeed_notices() -> None:
    """What DeepSpeed says on every CPU run that is no news, dropped before it is imported: its
    accelerator auto-detection's "Setting accelerator to CPU" (scalegrow trains on CPU by design when
    there is no GPU), and the "deepspeed_shm_comm_op built successfully" it prints whenever it loads
    the op that tools/venv.sh built (`init_distributed` runs under `without_build_notice`)."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


@contextlib.contextmanager
def without_build_notice() -> Iterator[None]:
    """Whatever the body prints on stdout, but DeepSpeed's op-loaded notices."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        sys.stdout.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                                 if not re.fullmatch(r"DeepSpeed \S+ built successfully\s*", line)))


def main(kind: str, argv: list[str] | None = None) -> int:
    """Entry for launch/*.py: set up distributed (DeepSpeed), then run."""
    quiet_deepspeed_notices()
    import deepspeed
    import torch
    import torch.distributed as torch_dist
    from deepspeed.accelerator import get_accelerator

    try:
        cfg, args = parse_args(argv, description=f"scalegrow {kind}")
    except InputError as exc:
        print(f"scalegrow: error: {exc}", file=sys.stderr)
        return 2
    if extensions_dir() is not None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
        # the venv's ninja, which tools/venv.sh built the op with: another version (a system one first
        # on PATH) hashes the same command line differently and would compile the op again
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    quiet_known_warnings()
    cpu = get_accelerator().device_name() == "cpu"
    with without_build_notice():
        deepspeed.init_distributed(dist_backend="gloo" if cpu else None)
    if cpu:  # one core's worth of threads per rank, no oversubscription
        release_shared_memory(torch_dist.get_rank())
        local = int(os.environ.get("LOCAL_WORLD_SIZE", torch_dist.get_world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    else:
        get_accelerator().set_device(args.local_rank)
    dist = Dist(torch_dist.get_rank(), torch_dist.get_world_size(), args.local_rank)
    start_fn = starts.grown if kind == "grow_pretrain" else starts.scratch_or_continue
    try:
        loop.run(cfg, dist, start_fn, kind)
    except InputError as exc:
        print(f"scalegrow: error: {exc}", file=sys.stderr)
        return 2
    except Diverged as exc:  # every rank saw the same mean loss: all stop at the same step
        if dist.is_main:
            print(f"{kind}: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        torch_dist.destroy_process_group()
    return 0


def release_shared_memory(rank: int, root: Path = Path("/dev/shm")) -> None:
    """DeepSpeed's CPU all-reduce (shm.cpp) gives every rank a 66 MB buffer in /dev/shm named after
    the uid, MASTER_ADDR, MASTER_PORT and rank, and never unlinks it: each run would leave its ranks'
    buffers in memory until the node reboots. Every rank maps every other's by name while the process
    group starts; after a barrier (all of them mapped) each unlinks its own name, and the memory goes
    when the last rank exits, however it exits (a kill too)."""
    import torch.distributed as torch_dist

    torch_dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank}")
    (root / name).unlink(missing_ok=True)
