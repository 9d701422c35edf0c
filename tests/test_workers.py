"""`--workers N`: several forked processes write one checkpoint, bit-identical to one process (legacy
and HF files; torch_dist's tensors); a worker's failure fails the command with its error and leaves
nothing; memory bounds the count."""
import json
import os

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.errors import InputError
from scalegrow.formats.registry import open_checkpoint
from scalegrow.operators.lemon import LemonGrowth
from scalegrow.write import workers

from helpers import checkpoint_files, family_config, grow_argv, llama_source, random_model

GiB = 2**30


def test_files_are_divided_by_stage_or_by_file():
    sizes = {(s, 0, t): 10 * (s + 1) for s in range(4) for t in range(2)}  # 4 stages x TP2, growing stages
    shares = workers.divide(sizes, 2)  # enough stages: whole stages, about half the bytes each
    assert [share.stages for share in shares] == [[0, 1, 2], [3]]
    assert shares[0].units == {(s, 0, t) for s in range(3) for t in range(2)}
    shares = workers.divide({(0, 0, t): 5 for t in range(4)}, 3)  # one stage: its files
    assert [sorted(share.units) for share in shares] == [[(0, 0, 0)], [(0, 0, 1), (0, 0, 2)], [(0, 0, 3)]]
    assert all(share.stages == [0] for share in shares)


def test_pieces_of_one_stage_are_divided_by_bytes():
    sizes = {(0, -1): 30, **{(0, j): 10 for j in range(6)}, (0, 6): 30}  # embeddings, 6 layers, head
    shares = workers.divide(sizes, 3)
    assert [sorted(share.positions) for share in shares] == [[-1, 0], [1, 2, 3, 4], [5, 6]]  # 40 bytes each
    assert all(share.stages == [0] for share in shares)
    assert workers.divide({(0, 0, 0): 1}, 2)[0].positions is None  # rank files: whole stages


def test_worker_count_follows_memory(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: 8)
    assert workers.count(None, {(0, j): 2**20 for j in range(40)}, memory=64 * GiB) == (1, None)  # 40 MiB: not worth 2
    sizes = {(0, 0, t): GiB for t in range(8)}  # each worker: 1.5 GiB + 0.5 GiB
    assert workers.count(None, sizes, memory=5 * GiB) == (2, "workers: 2 (memory for 2)")
    assert workers.count(None, sizes, memory=64 * GiB) == (8, None)
    assert workers.count(2, sizes, memory=5 * GiB) == (2, None)
    assert workers.count(16, {(0, 0, 0): 1}, memory=64 * GiB) == (1, None)  # never more than the files
    with pytest.raises(InputError, match=r"--workers: 3 workers need 6.0 GiB \(2.00 GiB each\) but 5.0 GiB"):
        workers.count(3, sizes, memory=5 * GiB)


@pytest.fixture
def src(tmp_path):
    return llama_source(tmp_path)


def grow(src, dst, *extra) -> int:
    return cli.main(grow_argv(src, dst, *extra))


@pytest.mark.parametrize("layout", [["--tp", "2", "--pp", "3"], ["--tp", "4", "--pp", "1"]], ids=["by-stage", "by-file"])
def test_workers_write_what_one_process_writes(src, tmp_path, layout):
    assert grow(src, tmp_path / "one", "--workers", "1", *layout) == 0
    for n in (2, 3):
        assert grow(src, tmp_path / f"n{n}", "--workers", str(n), *layout) == 0
        assert checkpoint_files(tmp_path / f"n{n}") == checkpoint_files(tmp_path / "one"), n
    assert (tmp_path / "n2" / "latest_checkpointed_iteration.txt").is_file()


def test_expert_parallel_files_with_workers(tmp_path):
    cfg = family_config("llama", num_layers=2, num_moe_experts=4)
    commands.save_model(random_model(cfg, seed=2).state_dict(), cfg, tmp_path / "moe")
    for n in ("1", "2"):
        assert cli.main(["convert", "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / n), "--ep", "2",
                         "--tp", "2", "--workers", n, "--no-progress"]) == 0
    assert checkpoint_files(tmp_path / "2") == checkpoint_files(tmp_path / "1")


@pytest.mark.parametrize("failure, code, words", [
    (InputError("layer 4: something the user can fix"), 2, "layer 4: something the user can fix"),
    (RuntimeError("a bug"), 3, "RuntimeError: a bug"),
    (None, 3, "died with exit code 9"),
])
def test_a_failing_worker_fails_the_command_and_leaves_nothing(src, tmp_path, capsys, monkeypatch, failure, code, words):
    original = LemonGrowth.map_layer

    def map_layer(self, index, sources):  # only the worker that streams layer 4 fails
        if index == 4:
            if failure is None:
                os._exit(9)  # as if the kernel killed it
            raise failure
        return original(self, index, sources)

    monkeypatch.setattr(LemonGrowth, "map_layer", map_layer)
    assert grow(src, tmp_path / "out", "--workers", "2", "--pp", "3") == code
    assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t.yaml"]  # no output, no partial directory


@pytest.mark.parametrize("shard", ["5GB", "300kB"], ids=["one-shard", "many-shards"])
def test_hf_workers_write_the_bytes_one_process_writes(src, tmp_path, shard):
    """HF output is one stage: its layers are divided, each written into its planned place."""
    for n in ("1", "2", "3"):
        assert grow(src, tmp_path / n, "--format", "hf", "--max-shard-size", shard, "--workers", n) == 0
        assert checkpoint_files(tmp_path / n) == checkpoint_files(tmp_path / "1"), n
    shards = sorted(p.name for p in (tmp_path / "3").glob("*.safetensors"))
    assert len(shards) == (1 if shard == "5GB" else 11) and not list((tmp_path / "3").glob(".receipt-*"))


def test_hf_stacked_experts_are_written_slice_by_slice_by_several_workers(tmp_path):
    cfg = family_config("qwen3", num_layers=3, num_moe_experts=4, moe_router_topk=2)
    commands.save_model(random_model(cfg, seed=2).state_dict(), cfg, tmp_path / "moe")
    for n in ("1", "2"):
        assert cli.main(["convert", "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / n), "--format", "hf",
                         "--hf-expert-layout", "fused", "--max-shard-size", "100kB", "--workers", n,
                         "--no-progress"]) == 0
    assert checkpoint_files(tmp_path / "2") == checkpoint_files(tmp_path / "1")
    assert "model.layers.2.mlp.experts.gate_up_proj" in json.loads((tmp_path / "2/model.safetensors.index.json")
                                                                    .read_text())["weight_map"]


def test_torch_dist_workers_hold_what_one_process_writes(src, tmp_path):
    """Each worker appends its layers to its own .distcp file; the index covers them all, and the
    tensors are the same: both convert to byte-identical legacy checkpoints."""
    for n in ("1", "2", "3"):
        assert grow(src, tmp_path / n, "--format", "torch_dist", "--workers", n) == 0
        assert cli.main(["convert", "--src", str(tmp_path / n), "--dst", str(tmp_path / f"legacy{n}"),
                         "--workers", "1", "--no-progress"]) == 0
        assert checkpoint_files(tmp_path / f"legacy{n}") == checkpoint_files(tmp_path / "legacy1"), n
    files = sorted(p.name for p in (tmp_path / "3/release").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__0_1.distcp", "__0_2.distcp", "common.pt", "metadata.json"]


def test_torch_dist_workers_split_mixed_moe_layers_and_their_experts(tmp_path):
    cfg = family_config("llama", num_layers=4, num_moe_experts=4, moe_router_topk=2, moe_layer_freq=2)
    commands.save_model(random_model(cfg, seed=3).state_dict(), cfg, tmp_path / "moe")
    for n in ("1", "3"):
        assert cli.main(["convert", "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / n), "--format",
                         "torch_dist", "--workers", n, "--no-progress"]) == 0
    one, three = (open_checkpoint(tmp_path / n).state_dict() for n in ("1", "3"))
    assert one.keys() == three.keys() and all(torch.equal(one[k], three[k]) for k in one)
    assert len(list((tmp_path / "3").glob("*/*.distcp"))) == 3


def test_a_piece_no_worker_wrote_fails_the_check_and_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(workers.Share, "positions", property(lambda self: frozenset(p for _, p in self.units) - {3}))
    assert grow(src, tmp_path / "out", "--format", "hf", "--workers", "2") == 3
    assert "tensors written other than once each: [('model.layers.3." in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t.yaml"]
