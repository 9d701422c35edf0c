"""Training building blocks without a launcher: schedules, run configs, data."""
import json

import numpy as np
import pytest
import torch

from scalegrow.data import (
    BatchOrder,
    TokenStream,
    build_indexed,
    embedded_documents,
    is_valid_document,
    load_documents,
    load_tokenizer,
    train_tokenizer,
)
from scalegrow.errors import InputError
from scalegrow.train.config import ScheduleConfig, load_run_config
from scalegrow.train.engine import deepspeed_config
from scalegrow.train.schedule import learning_rate


def test_cosine_schedule():
    cfg = ScheduleConfig(name="cosine", lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [learning_rate(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[99] == pytest.approx(1e-4, rel=1e-2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_lemon_schedule_keeps_peak_and_decays_faster():
    scratch = ScheduleConfig(name="cosine", lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lemon = ScheduleConfig(name="lemon", lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_fraction=0.6)
    s = [learning_rate(i, scratch, 100) for i in range(100)]
    g = [learning_rate(i, lemon, 100) for i in range(100)]
    assert max(g) == max(s) == pytest.approx(1e-3)  # the same peak LR as from scratch
    assert g[60] == pytest.approx(1e-4) and g[99] == pytest.approx(1e-4)  # at min_lr after 60%, held
    assert s[60] > 2e-4
    assert all(gi <= si + 1e-12 for gi, si in zip(g, s))  # never above scratch: it decays faster


def test_run_config_overrides_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output: {dir: x}\ntrain: {steps: 10}\ninit: {from: somewhere}\n")
    cfg = load_run_config(path, ["train.steps=30", "schedule.lr=2e-3", "deepspeed.zero_stage=3"])
    assert (cfg.train.steps, cfg.schedule.lr, cfg.deepspeed.zero_stage, cfg.init.from_) == (30, 2e-3, 3, "somewhere")
    with pytest.raises(InputError, match=r"train\.stepz: unknown key"):
        load_run_config(path, ["train.stepz=3"])
    with pytest.raises(InputError, match=r"train\.steps: expected int, got 'many'"):
        load_run_config(path, ["train.steps=many"])
    with pytest.raises(InputError, match=r"deepspeed\.zero_stage: must be 0, 1, 2 or 3"):
        load_run_config(path, ["deepspeed.zero_stage=4"])
    with pytest.raises(InputError, match="overrides look like dotted.key=value"):
        load_run_config(path, ["train.steps"])


def test_auto_lr_takes_the_sources_peak_else_the_pretrained_default():
    from scalegrow.train.schedule import PRETRAINED_LR, resolve

    auto = load_run_config(None, ["schedule.lr=auto", "schedule.min_lr=auto"]).schedule
    assert (auto.lr, auto.min_lr) == ("auto", "auto")
    got, said = resolve(auto, 2.5e-4)
    assert (got.lr, got.min_lr) == (2.5e-4, 2.5e-5) and "the source's recorded peak" in said
    got, said = resolve(auto, None)
    assert (got.lr, got.min_lr) == (PRETRAINED_LR, PRETRAINED_LR / 10) == (3e-5, 3e-6) and "records none" in said
    fixed = load_run_config(None, ["schedule.lr=1e-3", "schedule.min_lr=1e-5"]).schedule
    assert resolve(fixed, 2.5e-4)[0] == fixed  # a number is kept, whatever the source says
    for override, words in (("schedule.lr=fast", "schedule.lr: must be a number or auto"),
                            ("train.divergence_factor=0.5", "train.divergence_factor: must be above 1")):
        with pytest.raises(InputError, match=words):
            load_run_config(None, [override])


def test_recorded_lr_reads_megatron_args_and_scalegrow_runs(tmp_path):
    import argparse

    from scalegrow.formats.base import MemoryReader
    from scalegrow.train.starts import recorded_lr

    from helpers import family_config

    cfg = family_config("llama")
    assert recorded_lr(MemoryReader.of({}, cfg, args=argparse.Namespace(lr=6e-4))) == 6e-4
    assert recorded_lr(MemoryReader.of({}, cfg, args=argparse.Namespace(lr=None))) is None
    assert recorded_lr(MemoryReader.of({}, cfg)) is None


def test_divergence_guard_stops_on_nan_and_on_a_loss_far_above_its_start(tmp_path):
    from scalegrow.train.guard import DivergenceGuard, Diverged

    guard = DivergenceGuard(2.0, 3e-3, tmp_path / "checkpoints", reference=3.8)
    guard.check(5, 7.5)  # under 2 x 3.8
    with pytest.raises(Diverged, match=r"step 6: the training loss 13\.4 is over 2 x 3\.8.*no checkpoint was saved"):
        guard.check(6, 13.4)
    guard.last_saved = 5
    with pytest.raises(Diverged, match=r"step 7: the validation loss is nan.*step 5 in .*checkpoints.*peak 0\.003"):
        guard.check(7, float("nan"), "validation loss")
    DivergenceGuard(None, 1.0, tmp_path).check(1, float("inf"))  # no guard: nothing stops


def test_train_batch_size_is_checked(tmp_path):
    cfg = load_run_config(None, ["train.micro_batch_size=4", "train.gradient_accumulation_steps=2"])
    assert deepspeed_config(cfg, world_size=2, gpu=False)["train_batch_size"] == 16
    cfg = load_run_config(None, ["train.micro_batch_size=4", "deepspeed.config={train_batch_size: 12}"])
    with pytest.raises(InputError, match=r"train_batch_size: 12 != micro_batch_size 4 × gradient_accumulation_steps"
                                         r" 1 × data parallel 2 = 8"):
        deepspeed_config(cfg, world_size=2, gpu=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and indexed datasets from 300 kB of the embedded corpus."""
    out = tmp_path_factory.mktemp("data")
    docs = list(embedded_documents(300_000))
    model = train_tokenizer(docs, out / "tok", vocab_size=400)
    counts = build_indexed(docs, load_tokenizer(model), out / "corpus", valid_fraction=0.1)
    return out, docs, model, counts


def test_embedded_corpus_is_deterministic():
    a, b = list(embedded_documents(200_000)), list(embedded_documents(200_000))
    assert a == b and len(a) > 5 and sum(map(len, a)) >= 200_000


def test_indexed_dataset_round_trip(corpus):
    out, docs, model, counts = corpus
    tok = load_tokenizer(model)
    assert tok.get_piece_size() == 400 and counts["train"] > 10 * counts["valid"] > 0
    train = TokenStream(out / "corpus_train", seq_length=64)
    assert train.num_samples == (counts["train"] - 1) // 64
    stream = np.concatenate([train.dataset[i] for i in range(len(train.dataset))])
    for sample in (0, 1, train.num_samples // 2, train.num_samples - 1):  # windows cross documents
        assert torch.equal(train.window(sample), torch.from_numpy(stream[sample * 64: sample * 64 + 65].astype(np.int64)))
    first_doc = [d for i, d in enumerate(docs) if not is_valid_document(i, 0.1)][0]
    assert tok.decode(train.dataset[0].tolist()[:-1]) == first_doc  # lossless tokenization, EOD appended
    assert train.dataset[0][-1] == tok.eos_id()


def test_batch_order_is_a_function_of_the_step():
    order = BatchOrder(num_samples=1000, micro_batch_size=4, accumulation=2, data_parallel=2, seed=7)
    step = [order.samples(5, m, r) for m in range(2) for r in range(2)]
    assert len({s for group in step for s in group}) == 16  # no sample twice within a step
    again = BatchOrder(num_samples=1000, micro_batch_size=4, accumulation=2, data_parallel=2, seed=7)
    assert again.samples(5, 1, 1) == order.samples(5, 1, 1)
    epoch = [s for st in range(1000 // 16) for m in range(2) for r in range(2) for s in order.samples(st, m, r)]
    assert len(set(epoch)) == len(epoch)  # an epoch is a permutation
    assert BatchOrder(1000, 4, 2, 2, seed=8).samples(5, 1, 1) != order.samples(5, 1, 1)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_documents_from_datasets(tmp_path, kind):
    docs = ["The first document.", "A second one, longer than the first.", "Third."]
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    else:
        import datasets

        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(path))
    assert [d.strip() for d in load_documents(str(path), 0)] == docs


def test_bad_corpus(tmp_path):
    with pytest.raises(InputError, match="no such corpus file"):
        load_documents(str(tmp_path / "missing.txt"), 0)
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported corpus type"):
        load_documents(str(tmp_path / "c.csv"), 0)


def test_shipped_run_configs_are_valid():
    """Every configs/runs/*.yaml loads, its model resolves, and each growth pair is one LEMON accepts."""
    from pathlib import Path

    from scalegrow.core.config import ModelConfig
    from scalegrow.methods import registry as methods

    root = Path(__file__).resolve().parents[1]
    runs = sorted((root / "configs/runs").glob("*.yaml"))
    assert len(runs) >= 5
    by_output = {}
    for path in runs:
        cfg = load_run_config(path)
        by_output[cfg.output.dir] = cfg
    for path in runs:
        cfg = load_run_config(path)
        if cfg.model:
            cfg.model_config()
        if cfg.growth.target and cfg.init.from_:
            source_run = by_output[str(Path(cfg.init.from_).parent)]
            small = ModelConfig.from_yaml(root / source_run.model)
            target = ModelConfig.from_yaml(root / cfg.growth.target, base=small)
            methods.build_operator(cfg.growth.method, methods.GROW, small, target)


def test_clean_gcide():
    import subprocess
    import sys
    from pathlib import Path

    raw = ("00-database-info\n   This file was converted\n\n"
           "Abdicator \\Ab\"di*ca`tor\\, n.\n   One who abdicates.\n   [1913 Webster]\n\n"
           "Abditive \\Ab\"di*tive\\, a. [L. abditivus, fr. abdere to hide.]\n"
           "   Having the quality of hiding. [R.] --Bailey.\n   [1913 Webster]\n")
    tool = Path(__file__).resolve().parents[1] / "tools/clean_gcide.py"
    out = subprocess.run([sys.executable, str(tool)], input=raw, capture_output=True, text=True, check=True).stdout
    assert out == ("Abdicator , n. One who abdicates.\n\n"
                   "Abditive , a. [L. abditivus, fr. abdere to hide.] Having the quality of hiding. --Bailey.\n\n")
