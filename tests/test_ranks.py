"""Several ranks writing one checkpoint, as under torchrun or srun: here local processes with
torchrun's environment (tests/test_cluster.py runs them on two nodes). The output is bit-identical
to one process; a failure on any rank, at any point, fails every rank and leaves nothing."""
import os
import signal
import subprocess
import sys
import time

import pytest

from scalegrow.write import ranks

from helpers import checkpoint_files, grow_argv, llama_source
from training import free_port

RUN_CLI = "import sys\n{prelude}\nfrom scalegrow import cli\nsys.exit(cli.main(sys.argv[1:]))"


@pytest.fixture
def src(tmp_path):
    return llama_source(tmp_path)


def run_ranks(argvs: list[list[str]], prelude: str = "") -> list[tuple[int, str, str]]:
    """Each argv as one rank (torchrun's variables, a store on a free local port): (exit code, stdout,
    stderr) per rank. `prelude` runs first in every rank (to inject a failure)."""
    port, world = free_port(), len(argvs)
    procs = [subprocess.Popen([sys.executable, "-c", RUN_CLI.format(prelude=prelude), *argv],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, argv in enumerate(argvs)]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outputs)]


@pytest.mark.parametrize("world, layout", [(2, ["--tp", "2", "--pp", "3"]), (3, ["--tp", "2", "--pp", "1"])],
                         ids=["2-ranks-by-stage", "3-ranks-2-files"])
def test_ranks_write_what_one_process_writes(src, tmp_path, world, layout):
    one = subprocess.run([sys.executable, "-m", "scalegrow.cli", *grow_argv(src, tmp_path / "one", *layout)])
    assert one.returncode == 0
    results = run_ranks([grow_argv(src, tmp_path / "ranks", *layout)] * world)
    assert [code for code, _, _ in results] == [0] * world, results
    assert checkpoint_files(tmp_path / "ranks") == checkpoint_files(tmp_path / "one")
    assert (tmp_path / "ranks/scalegrow.json").is_file()
    assert "wrote " + str(tmp_path / "ranks") in results[0][1]
    for r in range(1, world):
        assert f"wrote its share of {tmp_path / 'ranks'} as rank {r} of {world}" in results[r][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "ranks", "src", "t.yaml"]


FAIL_AT_LAYER = """\
from scalegrow.errors import InputError
from scalegrow.operators.lemon import LemonGrowth
original = LemonGrowth.map_layer
def map_layer(self, index, sources):
    if index == {layer}:
        raise InputError("layer {layer}: something the user can fix")
    return original(self, index, sources)
LemonGrowth.map_layer = map_layer
"""


@pytest.mark.parametrize("layer", [0, 5], ids=["rank-0-fails", "rank-1-fails"])
def test_a_failing_rank_fails_every_rank_and_leaves_nothing(src, tmp_path, layer):
    argv = grow_argv(src, tmp_path / "out", "--pp", "3", "--workers", "1")
    results = run_ranks([argv, argv], prelude=FAIL_AT_LAYER.format(layer=layer))
    failing = 0 if layer == 0 else 1  # stage 0 (layer 0) is rank 0's, stage 2 (layer 5) rank 1's
    assert [code for code, _, _ in results] == [2, 2], results
    assert f"scalegrow: error: layer {layer}: something the user can fix" in results[failing][2]
    assert f"rank {failing} of 2 failed: layer {layer}: something the user can fix" in results[1 - failing][2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t.yaml"]  # no output, no partial directory


def test_a_rank_that_cannot_read_the_source_stops_the_others(src, tmp_path):
    """As when the source is mounted on one node only: rank 1 fails before it writes anything."""
    results = run_ranks([grow_argv(src, tmp_path / "out"), grow_argv(tmp_path / "absent", tmp_path / "out")])
    assert [code for code, _, _ in results] == [2, 2], results
    assert str(tmp_path / "absent") in results[1][2]
    assert f"rank 1 of 2 failed: {tmp_path / 'absent'}" in results[0][2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t.yaml"]


def test_what_ranks_cannot_share_is_refused(src, tmp_path):
    ligo = grow_argv(src, tmp_path / "out", "--method", "ligo", "--steps", "2")
    results = run_ranks([ligo, ligo])
    assert [code for code, _, _ in results] == [2, 2]
    assert "--method ligo prepares its operator on data, which is not shared between ranks (rank 0 of 2)" \
        in results[0][2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t.yaml"]


def test_ranks_divide_the_layers_of_hf_and_torch_dist_outputs(src, tmp_path):
    """Two ranks of two workers each: HF's shards byte for byte as one process writes them; torch_dist
    with four data files (one per rank and worker), converting to one process's legacy files."""
    for fmt in ("hf", "torch_dist"):
        one = grow_argv(src, tmp_path / f"{fmt}-one", "--format", fmt, "--max-shard-size", "300kB", "--workers", "1")
        assert subprocess.run([sys.executable, "-m", "scalegrow.cli", *one]).returncode == 0
        argv = grow_argv(src, tmp_path / fmt, "--format", fmt, "--max-shard-size", "300kB", "--workers", "2")
        assert [code for code, _, _ in run_ranks([argv, argv])] == [0, 0]
    assert checkpoint_files(tmp_path / "hf") == checkpoint_files(tmp_path / "hf-one")
    assert sorted(p.name for p in (tmp_path / "torch_dist/release").glob("*.distcp")) == \
        ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp"]
    for name in ("torch_dist", "torch_dist-one"):
        assert subprocess.run([sys.executable, "-m", "scalegrow.cli", "convert", "--src", str(tmp_path / name),
                               "--dst", str(tmp_path / f"{name}-legacy"), "--no-progress"]).returncode == 0
    assert checkpoint_files(tmp_path / "torch_dist-legacy") == checkpoint_files(tmp_path / "torch_dist-one-legacy")


def test_ranks_are_found_in_torchrun_and_srun_environments():
    assert ranks.detect({}) is None
    assert ranks.detect({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one rank: alone
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert ranks.detect(torchrun) == (1, 4, "node1", 29500)
    srun = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "3", "SLURM_JOB_ID": "20007", "MASTER_ADDR": "node1"}
    assert ranks.detect(srun) == (2, 3, "node1", 20007)  # env.sh's port rule: 20000 + job id % 20000
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}  # sbatch, outside srun
    assert ranks.detect(batch_script) is None


SLOW_LAYER = """\
import time
from scalegrow.operators.lemon import LemonGrowth
original = LemonGrowth.map_layer
LemonGrowth.map_layer = lambda self, index, sources: (time.sleep(60) if index == 3 else None) or original(
    self, index, sources)
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_as_launchers_send_it_leaves_nothing(src, tmp_path, workers):
    """torchrun and srun stop the other ranks with SIGTERM: it unwinds like an error."""
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI.format(prelude=SLOW_LAYER),
                             *grow_argv(src, tmp_path / "out", "--workers", workers, "--pp", "2")],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("out.partial-*/release/*/*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t.yaml"]
