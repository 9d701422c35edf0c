"""`scalegrow grow/verify/inspect/init`: results, exit codes, one-line errors, nothing lost."""
import json
import subprocess
import sys

import pytest

from scalegrow.cli import main
from scalegrow.commands import save_model
from scalegrow.core.counts import num_parameters

from helpers import METADATA_KEYS, family_config, random_model, tree_sha256, write_yaml

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def small(tmp_path):
    """A tiny LLaMA-style source checkpoint and a growth target YAML."""
    cfg = family_config("llama", num_layers=2)
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "small", iteration=50)
    target = write_yaml(tmp_path / "target.yaml", hidden_size=96, num_attention_heads=6, num_query_groups=3,
                        ffn_hidden_size=150, num_layers=3)
    return tmp_path / "small", target


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_grow_verify_inspect(small, tmp_path, capsys):
    src, target = small
    before = tree_sha256(src)
    code, out, _ = run(capsys, "grow", "--src", src, "--dst", tmp_path / "big", "--target", target, "--no-progress")
    src_params = num_parameters(family_config("llama", num_layers=2))
    assert code == 0 and f"({src_params / 1e6:.2f}M -> " in out and str(tmp_path / "big") in out
    assert tree_sha256(src) == before  # the source is never written
    code, out, _ = run(capsys, "verify", "--src", src, "--dst", tmp_path / "big", "--device", "cpu")
    result = json.loads(out)
    assert code == 0 and result["max_abs_diff"] <= 1e-4
    assert abs(result["loss_src"] - result["loss_dst"]) <= 1e-4
    code, out, _ = run(capsys, "inspect", tmp_path / "big", "--json")
    info = json.loads(out)
    assert (info["iteration"], info["tensor_model_parallel_size"], info["layers_per_stage"]) == (50, 1, [3])
    assert info["model"]["hidden_size"] == 96 and info["model"]["norm_epsilon"] == pytest.approx(1e-5 * 2 / 3 * 1.0)
    meta = json.loads((tmp_path / "big/scalegrow.json").read_text())
    assert set(meta) == METADATA_KEYS and meta["training"] is None and meta["details"] == {"seed": 0}
    assert meta["method"] == "lemon" and meta["source"]["path"] == str(src.resolve())
    assert len(meta["source"]["manifest_sha256"]) == 64 and meta["scalegrow_version"]
    code, out, _ = run(capsys, "inspect", tmp_path / "big")
    assert code == 0 and "TP=1 PP=1" in out and "mp_rank_00" in out


def test_verify_fails_on_a_different_model(small, tmp_path, capsys):
    src, _ = small
    cfg = family_config("llama", num_layers=2)
    save_model(random_model(cfg, seed=7).state_dict(), cfg, tmp_path / "other")
    code, out, _ = run(capsys, "verify", "--src", src, "--dst", tmp_path / "other")
    assert code == 1 and json.loads(out)["max_abs_diff"] > 1e-2


def assert_bad_input(capsys, tmp_path, argv, message, dst_name="out"):
    before = {p: tree_sha256(p) for p in tmp_path.iterdir() if p.is_dir()}
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("scalegrow: error: ") and message in err, err
    assert not (tmp_path / dst_name).exists() or (tmp_path / dst_name) in before
    assert not list(tmp_path.glob("*.partial-*"))
    assert {p: tree_sha256(p) for p in before} == before


def test_bad_inputs_exit_2_and_lose_nothing(small, tmp_path, capsys):
    src, target = small
    grow = ["grow", "--src", src, "--dst", tmp_path / "out", "--no-progress"]
    assert_bad_input(capsys, tmp_path, ["grow", "--src", tmp_path / "nope", "--dst", tmp_path / "out",
                                        "--target", target], "nope: no such checkpoint directory")
    assert_bad_input(capsys, tmp_path, grow + ["--target", target, "--method", "magic"],
                     "unknown growth method 'magic' (valid: bert2bert-aki, hypercloning, identity, lemon, ligo, llama-pro, more-experts, stack, upcycle)")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("hidden_size: [96\n")
    assert_bad_input(capsys, tmp_path, grow + ["--target", bad_yaml], "bad.yaml: malformed YAML at line")
    smaller = write_yaml(tmp_path / "smaller.yaml", hidden_size=32, num_attention_heads=2, num_query_groups=1)
    assert_bad_input(capsys, tmp_path, grow + ["--target", smaller],
                     "smaller.yaml: hidden_size: target 32 is smaller than source 64")
    unknown = write_yaml(tmp_path / "unknown.yaml", hiden_size=96)
    assert_bad_input(capsys, tmp_path, grow + ["--target", unknown], "unknown.yaml: hiden_size: unknown")
    (tmp_path / "out").mkdir()
    assert_bad_input(capsys, tmp_path, grow + ["--target", target], "out: destination exists")
    assert_bad_input(capsys, tmp_path, ["grow", "--src", src], "the following arguments are required")


def test_tp_not_dividing_heads(small, tmp_path, capsys):
    src, target = small  # target has 6 heads in 3 groups
    code, _, err = run(capsys, "grow", "--src", src, "--dst", tmp_path / "out", "--target", target, "--tp", "2")
    assert code == 2 and "num_query_groups: 3 is not divisible by tensor parallel size 2" in err
    assert not (tmp_path / "out").exists()


def test_init_writes_a_loadable_checkpoint(tmp_path, capsys):
    code, out, _ = run(capsys, "init", "--target", ROOT / "configs/models/gpt2-tiny.yaml", "--dst", tmp_path / "ck")
    assert code == 0
    code, out, _ = run(capsys, "inspect", tmp_path / "ck", "--json")
    assert json.loads(out)["model"]["normalization"] == "LayerNorm"


@pytest.mark.slow
def test_console_script(small, tmp_path):
    """The installed `scalegrow` entry point, as a user runs it."""
    src, target = small
    exe = [sys.executable, "-m", "scalegrow.cli"]
    grow = subprocess.run(exe + ["grow", "--src", src, "--dst", tmp_path / "big", "--target", target],
                          capture_output=True, text=True)
    assert grow.returncode == 0, grow.stderr
    assert "grow/lemon: 100%" in grow.stderr  # the tqdm bar
    bad = subprocess.run(exe + ["grow", "--src", src, "--dst", tmp_path / "big", "--target", target],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("(pass --overwrite to replace it)")
