"""Knowledge distillation: the chunked loss and its closed-form gradients equal autograd's on whole
logits; training runs (pretrain and grow_pretrain, ZeRO 1 and 3) log distill/kl and distill/ce,
count the teacher's FLOPs, and a student that computes its teacher's function starts at KL 0."""
import json

import pytest
import torch
import torch.nn.functional as F

from scalegrow import cli
from scalegrow.commands import load_model, save_model
from scalegrow.core.counts import flops_per_token
from scalegrow.errors import InputError
from scalegrow.train.distill import DistillConfig, DistilledGPT, distill_loss

from helpers import family_config, random_model
from training import scalars, train


def reference(hidden, weight, t_hidden, t_weight, labels, opts: DistillConfig):
    """The textbook loss on whole logits, differentiated by autograd."""
    logits = hidden @ weight.T
    teacher = t_hidden @ t_weight.T
    vocab = logits.shape[-1]
    teacher = teacher[:, :vocab] if teacher.shape[-1] >= vocab else F.pad(
        teacher, (0, vocab - teacher.shape[-1]), value=float("-inf"))
    T = opts.temperature
    if opts.top_k:
        values, index = teacher.topk(opts.top_k, dim=-1)
        p = torch.zeros_like(teacher).scatter(-1, index, torch.softmax(values / T, -1))
    else:
        p = torch.softmax(teacher / T, -1)
    ce = F.cross_entropy(logits, labels)
    kl = (torch.xlogy(p, p) - p * torch.log_softmax(logits / T, -1)).sum(-1).mean() * T**2
    return (1 - opts.alpha) * ce + opts.alpha * kl, ce, kl


@pytest.mark.parametrize("opts, teacher_vocab", [
    (DistillConfig(alpha=0.5, temperature=1.0, chunk_tokens=7), 40),
    (DistillConfig(alpha=0.7, temperature=2.0, chunk_tokens=1024), 48),  # a more padded teacher vocabulary
    (DistillConfig(alpha=1.0, temperature=1.5, top_k=5, chunk_tokens=3), 40),
    (DistillConfig(alpha=0.3, temperature=1.0, chunk_tokens=16), 36),  # a less padded one: missing rows are -inf
])
def test_chunked_loss_and_gradients_equal_autograd_on_whole_logits(opts, teacher_vocab):
    gen = torch.Generator().manual_seed(0)
    n, h, ht, vocab = 50, 16, 24, 40
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(vocab, h, generator=gen) * 0.3
    t_hidden, t_weight = torch.randn(n, ht, generator=gen), torch.randn(teacher_vocab, ht, generator=gen) * 0.3
    labels = torch.randint(0, 36, (n,), generator=gen)
    ours = [x.clone().requires_grad_() for x in (hidden, weight)]
    theirs = [x.clone().requires_grad_() for x in (hidden, weight)]
    loss, ce, kl = distill_loss(*ours, t_hidden, t_weight, labels, opts)
    want, want_ce, want_kl = reference(*theirs, t_hidden, t_weight, labels, opts)
    assert (loss.item(), ce.item(), kl.item()) == pytest.approx((want.item(), want_ce.item(), want_kl.item()),
                                                                rel=1e-5)
    (2.0 * loss).backward()
    (2.0 * want).backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_a_student_equal_to_its_teacher_has_zero_kl():
    cfg = family_config("llama", num_layers=2)
    teacher = random_model(cfg, seed=3)
    student = DistilledGPT(cfg, teacher, DistillConfig(alpha=0.5, temperature=2.0, chunk_tokens=10))
    student.load_state_dict(teacher.state_dict())
    student.train()
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = student(tokens[:, :-1], tokens[:, 1:])
    assert student.last_losses["kl"] == pytest.approx(0.0, abs=1e-6)
    ce = F.cross_entropy(teacher(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert student.last_losses["lm"] == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * ce, rel=1e-5)
    assert set(student.state_dict()) == set(teacher.state_dict())  # the teacher is not part of the student
    assert all(not p.requires_grad for p in teacher.parameters())
    student.eval()
    assert student(tokens[:, :-1], tokens[:, 1:]).item() == pytest.approx(ce, rel=1e-5)  # val/loss: plain CE


@pytest.mark.parametrize("key, value, words", [("alpha", 1.5, "distill.alpha: must be in [0, 1]"),
                                               ("temperature", 0.0, "distill.temperature: must be > 0"),
                                               ("top_k", 0, "distill.top_k: must be >= 1")])
def test_bad_distill_options_are_named(key, value, words):
    with pytest.raises(InputError, match=words.replace("[", r"\[").replace("]", r"\]")):
        DistillConfig(**{key: value}).check()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """tiny_scratch trained 12 steps and exported: a teacher, its data and its tokenizer."""
    out = tmp_path_factory.mktemp("teacher") / "small"
    train("pretrain", "configs/runs/tiny_scratch.yaml", [f"output.dir={out}", "train.steps=12",
                                                        "train.eval_interval=12", "train.save_interval=12"])
    return out


def data_of(run) -> list[str]:
    return [f"data.corpus={run}/data/corpus", f"data.tokenizer={run}/data/tokenizer.model"]


def test_a_grown_student_starts_at_kl_zero_with_zero3(teacher, tmp_path):
    """grow_pretrain (LEMON: the grown model computes the teacher's function) distilling from its own
    source under ZeRO-3: the first step's KL is fp32 noise, the CE is the LM loss, FLOPs count the
    teacher's forward passes."""
    out = tmp_path / "grown"
    train("grow_pretrain", "configs/runs/tiny_lemon.yaml",
          [f"output.dir={out}", f"init.from={teacher / 'export'}", f"distill.teacher={teacher / 'export'}",
           "distill.alpha=0.5", "distill.temperature=2.0", "distill.chunk_tokens=100", "deepspeed.zero_stage=3",
           "train.steps=3", "train.eval_interval=3", "train.save_interval=3", *data_of(teacher)])
    s = scalars(out / "tensorboard")
    assert s["distill/kl"][1] == pytest.approx(0.0, abs=1e-5)
    assert s["distill/kl"][3] > 1e-4  # the copies move apart: the student is no longer the teacher
    assert s["distill/ce"] == s["train/loss"]
    grown, small = (load_model(p).cfg for p in (out / "export", teacher / "export"))
    tokens = 8 * 2 * 128  # micro batch x ranks x sequence
    per_step = tokens * (flops_per_token(grown, 128) + flops_per_token(small, 128, training=False))
    assert s["train/flops"][3] == pytest.approx(3 * per_step, rel=1e-6)
    assert json.loads((out / "summary.json").read_text())["flops"] == pytest.approx(3 * per_step, rel=1e-9)


def test_a_student_from_scratch_learns_from_a_larger_teacher(teacher, tmp_path):
    """pretrain with ZeRO-1, the teacher twice the student's depth and width (LEMON-grown from the
    trained small model): the KL falls, and the top-k target works the same way."""
    big = tmp_path / "big"
    assert cli.main(["grow", "--src", str(teacher / "export"), "--dst", str(big), "--target",
                     "configs/models/gpt-tiny-grown.yaml", "--no-progress"]) == 0
    out = tmp_path / "student"
    train("pretrain", "configs/runs/tiny_scratch.yaml",
          [f"output.dir={out}", f"distill.teacher={big}", "distill.alpha=0.9", "distill.top_k=32",
           "train.steps=12", "train.eval_interval=12", "train.save_interval=12", *data_of(teacher)])
    s = scalars(out / "tensorboard")
    assert sorted(s["distill/kl"]) == list(range(1, 13))
    kl = [s["distill/kl"][i] for i in range(1, 13)]
    assert sum(kl[-3:]) / 3 < 0.7 * sum(kl[:3]) / 3, kl
    assert s["val/loss"][12] < s["val/loss"][0] - 0.5


def test_a_teacher_with_another_tokenizer_is_refused(teacher, tmp_path):
    cfg = family_config("llama", num_layers=2, vocab_size=77)
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "other")
    result = train("pretrain", "configs/runs/tiny_scratch.yaml",
                   [f"output.dir={tmp_path / 'run'}", f"distill.teacher={tmp_path / 'other'}", "train.steps=1",
                    *data_of(teacher)], check=False)
    assert result.returncode != 0
    assert f"distill.teacher: {tmp_path / 'other'} has vocab_size 77 but the student has 512" \
        in result.stdout + result.stderr
