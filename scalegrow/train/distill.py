"""Knowledge distillation (Hinton et al. 2015, arXiv 1503.02531 §2; Minitron, arXiv 2407.14679 §3.2):
the student learns from a frozen teacher's next-token distribution as well as from the data,

    loss = (1 - alpha) * CE(student, next token) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))

Neither model's logits are ever whole. `distill_loss` walks the tokens in chunks: for each it
computes both models' logits from their final hidden states, the two losses, and their gradient
with respect to the student's logits in closed form (softmax minus target), which it turns at once
into gradients for the student's hidden states and output weight. Memory holds one chunk of
[tokens, vocabulary] at a time, whatever the vocabulary. With `top_k`, the teacher's distribution
is its k most likely tokens, renormalised. The teacher lives outside the student's module tree, so
ZeRO (1, 2 or 3) never partitions it and checkpoints hold the student alone; each rank loads it once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT
from scalegrow.errors import InputError
from scalegrow.formats.registry import load_model


@dataclass
class DistillConfig:
    teacher: str | None = None  # any checkpoint scalegrow reads; None: no distillation
    alpha: float = 0.5  # weight of the KL; the next-token CE gets 1 - alpha
    temperature: float = 1.0
    top_k: int | None = None  # the teacher's k most likely tokens only (None: the whole vocabulary)
    chunk_tokens: int = 1024  # tokens whose logits are held at once

    def check(self) -> None:
        for ok, key, message in ((0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]"),
                                 (self.temperature > 0, "temperature", "must be > 0"),
                                 (self.top_k is None or self.top_k >= 1, "top_k", "must be >= 1 (or null)"),
                                 (self.chunk_tokens >= 1, "chunk_tokens", "must be >= 1")):
            if not ok:
                raise InputError(f"distill.{key}: {message}")


def teacher_target(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """The teacher's distribution at `temperature` [tokens, vocab]: zero outside its top k."""
    if top_k is None or top_k >= logits.shape[-1]:
        return torch.softmax(logits / temperature, dim=-1)
    values, index = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter_(-1, index, torch.softmax(values / temperature, dim=-1))


def _aligned(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher's logits over the student's (padded) vocabulary: extra rows dropped, missing
    ones impossible (-inf). Both share one tokenizer; only the padding may differ."""
    if logits.shape[-1] >= vocab:
        return logits[:, :vocab]
    return F.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, labels, alpha, temperature, top_k, chunk):
        # hidden [N, h], weight [V, h], teacher_hidden [N, h_t], teacher_weight [V_t, h_t], labels [N]
        n, w, teacher_w = hidden.shape[0], weight.float(), teacher_weight.float()
        grad_hidden, grad_weight = torch.empty_like(hidden, dtype=torch.float32), torch.zeros_like(w)
        ce, kl = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, n, chunk):
            h, y = hidden[s:s + chunk].float(), labels[s:s + chunk]
            logits = h @ w.T  # [c, V]
            teacher = _aligned(teacher_hidden[s:s + chunk].float() @ teacher_w.T, w.shape[0])
            p = teacher_target(teacher, temperature, top_k)
            log_q1, log_qt = torch.log_softmax(logits, -1), torch.log_softmax(logits / temperature, -1)
            ce += -log_q1.gather(1, y[:, None]).sum()
            kl += (torch.xlogy(p, p) - p * log_qt).sum()
            # d loss / d logits: (1 - a)(softmax(s) - onehot(y)) + a T (softmax(s/T) - p), per token
            d = log_q1.exp().mul_(1 - alpha)
            d[torch.arange(len(y)), y] -= 1 - alpha
            d += (log_qt.exp() - p) * (alpha * temperature)
            d /= n
            grad_hidden[s:s + chunk] = d @ w
            grad_weight += d.T @ h
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        ce, kl = ce / n, kl * temperature**2 / n
        ctx.mark_non_differentiable(ce, kl)
        return (1 - alpha) * ce + alpha * kl, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_loss * grad_hidden, grad_loss * grad_weight, None, None, None, None, None, None, None


def distill_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                 teacher_weight: torch.Tensor, labels: torch.Tensor, opts: DistillConfig):
    """(loss, CE, KL) over N tokens: the student's final hidden states [N, h] and output weight
    [V, h] (gradients flow to both), the teacher's [N, h_t] and [V_t, h_t], the next tokens [N]."""
    return _ChunkedDistill.apply(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), labels,
                                 opts.alpha, opts.temperature, opts.top_k, opts.chunk_tokens)


class DistilledGPT(GPT):
    """The student: a GPT whose training loss distills `teacher`. In eval mode (val/loss) and for
    logits it is the plain GPT; its state dict is the student's alone."""

    def __init__(self, cfg: ModelConfig, teacher: GPT, opts: DistillConfig):
        super().__init__(cfg)
        self._teacher = (teacher.eval().requires_grad_(False),)  # a tuple: not a submodule
        self.opts = opts

    @property
    def teacher(self) -> GPT:
        return self._teacher[0]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None or not self.training:
            return super().forward(tokens, labels)
        hidden = self.hidden_states(tokens)
        teacher = self.teacher.to(hidden.device, hidden.dtype)  # once: a no-op after the first call
        with torch.no_grad():
            teacher_hidden = teacher.hidden_states(tokens)
        loss, ce, kl = distill_loss(hidden.flatten(0, 1), self.output_weight(), teacher_hidden.flatten(0, 1),
                                    teacher.output_weight(), labels.flatten(), self.opts)
        self.last_losses = {"lm": ce.item(), "kl": kl.item()}
        aux = self.moe_aux_loss()
        if aux is not None:
            self.last_losses["moe_aux"] = aux.item()
            loss = loss + self.cfg.moe.aux_loss_coeff * aux
        return loss


def load_teacher(opts: DistillConfig, student: ModelConfig) -> GPT:
    """The frozen teacher in fp32 from any checkpoint scalegrow reads, checked against the student's
    tokenizer (the same vocabulary; the padding may differ)."""
    teacher = load_model(opts.teacher)
    t, s = teacher.cfg, student
    if t.vocab_size and s.vocab_size and t.vocab_size != s.vocab_size:
        raise InputError(f"distill.teacher: {opts.teacher} has vocab_size {t.vocab_size} but the student has "
                         f"{s.vocab_size}; teacher and student must share one tokenizer")
    return teacher


def student(cfg: ModelConfig, opts: DistillConfig) -> GPT:
    """The model a run trains: a `DistilledGPT` when `distill.teacher` names one, else a GPT."""
    if not opts.teacher:
        return GPT(cfg)
    teacher = load_teacher(opts, cfg)
    if cfg.final_softcap is not None or teacher.cfg.final_softcap is not None:
        raise InputError("final_logit_softcapping: distillation computes the logits in chunks without the cap "
                         "(Gemma 2's); distill into or from such a model is not supported")
    return DistilledGPT(cfg, teacher, opts)
