"""Helpers for the training tests: the real `deepspeed` launcher on CPU ranks, TensorBoard readers,
a free port (tests/cluster.py has the two-node SLURM cluster)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(kind: str, config: str, overrides: list[str], ranks: int = 2, port: int | None = None) -> list[str]:
    """The README's command: the launcher at --log_level error (its INFO lines are noise)."""
    return [str(DEEPSPEED), "--log_level", "error", "--num_gpus", str(ranks), "--master_port", str(port or free_port()),
            str(ROOT / "launch" / f"{kind}.py"), "--config", str(ROOT / config), *overrides]


def train(kind: str, config: str, overrides: list[str], ranks: int = 2, check: bool = True):
    for attempt in range(3):  # a port found free can be taken before the rendezvous binds it (another
        port = free_port()    # worker's gloo connections draw from the same range): then try another
        result = subprocess.run(launch_cmd(kind, config, overrides, ranks, port), cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=900)
        if "EADDRINUSE" not in result.stderr:
            break
    if check and result.returncode != 0:
        raise AssertionError(f"{kind} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    assert_no_shared_memory_left(kind, port)
    return result


def assert_no_shared_memory_left(kind: str, port: int) -> None:
    """However a run ended (well, with an error, killed), none of its ranks' DeepSpeed shared-memory
    buffers stays behind in /dev/shm."""
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"{kind} left shared memory behind: {left}"


def start_and_kill_after(kind: str, config: str, overrides: list[str], ckpt_dir: Path, tag: str) -> int:
    """Start a run, SIGKILL its whole process group once `tag` is the latest checkpoint."""
    port = free_port()
    proc = subprocess.Popen(launch_cmd(kind, config, overrides, port=port), cwd=ROOT, env=ENV,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    latest = ckpt_dir / "latest"
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == tag:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    code = proc.wait()
    assert_no_shared_memory_left(kind, port)
    return code


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file (later files win, as after a resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out
