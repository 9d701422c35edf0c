"""A real two-node cluster on this one machine, for the multi-node tests (run as root).

Each node is a network namespace with its own hostname (a UTS namespace per process started on it)
and its own /etc/hosts (bind-mounted from /etc/netns/NODE/hosts); a veth pair joins the two,
so nothing leaves the machine. SLURM sees two nodes: slurmctld and one slurmd on sgnode1, another
slurmd on sgnode2 (Debian's daemons; munged's socket is a file, so both use the one munged).
Files are shared, as on a cluster's shared filesystem.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

NODES = {"sgnode1": "10.213.0.1", "sgnode2": "10.213.0.2"}  # hostname = network namespace: address
SUBNET = 24


def on(node: str, cmd: list[str]) -> list[str]:
    """`cmd` as run on `node`: in its network namespace, with its hostname and its /etc/hosts (in a
    mount namespace of its own; `ip netns exec` would also hide the cgroup mounts slurmd needs)."""
    setup = 'hostname "$0" && mount --bind "/etc/netns/$0/hosts" /etc/hosts && exec "$@"'
    return ["nsenter", f"--net=/run/netns/{node}", "unshare", "--uts", "--mount", "sh", "-c", setup, node, *cmd]


class Cluster:
    """Two namespace nodes joined by a veth pair, with slurmctld on the first and a slurmd on each."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**env, "SLURM_CONF": str(self.conf)}
        self.head = next(iter(NODES))

    def start(self) -> "Cluster":
        self.stop()  # what an earlier, interrupted run left
        self._network()
        for d in ("state", "log", *(f"spool/{node}" for node in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        nodes = "".join(f"NodeName={node} NodeAddr={addr} CPUs=2 State=UNKNOWN\n" for node, addr in NODES.items())
        self.conf.write_text(SLURM_CONF.format(root=self.root, head=self.head, head_addr=NODES[self.head], nodes=nodes))
        start_munge()
        subprocess.run(on(self.head, ["slurmctld"]), env=self.env, check=True)
        for node in NODES:
            subprocess.run(on(node, ["slurmd", "-N", node]), env=self.env, check=True)
        return self._wait_idle()

    def _network(self) -> None:
        (first, a), (second, b) = NODES.items()
        for node in NODES:
            subprocess.run(["ip", "netns", "add", node], check=True)
            hosts = Path("/etc/netns") / node / "hosts"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in NODES.items()))
        run = lambda *args: subprocess.run(["ip", *args], check=True)  # noqa: E731
        run("link", "add", "sgveth1", "netns", first, "type", "veth", "peer", "name", "sgveth2", "netns", second)
        for node, addr, dev in ((first, a, "sgveth1"), (second, b, "sgveth2")):
            run("-n", node, "addr", "add", f"{addr}/{SUBNET}", "dev", dev)
            run("-n", node, "link", "set", dev, "up")
            run("-n", node, "link", "set", "lo", "up")

    def _wait_idle(self) -> "Cluster":
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            if out == [word for node in NODES for word in (node, "idle")]:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up: {(self.root / 'log/slurmctld.log').read_text()[-2000:]}")

    def run(self, cmd: list[str], node: str | None = None, check: bool = True, **kwargs):
        """`cmd` on `node` (default: the head node, where SLURM's client commands reach slurmctld)."""
        return subprocess.run(on(node or self.head, cmd), env=kwargs.pop("env", self.env), capture_output=True,
                              text=True, check=check, **kwargs)

    def stop(self) -> None:
        for node in NODES:
            pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True)
            if pids.returncode == 0:  # the namespace exists
                if pids.stdout.split():
                    subprocess.run(["kill", "-9", *pids.stdout.split()], capture_output=True)
                subprocess.run(["ip", "netns", "del", node], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / node, ignore_errors=True)


def start_munge() -> None:
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


SLURM_CONF = """\
ClusterName=scalegrow-test
SlurmctldHost={head}({head_addr})
SlurmctldPort=26817
SlurmdPort=26818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
