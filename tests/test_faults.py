"""Nothing lost, nothing surprising: overlapping paths, a full disk, the tokenizer travelling with the
model, commands that say what they do. Each case runs the CLI as a user would."""
import json
import os
import re
import subprocess
import sys

import pytest

from scalegrow.cli import build_parser, main
from scalegrow.commands import save_model
from scalegrow.write import session

from helpers import family_config, random_model, tree_sha256, write_yaml


@pytest.fixture
def src(tmp_path):
    """A TP2/PP2 LLaMA-style checkpoint that ships its tokenizer, and a growth target."""
    cfg = family_config("llama", num_layers=2)
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "src", tp=2, pp=2, iteration=7)
    (tmp_path / "src/tokenizer.model").write_bytes(b"a sentencepiece model")
    write_yaml(tmp_path / "t.yaml", hidden_size=128, num_attention_heads=8, num_query_groups=4,
               ffn_hidden_size=192, num_layers=4)
    return tmp_path / "src"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, tmp_path, argv, *fragments):
    before = tree_sha256(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith("scalegrow: error: ") and err.count("\n") == 1, (code, out, err)
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert tree_sha256(tmp_path) == before  # nothing written, nothing removed
    return err


# ---- 1. a destination that overlaps the source ------------------------------------------------------
def test_destination_overlapping_the_source_is_refused(src, tmp_path, capsys):
    t = tmp_path / "t.yaml"
    refused(capsys, tmp_path, ["grow", "--src", src, "--dst", src, "--target", t, "--overwrite"],
            "the destination is the source")
    refused(capsys, tmp_path, ["convert", "--src", src, "--dst", src, "--overwrite", "--tp", "1"],
            "the destination is the source")
    refused(capsys, tmp_path, ["convert", "--src", src, "--dst", src / "inner"], "lies inside the source")
    refused(capsys, tmp_path, ["shrink", "--src", src, "--dst", tmp_path, "--target", t, "--overwrite"],
            "contains the source")
    os.symlink(src, tmp_path / "alias")  # the same directory under another name
    refused(capsys, tmp_path, ["grow", "--src", tmp_path / "alias", "--dst", src, "--target", t, "--overwrite"],
            "the destination is the source")
    assert (src / "tokenizer.model").read_bytes() == b"a sentencepiece model"


# ---- 2. a full disk ------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a real filesystem that runs out of space (mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the full-disk tests: they mount a tmpfs, as root")
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_output_larger_than_the_free_space_is_refused_before_writing(src, small_disk, capsys):
    before = tree_sha256(src)
    err = refused(capsys, small_disk, ["grow", "--src", src, "--dst", small_disk / "big", "--target",
                                       src.parent / "t.yaml", "--no-progress"], "the output needs")
    need, free = re.search(r"needs ([\d.]+) MB but its device has ([\d.]+) MB free", err).groups()
    assert float(need) > float(free) == 1.05  # the 1 MiB tmpfs, empty
    assert os.listdir(small_disk) == [] and tree_sha256(src) == before


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_planned_bytes_are_what_is_written(src, tmp_path, capsys, fmt):
    """The space check's figure is the tensor bytes the writer then writes (files add their headers)."""
    assert run(capsys, "grow", "--src", src, "--dst", tmp_path / "big", "--target", tmp_path / "t.yaml",
               "--format", fmt, "--no-progress")[0] == 0
    from scalegrow.formats.registry import FORMATS, open_checkpoint

    big = open_checkpoint(tmp_path / "big")
    planned = FORMATS[fmt].size(big.config, big.layout, big.dtype)
    written = sum(f.stat().st_size for f in (tmp_path / "big").rglob("*") if f.suffix in (".pt", ".distcp"))
    assert planned < written < planned * 1.05 + 100_000, (planned, written)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_running_out_of_space_mid_write_leaves_nothing(src, small_disk, capsys, monkeypatch, fmt):
    """The space check passes (as if another writer filled the disk meanwhile): the write itself
    fails, with one line naming the file, and nothing is left behind."""
    monkeypatch.setattr(session, "preflight", lambda source, cfg, opts, dst: session.resolve(source, cfg, opts))
    err = refused(capsys, small_disk, ["grow", "--src", src, "--dst", small_disk / "big", "--target",
                                       src.parent / "t.yaml", "--format", fmt, "--no-progress"],
                  f"no space left on the device of {small_disk / 'big'} while writing {small_disk / 'big'}/")
    assert ".partial" not in err and os.listdir(small_disk) == []


# ---- 3. the tokenizer travels -------------------------------------------------------------------------
def test_grow_convert_and_shrink_carry_the_tokenizer(src, tmp_path, capsys):
    assert run(capsys, "grow", "--src", src, "--dst", tmp_path / "big", "--target", tmp_path / "t.yaml",
               "--no-progress")[0] == 0
    assert run(capsys, "convert", "--src", tmp_path / "big", "--dst", tmp_path / "dist", "--format", "torch_dist",
               "--no-progress")[0] == 0
    small = write_yaml(tmp_path / "s.yaml", num_layers=1)
    assert run(capsys, "shrink", "--src", tmp_path / "dist", "--dst", tmp_path / "small", "--method",
               "drop-layers", "--target", small, "--pp", "1", "--no-progress")[0] == 0
    for out in ("big", "dist", "small"):
        assert (tmp_path / out / "tokenizer.model").read_bytes() == b"a sentencepiece model", out


# ---- 4. commands say what they do -----------------------------------------------------------------------
def test_progress_bars_are_named_for_their_command(src, tmp_path):
    exe = [sys.executable, "-m", "scalegrow.cli"]
    convert = subprocess.run(exe + ["convert", "--src", str(src), "--dst", str(tmp_path / "c"), "--tp", "1"],
                             capture_output=True, text=True)
    assert convert.returncode == 0 and "convert: 100%" in convert.stderr and "grow/" not in convert.stderr
    shrink = subprocess.run(exe + ["shrink", "--src", str(src), "--dst", str(tmp_path / "s"), "--method",
                                   "drop-layers", "--target", str(write_yaml(tmp_path / "s.yaml", num_layers=1)),
                                   "--pp", "1"], capture_output=True, text=True)
    assert shrink.returncode == 0 and "shrink/drop-layers: 100%" in shrink.stderr, shrink.stderr
    assert "Transformer Engine" not in convert.stderr + shrink.stderr  # megatron-core's import noise


def test_dry_run_reads_only_the_first_rank_args(src, tmp_path, capsys):
    for rank in ("mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):  # every file but rank 0's: garbage
        (src / "iter_0000007" / rank / "model_optim_rng.pt").write_bytes(b"not a checkpoint")
    code, out, _ = run(capsys, "grow", "--src", src, "--dst", tmp_path / "x", "--target", tmp_path / "t.yaml",
                       "--tp", "1", "--pp", "1", "--dry-run")
    # 4 layers of 6 tensors (norms, qkv, proj, fc1, fc2), embeddings, final norm, output layer
    assert code == 0 and json.loads(out)["files"]["iter_0000007/mp_rank_00/model_optim_rng.pt"]["tensors"] == 27
    refused(capsys, tmp_path, ["grow", "--src", src, "--dst", tmp_path / "x", "--target", tmp_path / "t.yaml"],
            "mp_rank_01_000/model_optim_rng.pt: unreadable or truncated")


def test_layout_is_checked_before_calibration(src, tmp_path, capsys):
    """shrink to 2 layers at PP 3 fails on the layout, before calibration would need the tokenizer."""
    (src / "tokenizer.model").unlink()
    refused(capsys, tmp_path, ["shrink", "--src", src, "--dst", tmp_path / "s", "--target",
                               write_yaml(tmp_path / "s.yaml", num_layers=1), "--pp", "3"],
            "--pp: num_layers 1 cannot be split over 3 pipeline stages")
    refused(capsys, tmp_path, ["shrink", "--src", src, "--dst", tmp_path / "s", "--target",
                               write_yaml(tmp_path / "s.yaml", num_layers=1), "--pp", "1"], "ships no tokenizer (tokenizer.model or tokenizer.json)")


def test_verify_says_same_or_different(src, tmp_path, capsys):
    cfg = family_config("llama", num_layers=2)
    save_model(random_model(cfg, seed=9).state_dict(), cfg, tmp_path / "other")
    code, out, err = run(capsys, "verify", "--src", src, "--dst", tmp_path / "other")
    assert code == 1 and json.loads(out)["verdict"] == "different" and err.startswith("verify: DIFFERENT")
    code, out, err = run(capsys, "verify", "--src", src, "--dst", src)
    assert code == 0 and json.loads(out)["verdict"] == "same" and err.startswith("verify: SAME")


def test_bare_command_prints_the_usage(capsys):
    code, out, err = run(capsys)
    assert code == 0 and out.startswith("usage: scalegrow") and "grow" in out and "shrink" in out and not err


def test_every_option_has_help_with_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]}: no help"
            flag = action.nargs == 0  # store_true: off unless given
            assert flag or action.required or "default" in action.help, f"{name} {action.option_strings[0]}"
    init_tp = next(a for a in commands["init"]._actions if a.dest == "tp")
    assert "source" not in init_tp.help and "default: 1" in init_tp.help
    method = next(a for a in commands["grow"]._actions if a.dest == "method")
    assert "lemon, ligo, llama-pro" in method.help



# ---- 6. what the rest of the group may read --------------------------------------------------------
@pytest.mark.parametrize("fmt, umask", [("torch", 0o002), ("torch_dist", 0o022), ("hf", 0o002)])
def test_output_gets_the_modes_plain_mkdir_and_open_give(src, tmp_path, capsys, fmt, umask):
    """A shared cluster filesystem: the group reads (umask 022) or writes (002) what a teammate grew,
    the directory as `mkdir` would make it, the files as `open` would (a temporary directory's 0700
    would lock them out)."""
    old = os.umask(umask)
    try:
        code, _, err = run(capsys, "grow", "--src", src, "--dst", tmp_path / "out", "--target", tmp_path / "t.yaml",
                           "--format", fmt, "--no-progress")
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {p.relative_to(tmp_path): oct(p.stat().st_mode & 0o777) for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    want = {p: oct((0o777 if (tmp_path / p).is_dir() else 0o666) & ~umask) for p in modes}
    assert modes == want and len(modes) >= 4  # the directory, weights, scalegrow.json, the tokenizer
