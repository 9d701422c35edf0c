"""Two nodes on this one machine (tests/cluster.py: network namespaces joined by a veth pair, a
slurmd on each): a checkpoint written across them by `torchrun --nnodes 2` and by
launch/slurm/grow.sbatch is bit-identical to one process's; a rank that cannot see the output
directory fails both and leaves nothing; the training sbatch scripts run one rank per node."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import NODES, Cluster, on
from helpers import checkpoint_files, grow_argv, llama_source
from training import ENV, ROOT, free_port, scalars

TORCHRUN = Path(sys.executable).parent / "torchrun"
HEAD = next(iter(NODES))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("slurmctld") or not shutil.which("ip"):
        if os.environ.get("CI"):
            pytest.fail("CI must run the cluster tests: tools/test.sh installs SLURM, munge and iproute2 as root")
        pytest.skip("needs root, iproute2 and Debian's slurmctld/slurmd/munge (tools/test.sh installs them)")
    nodes = Cluster(tmp_path_factory.mktemp("cluster"), ENV).start()
    yield nodes
    nodes.stop()


@pytest.fixture
def src(tmp_path):
    return llama_source(tmp_path)


def torchrun_on_both(argv: list[str], before: dict[str, str] = {}) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 -m scalegrow.cli ARGV` on each node, rendezvous at the head node;
    `before[node]` is a shell command run there first."""
    port = free_port()
    procs = []
    for rank, node in enumerate(NODES):
        cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
               "--master-addr", HEAD, "--master-port", str(port), "-m", "scalegrow.cli", *argv]
        if node in before:
            cmd = ["sh", "-c", f'{before[node]} && exec "$@"', "sh", *cmd]
        procs.append(subprocess.Popen(on(node, cmd), env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


def cli(*argv: str) -> int:
    return subprocess.run([sys.executable, "-m", "scalegrow.cli", *argv], env=ENV).returncode


@pytest.mark.parametrize("fmt", ["torch", "torch_dist", "hf"])
def test_torchrun_on_two_nodes_writes_what_one_process_writes(cluster, src, tmp_path, fmt):
    """Legacy rank files, torch_dist's layers (each node its own .distcp files) and HF's layers (both
    nodes filling the same safetensors shards) across the two nodes."""
    extra = ["--pp", "3"] if fmt == "torch" else ["--format", fmt, "--max-shard-size", "300kB"]
    assert cli(*grow_argv(src, tmp_path / "one", *extra)) == 0
    head, other = torchrun_on_both(grow_argv(src, tmp_path / "two", *extra))
    assert (head.returncode, other.returncode) == (0, 0), head.stderr[-3000:] + other.stderr[-3000:]
    assert f"wrote its share of {tmp_path / 'two'} as rank 1 of 2" in other.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "src", "t.yaml", "two"]
    if fmt == "torch_dist":  # the same tensors in other data files: compared as legacy files
        assert {p.name[:3] for p in (tmp_path / "two/release").glob("*.distcp")} == {"__0", "__1"}
        for name in ("one", "two"):
            assert cli("convert", "--src", str(tmp_path / name), "--dst", str(tmp_path / f"{name}-legacy"),
                       "--no-progress") == 0
            shutil.rmtree(tmp_path / name)
            (tmp_path / f"{name}-legacy").rename(tmp_path / name)
    assert checkpoint_files(tmp_path / "two") == checkpoint_files(tmp_path / "one")


def test_a_node_without_the_shared_directory_fails_both_and_leaves_nothing(cluster, src, tmp_path):
    """--dst on a node-local disk: the second node mounts its own empty directory there."""
    local = tmp_path / "local"
    local.mkdir()
    head, other = torchrun_on_both(grow_argv(src, local / "out", "--pp", "3"),
                                   before={list(NODES)[1]: f"mount -t tmpfs none {local}"})
    assert (head.returncode, other.returncode) != (0, 0)
    why = "rank 0's output directory is not visible from this rank (sgnode2); --dst must be on a filesystem"
    assert why in other.stderr
    assert "rank 1 of 2 failed: " in head.stderr and why in head.stderr
    assert list(local.iterdir()) == []  # no output, no partial directory


def sbatch(cluster: Cluster, tmp_path: Path, script: str, *args: str, tasks_per_node: int = 1) -> str:
    """Submit `script` on both nodes, wait for it, and return its log (asserting it succeeded)."""
    log = tmp_path / "job.out"
    job = cluster.run(["sbatch", "--wait", "--nodes", "2", f"--ntasks-per-node={tasks_per_node}",
                       "--gpus-per-node=0", "--cpus-per-task=1", "--chdir", str(ROOT), f"--output={log}",
                       f"--export=ALL,PYTHON={sys.executable}", script, *args], check=False, timeout=900)
    text = log.read_text() if log.is_file() else ""
    assert job.returncode == 0, job.stderr + text[-4000:]
    return text


def test_grow_sbatch_on_two_nodes_writes_what_one_process_writes(cluster, src, tmp_path):
    argv = grow_argv(src, tmp_path / "one", "--tp", "2", "--pp", "3")
    assert subprocess.run([sys.executable, "-m", "scalegrow.cli", *argv], env=ENV).returncode == 0
    log = sbatch(cluster, tmp_path, "launch/slurm/grow.sbatch", *grow_argv(src, tmp_path / "two", "--tp", "2",
                                                                            "--pp", "3"))
    assert f"scalegrow: 2 ranks on 2 node(s), rendezvous {HEAD}:" in log
    assert f"wrote its share of {tmp_path / 'two'} as rank 1 of 2" in log
    assert checkpoint_files(tmp_path / "two") == checkpoint_files(tmp_path / "one")


def test_training_sbatch_scripts_on_two_nodes(cluster, tmp_path):
    """pretrain.sbatch, then grow_pretrain.sbatch (LEMON) from its export: DeepSpeed's ranks find each
    other from SLURM's node list, one per node."""
    steps = ["train.steps=4", "train.eval_interval=2", "train.save_interval=2"]
    log = sbatch(cluster, tmp_path, "launch/slurm/pretrain.sbatch", "configs/runs/tiny_scratch.yaml",
                 f"output.dir={tmp_path / 'small'}", *steps)
    assert f"scalegrow: 2 ranks on 2 node(s), rendezvous {HEAD}:" in log
    small = scalars(tmp_path / "small/tensorboard")["val/loss"]
    assert sorted(small) == [0, 2, 4] and small[4] < small[0]
    data = [f"data.corpus={tmp_path}/small/data/corpus", f"data.tokenizer={tmp_path}/small/data/tokenizer.model"]
    sbatch(cluster, tmp_path, "launch/slurm/grow_pretrain.sbatch", "configs/runs/tiny_lemon.yaml",
           f"output.dir={tmp_path / 'grown'}", f"init.from={tmp_path / 'small/export'}", *steps, *data)
    grown = scalars(tmp_path / "grown/tensorboard")["val/loss"]
    assert grown[0] == pytest.approx(small[4], abs=1e-4)  # LEMON: the grown model starts where the small one ended
    assert (tmp_path / "grown/export/tokenizer.model").is_file()
