"""The training pipeline with the real DeepSpeed engine on 2 CPU ranks (gloo), real TensorBoard
event files, and megatron-core as the judge of the exported checkpoints (SLURM jobs on two nodes:
tests/test_cluster.py)."""
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from scalegrow.cli import main as cli
from scalegrow.commands import load_model, verify
from scalegrow.formats.io import safe_load
from scalegrow.formats.megatron_args import config_from_args
from scalegrow.formats.registry import open_checkpoint
from scalegrow.train.config import ScheduleConfig
from scalegrow.train.schedule import learning_rate

from helpers import METADATA_KEYS, tree_sha256, write_yaml
from training import scalars, start_and_kill_after, train

pytestmark = pytest.mark.slow
STEPS = 30


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    """tiny_scratch for 30 steps: ZeRO-1, evaluated and saved every 10 steps; the output dir, what the
    command printed, and when it started."""
    out = tmp_path_factory.mktemp("runs") / "scratch"
    began = time.time()
    result = train("pretrain", "configs/runs/tiny_scratch.yaml",
                   [f"output.dir={out}", f"train.steps={STEPS}", "train.eval_interval=10", "train.save_interval=10"])
    return out, result.stdout + result.stderr, began


@pytest.fixture(scope="module")
def scratch(scratch_run):
    return scratch_run[0]


def reuse_data(run):
    return [f"data.corpus={run}/data/corpus", f"data.tokenizer={run}/data/tokenizer.model"]


def test_pretrain_loss_falls_and_logs(scratch):
    s = scalars(scratch / "tensorboard")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"} <= s.keys()
    loss = [s["train/loss"][i] for i in range(1, STEPS + 1)]
    assert sum(loss[:5]) / 5 - sum(loss[-5:]) / 5 > 1.0, loss  # clearly falls within 30 steps
    assert sorted(s["val/loss"]) == [0, 10, 20, 30]  # before any training, every 10 steps, at the end
    assert s["val/loss"][30] < s["val/loss"][0] - 1.0
    schedule = ScheduleConfig(name="cosine", lr=3e-3, min_lr=3e-4, warmup_steps=5)
    for step in (1, 5, 6, 20, 30):
        assert s["train/lr"][step] == pytest.approx(learning_rate(step - 1, schedule, STEPS), rel=1e-6)
    assert all(v > 0 for v in s["train/tokens_per_s"].values())
    summary = json.loads((scratch / "summary.json").read_text())
    assert summary["val_loss"]["30"] == pytest.approx(s["val/loss"][30], rel=1e-6)


def test_a_run_prints_no_noise(scratch_run):
    """The launcher at --log_level error, and the training ranks, print results and real warnings only:
    no INFO lines, no single-node hostfile notice, no megatron-core import warnings about Transformer
    Engine, no torch deprecation notice about DeepSpeed's all-gather, no DeepSpeed merge chatter."""
    _, printed, _ = scratch_run
    for noise in ("[INFO]", "Unable to find hostfile", "Transformer Engine and Apex", "all_gather_into_tensor",
                  "Reconstructed fp32 state dict"):
        assert noise not in printed, noise
    assert "pretrain: 0.87M params, 30 steps" in printed


def test_first_run_compiles_nothing(scratch_run):
    """tools/venv.sh builds DeepSpeed's CPU op into the venv; training loads it from there."""
    if sys.prefix == sys.base_prefix or shutil.which("nvidia-smi"):
        pytest.skip("only a CPU venv made by tools/venv.sh has the prebuilt op")
    built = Path(sys.prefix) / "torch_extensions/deepspeed_shm_comm/deepspeed_shm_comm.so"
    assert built.is_file() and built.stat().st_mtime < scratch_run[2]
    assert "built successfully" not in scratch_run[1]  # and says nothing about loading it


def test_deepspeeds_cpu_notice_is_dropped_from_training_processes():
    """"Setting accelerator to CPU" is what DeepSpeed logs on every CPU run: no news here."""
    import logging

    from scalegrow.train.launch import quiet_deepspeed_notices

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("DeepSpeed")
    logger.addHandler(handler)
    try:
        quiet_deepspeed_notices()
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to "
                       "detect it.")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]


def test_rerunning_a_finished_run_changes_nothing(scratch):
    before = tree_sha256(scratch)
    result = train("pretrain", "configs/runs/tiny_scratch.yaml",
                   [f"output.dir={scratch}", f"train.steps={STEPS}", "train.eval_interval=10", "train.save_interval=10"])
    assert f"{scratch} is complete: {STEPS} steps trained" in result.stdout
    assert f"raise train.steps (e.g. train.steps={2 * STEPS})" in result.stdout
    assert tree_sha256(scratch) == before  # no summary, export, TensorBoard or checkpoint touched


def test_a_higher_train_steps_continues(scratch, tmp_path):
    run = tmp_path / "more"
    shutil.copytree(scratch, run)
    train("pretrain", "configs/runs/tiny_scratch.yaml",
          [f"output.dir={run}", f"train.steps={STEPS + 4}", "train.eval_interval=10", "train.save_interval=10",
           *reuse_data(scratch)])
    s, first = scalars(run / "tensorboard"), scalars(scratch / "tensorboard")
    assert sorted(s["train/loss"]) == list(range(1, STEPS + 5))
    assert s["val/loss"][STEPS] == first["val/loss"][STEPS]  # the finished run's last point survives
    assert sorted(s["val/loss"]) == [0, 10, 20, 30, 34]
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS + 4


def test_init_from_inside_output_dir_is_refused(scratch, tmp_path):
    result = train("grow_pretrain", "configs/runs/tiny_lemon.yaml",
                   [f"output.dir={scratch}", f"init.from={scratch}/export"], check=False)
    assert result.returncode != 0 and f"init.from: {scratch}/export lies inside output.dir {scratch}" in result.stderr


def test_pretrain_export_loads_in_megatron_core(scratch, mcore):
    export = scratch / "export"
    assert (export / "tokenizer.model").is_file()
    meta = json.loads((export / "scalegrow.json").read_text())
    assert meta["method"] == "pretrain" and meta["iteration"] == STEPS
    state = safe_load(export / "iter_0000030/mp_rank_00/model_optim_rng.pt", mmap=False)

    cfg = config_from_args(state["args"])
    assert cfg.vocab_size == 512 and state["args"].tokenizer_type == "GPTSentencePieceTokenizer"
    assert_megatron_core_computes_the_export(mcore, cfg, state["model"], export)


def assert_megatron_core_computes_the_export(mcore, cfg, model_state: dict, export) -> None:
    """megatron-core's GPTModel loads `model_state` strictly and computes what scalegrow's model of
    `export` computes."""
    theirs = mcore.build_gpt(cfg).eval()
    mcore.load_strict(theirs, model_state)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (mcore.forward(theirs, x) - load_model(export)(x)).abs().max().item() <= 1e-5


def grow_from_scratch_run(scratch, config: str, out) -> None:
    """grow_pretrain from the scratch run's export: 20 steps, evaluated and saved every 10, its data reused."""
    train("grow_pretrain", config, [f"output.dir={out}", f"init.from={scratch}/export", "train.steps=20",
                                    "train.eval_interval=10", "train.save_interval=10", *reuse_data(scratch)])


def test_grow_pretrain_starts_where_the_small_model_ended(scratch, tmp_path):
    """LEMON growth is lossless, so the grown model's step-0 val/loss is the small model's final one;
    it then trains on the LEMON schedule: the scratch peak LR, decayed faster."""
    out = tmp_path / "lemon"
    grow_from_scratch_run(scratch, "configs/runs/tiny_lemon.yaml", out)
    small, grown = scalars(scratch / "tensorboard"), scalars(out / "tensorboard")
    assert abs(grown["val/loss"][0] - small["val/loss"][STEPS]) <= 1e-4
    # back at the peak LR the loss first rises, then the grown model learns: the last steps' mean train
    # loss is well below the re-warmup's (steps 2-6); on this short run val/loss may still sit near its start
    loss = grown["train/loss"]
    assert sum(loss[s] for s in range(16, 21)) / 5 < sum(loss[s] for s in range(2, 7)) / 5 - 0.2
    lemon = ScheduleConfig(name="lemon", lr=3e-3, min_lr=3e-4, warmup_steps=2, decay_fraction=0.6)
    for step in range(1, 21):
        assert grown["train/lr"][step] == pytest.approx(learning_rate(step - 1, lemon, 20), rel=1e-6)
    assert max(grown["train/lr"].values()) == pytest.approx(3e-3)
    meta = json.loads((out / "export/scalegrow.json").read_text())
    assert set(meta) == METADATA_KEYS == set(json.loads((out / "checkpoints/scalegrow.json").read_text()))
    assert meta["method"] == "grow_pretrain" and meta["model"]["hidden_size"] == 192
    assert meta["source"]["path"] == str((scratch / "export").resolve())
    assert len(meta["source"]["manifest_sha256"]) == 64
    assert meta["training"]["val_loss"]["20"] == pytest.approx(grown["val/loss"][20], rel=1e-6)


def test_resume_after_kill_is_bit_identical(scratch, tmp_path):
    common = ["train.steps=24", "train.save_interval=8", "train.eval_interval=8", "deepspeed.zero_stage=2",
              *reuse_data(scratch)]
    train("pretrain", "configs/runs/tiny_scratch.yaml", [f"output.dir={tmp_path}/a", *common])
    killed = start_and_kill_after("pretrain", "configs/runs/tiny_scratch.yaml", [f"output.dir={tmp_path}/b", *common],
                                  tmp_path / "b/checkpoints", "step8")
    assert killed != 0 and not (tmp_path / "b/summary.json").exists()  # it really died mid-run
    train("pretrain", "configs/runs/tiny_scratch.yaml", [f"output.dir={tmp_path}/b", *common])  # same command
    a, b = scalars(tmp_path / "a/tensorboard"), scalars(tmp_path / "b/tensorboard")
    for step in range(9, 25):
        assert a["train/loss"][step] == b["train/loss"][step], step  # exactly equal
    assert a["val/loss"][24] == b["val/loss"][24]
    wa = load_model(tmp_path / "a/export").state_dict()
    wb = load_model(tmp_path / "b/export").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_diverging_run_stops_keeping_its_last_good_checkpoint(scratch, tmp_path):
    """Warming up to a peak LR of 0.2 (70x the scratch run's), the validation loss goes 4.7 -> 6.8, 6.1,
    6.2, then 9.8, over twice its start: the run stops there with exit 3 and one message, before it
    saves or exports the diverged weights, and its last checkpoint passed the guard. The same command
    at `schedule.lr=auto` (the scratch run's recorded peak) then resumes from it and finishes."""
    out, common = tmp_path / "run", ["train.steps=12", "train.save_interval=1", "train.eval_interval=4",
                                     "schedule.warmup_steps=12", *reuse_data(scratch)]
    args = [f"output.dir={out}", f"init.from={scratch}/export", *common]
    result = train("pretrain", "configs/runs/tiny_scratch.yaml", [*args, "schedule.lr=0.2"], check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "training diverged" in line]
    assert len(errors) == 1 and "pretrain: error: training diverged at step" in errors[0]
    kept = int(errors[0].split("the last checkpoint, step ")[1].split()[0])
    assert (out / "checkpoints/latest").read_text().strip() == f"step{kept}"
    assert not (out / "export").exists() and not (out / "summary.json").exists()
    val = scalars(out / "tensorboard")["val/loss"]
    assert all(val[s] <= 2.0 * val[0] for s in val if s <= kept)  # what was kept passed the guard
    result = train("pretrain", "configs/runs/tiny_scratch.yaml", [*args, "schedule.lr=auto"])
    assert "peak lr 0.003 (auto: the source's recorded peak), min 0.0003" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["val_loss"]["12"] < 2.0 * val[0]


def test_zero3_matches_zero1(scratch, tmp_path):
    """The same 5 steps under ZeRO-3 (parameters partitioned) and ZeRO-1 give the same losses; the
    export is written as torch_dist at TP2 inside the 2-rank job, holding exactly the trained weights."""
    train("pretrain", "configs/runs/tiny_scratch.yaml",
          [f"output.dir={tmp_path}/z3", "train.steps=5", "schedule.decay_steps=30", "deepspeed.zero_stage=3",
           "export.format=torch_dist", "export.tp=2", *reuse_data(scratch)])
    z1, z3 = scalars(scratch / "tensorboard"), scalars(tmp_path / "z3/tensorboard")
    for step in range(1, 6):
        assert z3["train/loss"][step] == pytest.approx(z1["train/loss"][step], abs=1e-4)
    assert z3["val/loss"][0] == pytest.approx(z1["val/loss"][0], abs=1e-5)
    export = open_checkpoint(tmp_path / "z3/export")
    assert (export.format, export.tp, export.iteration, export.config.num_layers) == ("torch_dist", 2, 5, 4)
    assert verify(tmp_path / "z3/checkpoints", tmp_path / "z3/export")["max_abs_diff"] == 0.0


def test_deepspeed_checkpoint_is_a_cli_source(scratch, tmp_path, capsys):
    assert cli(["inspect", str(scratch / "checkpoints"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["iteration"]) == ("deepspeed", STEPS)
    assert cli(["verify", "--src", str(scratch / "checkpoints"), "--dst", str(scratch / "export")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["max_abs_diff"] == 0.0 and "Processing zero checkpoint" in err  # DeepSpeed's chatter
    assert cli(["convert", "--src", str(scratch / "checkpoints"), "--dst", str(tmp_path / "tp2"), "--tp", "2",
                "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "Processing zero checkpoint" not in out + err  # --no-progress: silenced
    assert (tmp_path / "tp2/tokenizer.model").read_bytes() == (scratch / "export/tokenizer.model").read_bytes()


def test_train_batch_size_mismatch_is_bad_input(scratch, tmp_path):
    result = train("pretrain", "configs/runs/tiny_scratch.yaml",
                   [f"output.dir={tmp_path}/bad", "deepspeed.config={train_batch_size: 12}", *reuse_data(scratch)],
                   check=False)
    assert result.returncode != 0
    assert "train_batch_size: 12 != micro_batch_size 8 × gradient_accumulation_steps 1 × data parallel 2 = 16" \
        in result.stderr + result.stdout


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gemma2", "gemma3_text", "olmo2"])
def test_hf_model_pretrains_grows_and_exports_as_hf(tmp_path, family):
    """init.from an HF directory: its tokenizer.json prepares the data; pretrain continues it and
    exports HF, which grow_pretrain then grows (LEMON, lossless) and exports as HF again; transformers
    loads both exports and computes what scalegrow computes. phi3: fused projections, rope over half
    of each head, a sliding window of 8 tokens in 64-token windows. gemma2: gradients through both
    soft-caps; gemma3_text: post-norms, q/k norms and the local rope; olmo2: no norm before a block, q/k
    norms across heads (tests/hf_models.py)."""
    from hf_models import build, logits, train_tokenizer

    src = build(family, tmp_path / family, train_tokenizer(tmp_path / "tokenizer"))
    common = ["train.steps=10", "train.eval_interval=10", "train.save_interval=10", "export.format=hf",
              "data.seq_length=64"]
    train("pretrain", "configs/runs/tiny_scratch.yaml", [f"output.dir={tmp_path / 'cont'}", f"init.from={src}",
                                                         *common])
    if family == "olmo2":  # its q/k norms across heads need each head copied equally: groups 2 -> 4
        target = write_yaml(tmp_path / "t.yaml", num_layers=8, hidden_size=192, ffn_hidden_size=528,
                            num_attention_heads=8, num_query_groups=4)
        common.append(f"growth.target={target}")
    train("grow_pretrain", "configs/runs/tiny_lemon.yaml", [f"output.dir={tmp_path / 'grown'}",
                                                            f"init.from={tmp_path / 'cont/export'}", *common])
    cont, grown = scalars(tmp_path / "cont/tensorboard"), scalars(tmp_path / "grown/tensorboard")
    assert cont["val/loss"][10] < cont["val/loss"][0] - 0.5  # the HF model learns on its own tokenizer's data
    assert abs(grown["val/loss"][0] - cont["val/loss"][10]) <= 1e-4  # grown losslessly from the HF export
    x = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    for run, hidden in (("cont", 64), ("grown", 192)):
        export = tmp_path / run / "export"
        config = json.loads((export / "config.json").read_text())
        assert config["model_type"] == family and config["hidden_size"] == hidden and config["vocab_size"] == 1000
        assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in export.iterdir()}
        with torch.no_grad():
            ours, theirs = load_model(export)(x), logits(export, x)
        assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


def test_upcycled_moe_starts_at_the_dense_loss_and_trains(scratch, tmp_path, mcore):
    """configs/runs/tiny_upcycle.yaml: the dense tiny model upcycled to 4 experts (top-2) starts at
    the dense model's final val/loss, logs the router's balancing loss, learns, and exports an MoE
    checkpoint that megatron-core loads strictly and computes alike."""
    out = tmp_path / "upcycle"
    grow_from_scratch_run(scratch, "configs/runs/tiny_upcycle.yaml", out)
    dense, moe = scalars(scratch / "tensorboard"), scalars(out / "tensorboard")
    assert abs(moe["val/loss"][0] - dense["val/loss"][STEPS]) <= 1e-4
    aux = moe["train/moe_aux_loss"]
    # summed over 4 MoE layers, each 1 when tokens spread evenly over the experts and up to 4 when not
    assert sorted(aux) == list(range(1, 21)) and all(3.5 < v < 16 for v in aux.values()), aux
    loss = moe["train/loss"]
    assert sum(loss[s] for s in range(16, 21)) / 5 < sum(loss[s] for s in range(2, 7)) / 5 - 0.1
    export = out / "export"
    ckpt = open_checkpoint(export)
    assert ckpt.config.moe.num_experts == 4 and json.loads((export / "scalegrow.json").read_text())["method"] == \
        "grow_pretrain"
    state = safe_load(next(export.rglob("model_optim_rng.pt")), mmap=False)
    assert_megatron_core_computes_the_export(mcore, ckpt.config, state["model"], export)


def test_deepseek_routed_upcycle_balances_its_experts_under_zero3(scratch, tmp_path, mcore):
    """Upcycled into DeepSeek-V3's routing (sigmoid scores, an expert bias, 2 of 4 groups, scaled)
    and trained under ZeRO-3: step 0 is the dense model's final val/loss; after every optimizer step
    each router's bias moved by ±moe_router_bias_update_rate (megatron-core's aux-loss-free update),
    the same on both ranks; the export keeps it in fp32 and megatron-core computes the export."""
    out = tmp_path / "deepseek"
    target = write_yaml(tmp_path / "t.yaml", num_moe_experts=8, moe_router_topk=2, moe_router_score_function="sigmoid",
                        moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                        moe_router_topk_scaling_factor=2.0, moe_router_bias_update_rate=0.01)
    train("grow_pretrain", "configs/runs/tiny_upcycle.yaml",
          [f"output.dir={out}", f"init.from={scratch}/export", "train.steps=10", "train.eval_interval=10",
           "train.save_interval=10", f"growth.target={target}", "deepspeed.zero_stage=3", *reuse_data(scratch)])
    dense, moe = scalars(scratch / "tensorboard"), scalars(out / "tensorboard")
    assert abs(moe["val/loss"][0] - dense["val/loss"][STEPS]) <= 1e-4
    export = out / "export"
    state = safe_load(next(export.rglob("model_optim_rng.pt")), mmap=False)
    biases = [v for k, v in state["model"].items() if k.endswith("router.expert_bias")]
    assert len(biases) == open_checkpoint(export).config.num_layers and all(b.dtype == torch.float32 for b in biases)
    steps = torch.stack(biases) / 0.01  # each entry a sum of 10 signs: an integer in [-10, 10], not all 0
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 10 and steps.abs().sum() > 0
    assert_megatron_core_computes_the_export(mcore, open_checkpoint(export).config, state["model"], export)
