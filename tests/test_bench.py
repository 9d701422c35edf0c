"""The growth-savings benchmark (issue 7): its arithmetic on hand-made curves, the corpus cleaner, and
its --quick mode end to end (a smoke test: the pipeline runs and reports every method; the savings
themselves are measured in docs/RESULTS.md, not asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
import savings_report as report  # noqa: E402


def test_steps_to_interpolates_between_evaluations():
    val = {0: 6.0, 10: 5.0, 20: 4.0, 30: 3.5}
    assert report.steps_to(val, 4.5) == pytest.approx(15.0)
    assert report.steps_to(val, 6.5) == 0.0
    assert report.steps_to(val, 3.5) == 30.0
    assert report.steps_to(val, 3.0) is None
    assert report.steps_to({"0": 5.0, "10": 4.0}, 4.0) == 10.0  # JSON keys are strings


def test_flops_per_token_is_6n_plus_attention():
    cfg = ModelConfig.from_dict(dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      padded_vocab_size=256, max_position_embeddings=128, normalization="RMSNorm",
                      swiglu=False, position_embedding_type="rope", untie_embeddings_and_output_weights=True,
                      add_bias_linear=False))
    layer = 64 * 192 + 64 * 64 + 2 * 64 * 128 + 2 * 64  # qkv, proj, fc1 + fc2, two norms
    matmul = 2 * layer + 64 + 256 * 64  # layers, final norm, output layer (the embedding is a lookup)
    assert flops_per_token(cfg, 32) == 6 * matmul + 6 * 2 * 32 * 64
    tied = cfg.replace(untie_embeddings_and_output_weights=False)
    assert flops_per_token(tied, 32) == flops_per_token(cfg, 32)  # the same matmuls
    assert flops_per_token(cfg, 32, training=False) == flops_per_token(cfg, 32) / 3  # a teacher's forward


def test_growth_rows_count_operator_steps_and_small_pretraining():
    runs = {"scratch": {"val": {0: 8.0, 50: 5.0, 100: 4.0}, "seconds": 1},
            "grown": {"val": {0: 5.0, 50: 4.0, 100: 3.5}, "seconds": 1},
            "ligo": {"val": {0: 4.5, 50: 4.0, 100: 3.9}, "seconds": 1},
            "never": {"val": {0: 5.0, 100: 4.5}, "seconds": 1}}
    rows = {r["method"]: r for r in report.growth_rows(runs, {"ligo": 10}, tokens_per_step=100,
                                                      large_flops=1.0, small_flops_total=2000.0)}
    assert rows["scratch"]["saved"] == 0.0
    assert rows["grown"]["steps_to_target"] == 50.0 and rows["grown"]["saved"] == pytest.approx(0.5)
    assert rows["grown"]["saved_with_small"] == pytest.approx(1 - (50 * 100 + 2000) / (100 * 100))
    assert rows["ligo"]["saved"] == pytest.approx(1 - 60 / 100)
    assert rows["never"]["steps_to_target"] is None and "saved" not in rows["never"]


def test_shrink_rows_measure_random_init_steps_to_each_final_loss():
    runs = {"random": {"val": {0: 8.0, 100: 5.0, 200: 4.0, 400: 3.0}},
            "subclone": {"val": {0: 4.5, 50: 3.5, 100: 3.0}},
            "better": {"val": {0: 3.0, 100: 2.5}}}
    rows = {r["method"]: r for r in report.shrink_rows(runs)}
    assert rows["random"]["speedup"] == 1.0
    assert rows["subclone"]["random_steps_to_final"] == 400.0 and rows["subclone"]["speedup"] == 4.0
    assert rows["better"]["speedup"] is None and rows["better"]["speedup_at_least"] == 4.0


def test_subclone_race_counts_teacher_forward_flops_and_steps_to_random_inits_final():
    import subclone_kd as race

    b = replace(race.QUICK, random_steps=400, micro_batch_size=2, seq_length=5)
    curve = {"val": {0: 6.0, 100: 4.0, 200: 3.0}, "seconds": 1}
    runs = {"target": {"val": {0: 8.0, 200: 4.0, 400: 3.0}}, **{name: curve for name in race.RUNS}}
    runs["random"] = {"val": {0: 8.0, 100: 5.0, 200: 4.5}, "seconds": 1}  # never reaches 3.0
    runs["subclone"] = {"val": {"0": 3.0, "100": 2.5}, "seconds": 1}  # already there at step 0
    flops = {"students": {init: 10.0 for init in race.INITS}, "teacher_forward": 30.0}
    rows = {r["method"]: r for r in race.student_rows(runs, b, flops)}
    kd = rows["drop-layers+kd"]
    assert kd["steps_to_target"] == 200.0 and kd["speedup"] == 2.0
    assert kd["flops_per_step"] == 10 * (10.0 + 30.0) and kd["flops_to_target"] == 200 * 400.0
    assert kd["flops_speedup"] == pytest.approx(400 * 10 * 10.0 / (200 * 400.0))  # 0.5: the teacher costs 3x
    plain = rows["drop-layers"]
    assert plain["flops_per_step"] == 100.0 and plain["flops_speedup"] == 2.0
    assert plain["random_steps_to_final"] == 400.0
    assert rows["random"]["steps_to_target"] is None and "speedup" not in rows["random"]
    assert rows["random"]["random_steps_to_final"] == 175.0  # 8 -> 4 over 200 steps
    assert rows["subclone"]["steps_to_target"] == 0.0 and "speedup" not in rows["subclone"]


def test_gcide_cleaner_reads_windows_1252_lines():
    import clean_gcide

    text = clean_gcide.decode("caf\u00e9 ok\nthe market\x92s drop".encode("utf-8").replace(b"\xc2\x92", b"\x92"))
    assert text == "caf\u00e9 ok\nthe market\u2019s drop"


@pytest.mark.slow
def test_quick_mode_runs_every_method(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "growth_savings.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    methods = {"scratch", "lemon", "ligo", "bert2bert-aki", "hypercloning+stack", "hypercloning+llama-pro"}
    assert {r["method"] for r in summary["growth"][0]} == methods
    assert {r["method"] for r in summary["shrink"][0]} == {"random", "subclone", "drop-layers", "subclone-lr0.25"}
    assert summary["large"]["params_ratio"] >= 4.0
    for row in summary["growth"][0]:  # every run trained and was evaluated at its start and end
        assert row["final_val"] < row["start_val"]
    for plot in summary["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_token_budget_race_quick_mode(tmp_path):
    """tools/bench/token_budgets.py --quick: at every budget every method trains the same steps; LEMON
    (with or without Adam's state) starts at the small model's final loss; the plot is written."""
    out = tmp_path / "budgets"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "token_budgets.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["budgets"]) == ["0.25", "0.5"]
    small_final = summary["small"]["final_val"][0]
    for budget in summary["budgets"].values():
        rows = {r["method"]: r for r in budget["rows"][0]}
        assert set(rows) == {"scratch", "lemon", "hypercloning+stack", "lemon-no-rewarmup", "lemon+adam",
                             "lemon+adam+rewarmup", "lemon-cosine"}
        for name in ("lemon", "lemon-no-rewarmup", "lemon+adam", "lemon+adam+rewarmup", "lemon-cosine"):
            assert rows[name]["start_val"] == pytest.approx(small_final, abs=1e-4), name
        assert rows["scratch"]["start_val"] > small_final + 0.5
    assert (out / "token_budgets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_subclone_kd_quick_mode_races_every_student(tmp_path):
    """tools/bench/subclone_kd.py --quick: every student trains; distillation changes the training,
    not the start (val loss is the plain model's); the students share their initialisations; a KD
    step is charged the teacher's forward pass."""
    import subclone_kd as race

    out = tmp_path / "race"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "subclone_kd.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in summary["students"][0]}
    assert set(rows) == set(race.RUNS)
    runs = {name: json.loads((out / "runs" / "seed0" / f"{name}.json").read_text()) for name in ("target", *race.RUNS)}
    for init in race.INITS:
        assert rows[init]["start_val"] == rows[f"{init}+kd"]["start_val"]
        assert rows[init]["final_val"] != rows[f"{init}+kd"]["final_val"]
        assert all(v["kl"] > 0 for v in runs[f"{init}+kd"]["distill"].values())
    assert rows["random"]["start_val"] == runs["target"]["val"]["0"]
    assert rows["subclone"]["start_val"] < rows["random"]["start_val"]  # inherits the parent's knowledge
    tokens, f = race.QUICK.micro_batch_size * race.QUICK.seq_length, summary["flops_per_token"]
    assert f["teacher_forward"] == f["parent"] / 3
    assert rows["random+kd"]["flops_per_step"] == tokens * (f["students"]["random"] + f["teacher_forward"])
    assert rows["random"]["flops_per_step"] == tokens * f["students"]["random"]
    width, small = summary["shapes"]["subclone-width"], summary["shapes"]["subclone"]  # Minitron's rule
    assert width["num_layers"] == summary["budget"]["large"]["num_layers"] > small["num_layers"]
    assert width["params"] <= small["params"] and width["hidden_size"] < summary["budget"]["large"]["hidden_size"]
    parent = summary["parent"][0]
    assert parent["final_val"] < parent["target_val"]  # the parent beats the small model it teaches
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_moe_upcycle_quick_mode_compares_every_run(tmp_path):
    """tools/bench/moe_upcycle.py --quick: every run trains; an upcycled MoE starts at the dense
    model's final val loss (upcycling is lossless); active parameters count top-k experts only."""
    out = tmp_path / "moe"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "moe_upcycle.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"dense-continued", "upcycle-8x2", "scratch-8x2", "upcycle-granular", "scratch-granular"}
    dense = json.loads((out / "runs" / "seed0" / "dense.json").read_text())["val"]
    for shape in ("8x2", "granular"):
        start = json.loads((out / "runs" / "seed0" / f"upcycle-{shape}.json").read_text())["val"]["0"]
        assert abs(start - dense[max(dense, key=int)]) < 1e-4
    assert rows["upcycle-8x2"]["active_params"] < rows["upcycle-8x2"]["params"]
    assert rows["upcycle-granular"]["active_params"] - rows["dense-continued"]["params"] == 2 * 8 * 32  # routers
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_bench_quick_mode_measures_against_a_forward_pass():
    result = subprocess.run([sys.executable, str(ROOT / "tools/bench/calibration.py"), "--quick", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["tokens"] == 512 and rows[0]["device"] == "cpu"
    assert all(rows[0][k] > 0 for k in ("forward_s_per_1k", "calibrate_s_per_1k", "rescale_s_per_1k"))
    row = rows[0]
    assert row["calibrate_over_forward"] == pytest.approx(row["calibrate_s_per_1k"] / row["forward_s_per_1k"])
