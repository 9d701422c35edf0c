"""Bad input loses nothing: one line naming what is wrong, exit 2, no output, no `.partial`, and the
source byte-for-byte untouched."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from scalegrow.cli import main
from scalegrow.commands import convert, save_model
from scalegrow.formats.io import safe_load
from scalegrow.formats.options import OutputOptions

from helpers import family_config, random_model, tree_sha256, write_yaml

RANK = "iter_0000007/mp_rank_01_000/model_optim_rng.pt"


@pytest.fixture
def src(tmp_path):
    cfg = family_config("llama", num_layers=2)  # 4 heads in 2 groups
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "src", tp=2, pp=2, iteration=7)
    return tmp_path / "src"


@pytest.fixture
def target(tmp_path):
    return write_yaml(tmp_path / "target.yaml", hidden_size=128, num_attention_heads=8, num_query_groups=4,
                      ffn_hidden_size=192, num_layers=3)


def expect_refused(capsys, tmp_path, argv, *fragments):
    sources = {p: tree_sha256(p) for p in tmp_path.iterdir() if p.is_dir()}
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("scalegrow: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)
    assert not (tmp_path / "out").exists() or (tmp_path / "out") in sources
    assert not list(tmp_path.glob("*.partial-*"))
    assert {p: tree_sha256(p) for p in sources} == sources  # nothing anywhere was modified


def grow_argv(tmp_path, src, target, *extra):
    return ["grow", "--src", src, "--dst", tmp_path / "out", "--target", target, "--no-progress", *extra]


def test_missing_source(capsys, tmp_path, target):
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, tmp_path / "nope", target), "nope: no such checkpoint")
    (tmp_path / "afile").write_text("x")
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, tmp_path / "afile", target), "afile: no such checkpoint")
    (tmp_path / "empty").mkdir()
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, tmp_path / "empty", target),
                   "empty: not a Megatron checkpoint")


def test_truncated_file(capsys, tmp_path, src, target):
    data = (src / RANK).read_bytes()
    (src / RANK).write_bytes(data[: len(data) // 3])
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, target), src / RANK, "unreadable or truncated")


def test_missing_rank_directory(capsys, tmp_path, src, target):
    import shutil

    shutil.rmtree(src / "iter_0000007/mp_rank_01_001")
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, target),
                   "mp_rank_01_001: missing rank directory (args say TP=2, PP=2)")


def test_inconsistent_args_across_ranks(capsys, tmp_path, src, target):
    state = safe_load(src / RANK, mmap=False)
    state["args"].ffn_hidden_size = 128
    torch.save(state, src / RANK)
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, target),
                   f"{src / RANK}: args.ffn_hidden_size = 128 but", "has 96")


def test_shard_shape_mismatch_names_file_key_and_shapes(capsys, tmp_path, src, target):
    state = safe_load(src / RANK, mmap=False)
    state["model"]["decoder.layers.0.mlp.linear_fc2.weight"] = torch.zeros(64, 40)
    torch.save(state, src / RANK)
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, target), src / RANK,
                   "decoder.layers.0.mlp.linear_fc2.weight: shape (64, 40) does not match (64, 48)")


def test_target_smaller_than_source(capsys, tmp_path, src):
    smaller = write_yaml(tmp_path / "small.yaml", num_layers=1)
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, smaller),
                   "small.yaml: num_layers: target 1 is smaller than source 2")


def test_heads_or_groups_not_divisible_by_tp(capsys, tmp_path, src, target):
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, target, "--tp", "3"),
                   "--tp: num_attention_heads: 8 is not divisible by tensor parallel size 3")
    expect_refused(capsys, tmp_path, ["convert", "--src", src, "--dst", tmp_path / "out", "--tp", "4"],
                   "--tp: num_query_groups: 2 is not divisible by tensor parallel size 4")
    expect_refused(capsys, tmp_path, ["convert", "--src", src, "--dst", tmp_path / "out", "--pp", "3"],
                   "--pp: num_layers 2 cannot be split over 3 pipeline stages")


def test_malformed_yaml_and_unknown_method(capsys, tmp_path, src):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: {4\n")
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, bad), "bad.yaml: malformed YAML at line")
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, bad, "--method", "grow-fast"),
                   "unknown growth method 'grow-fast' (valid: bert2bert-aki, hypercloning, identity, lemon, ligo, llama-pro, more-experts, stack, upcycle)")


def test_existing_destination(capsys, tmp_path, src, target):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("precious")
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, target), "out: destination exists")
    assert (tmp_path / "out/keep.txt").read_text() == "precious"


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_object_is_refused_without_running_it(capsys, tmp_path, src, target):
    Payload.marker = tmp_path / "pwned"
    state = safe_load(src / RANK, mmap=False)
    state["args"].hook = Payload()
    torch.save(state, src / RANK)
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, src, target), src / RANK,
                   "refused to unpickle", "system: not in the allow-list")
    assert not Payload.marker.exists()


def test_torch_dist_metadata_pickle_is_refused(capsys, tmp_path, src, target):
    import pickle

    convert(src, tmp_path / "dist", OutputOptions(format="torch_dist"), progress=False)
    Payload.marker = tmp_path / "pwned"
    (tmp_path / "dist/iter_0000007/.metadata").write_bytes(pickle.dumps(Payload()))
    expect_refused(capsys, tmp_path, grow_argv(tmp_path, tmp_path / "dist", target),
                   ".metadata: refused to unpickle", "system")
    assert not Payload.marker.exists()


@pytest.mark.slow
def test_killed_run_leaves_no_half_checkpoint(tmp_path):
    """kill -9 in the middle of writing: `--dst` never appears, the source is unchanged."""
    cfg = family_config("gpt2", num_layers=8, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024)
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "src")
    before = tree_sha256(tmp_path / "src")
    target = write_yaml(tmp_path / "t.yaml", num_layers=16, hidden_size=512, num_attention_heads=8,
                        ffn_hidden_size=2048)
    proc = subprocess.Popen([sys.executable, "-m", "scalegrow.cli", "grow", "--src", str(tmp_path / "src"),
                             "--dst", str(tmp_path / "out"), "--target", str(target)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob("out.partial-*/release/mp_rank_00/*.pt")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not (tmp_path / "out").exists()
    assert tree_sha256(tmp_path / "src") == before
