"""Helpers for the training tests: the real `deepspeed` launcher on CPU ranks, TensorBoard readers,
and a real single-node SLURM (slurmctld + slurmd + munge from Debian), started as root."""
from __future__ import annotations

import os
import shutil
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


def launch_cmd(kind: str, config: str, overrides: list[str], ranks: int = 2) -> list[str]:
    """The README's command: the launcher at --log_level error (its INFO lines are noise)."""
    return [str(DEEPSPEED), "--log_level", "error", "--num_gpus", str(ranks), "--master_port", str(free_port()),
            str(ROOT / "launch" / f"{kind}.py"), "--config", str(ROOT / config), *overrides]


def train(kind: str, config: str, overrides: list[str], ranks: int = 2, check: bool = True):
    result = subprocess.run(launch_cmd(kind, config, overrides, ranks), cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{kind} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def start_and_kill_after(kind: str, config: str, overrides: list[str], ckpt_dir: Path, tag: str) -> int:
    """Start a run, SIGKILL its whole process group once `tag` is the latest checkpoint."""
    proc = subprocess.Popen(launch_cmd(kind, config, overrides), cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    latest = ckpt_dir / "latest"
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == tag:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


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


class Slurm:
    """slurmctld + slurmd for this machine (one node, all its CPUs) on loopback ports, with munged."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**ENV, "SLURM_CONF": str(self.conf)}

    def start(self) -> "Slurm":
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        self.conf.write_text(SLURM_CONF.format(root=self.root, host=host, cpus=os.cpu_count()))
        self._start_munge()
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon], env=self.env, check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if out.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up: {(self.root / 'log/slurmctld.log').read_text()[-2000:]}")

    @staticmethod
    def _start_munge() -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # already running
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        for d in ("/var/log/munge", "/var/lib/munge", "/etc/munge"):
            if Path(d).exists():
                shutil.chown(d, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)

    def stop(self) -> None:
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = self.root / pid_file
            if path.is_file():
                try:
                    os.kill(int(path.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


SLURM_CONF = """\
ClusterName=scalegrow-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=26817
SlurmdPort=26818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
