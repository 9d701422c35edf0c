"""Compute saved by growing a pretrained GPT instead of training the large one from scratch (issue 7),
and training steps saved by subcloning a small GPT out of a trained large one, on dict-gcide.

    bash tools/get_corpus.sh && python tools/bench/growth_savings.py [--seeds 0 1] [--out DIR]
    python tools/bench/growth_savings.py --quick          # ~3 minutes; CI's smoke test

Per seed: pretrain the small GPT (cosine) -> grow it with every method (`scalegrow grow`'s own code
path, checkpoints on disk; LiGO trains its operator first) -> train every grown model (LEMON's
schedule: the same peak LR, decayed over 60% of the run) and a scratch large model (cosine) for the
same steps -> the compute each needs to reach scratch's final validation loss. Then shrink the
trained scratch model back to the small shape (`scalegrow shrink`: subclone, drop-layers) and race
both against a random init of the small model.

Methods that grow only one dimension are paired: HyperCloning (width only) widens first, then
StackBERT or LLaMA-Pro (depth only) deepens, so every row reaches the same large model.

Training is a plain single-process PyTorch loop with DeepSpeed's CPU optimizer settings (torch
AdamW, betas 0.9/0.95, weight decay 0.01, clip 1.0) and the package's schedules and batch order; on
two cores it is faster than two gloo ranks. Every finished run is cached under --out/runs, so an
interrupted benchmark picks up where it stopped. Prints the results JSON; writes plots next to it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scalegrow.commands import DataOptions, grow, load_model, save_model, shrink  # noqa: E402
from scalegrow.core.config import ModelConfig  # noqa: E402
from scalegrow.core.counts import flops_per_token, num_parameters
from scalegrow.core.model import GPT, init_weights  # noqa: E402
from scalegrow.core.sharding import padded_vocab_size  # noqa: E402
from scalegrow.data import (  # noqa: E402
    BatchOrder,
    TokenStream,
    batch,
    build_indexed,
    load_documents,
    load_tokenizer,
    train_tokenizer,
)
from scalegrow.formats import optimizer as optimizer_state  # noqa: E402
from scalegrow.methods import registry as methods  # noqa: E402
from scalegrow.train.config import ScheduleConfig  # noqa: E402
from scalegrow.train.distill import DistillConfig, DistilledGPT  # noqa: E402
from scalegrow.train.schedule import learning_rate  # noqa: E402

import savings_report as report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAMILY = dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
              untie_embeddings_and_output_weights=True, add_bias_linear=False)
# name -> the growth operators applied in turn (a one-dimension method is paired with HyperCloning)
GROWTH = {"lemon": ["lemon"], "ligo": ["ligo"], "bert2bert-aki": ["bert2bert-aki"],
          "hypercloning+stack": ["hypercloning", "stack"], "hypercloning+llama-pro": ["hypercloning", "llama-pro"]}
# name -> (shrink method, LR scale); the subcloning paper advises a lower LR than scratch's
SHRINK = {"subclone": ("subclone", 1.0), "drop-layers": ("drop-layers", 1.0), "subclone-lr0.25": ("subclone", 0.25)}


@dataclass
class Budget:
    small: dict  # Megatron names of the small model (LLaMA-style FAMILY added)
    large: dict
    corpus_bytes: int
    vocab_size: int
    seq_length: int
    micro_batch_size: int
    small_steps: int  # pretraining of the small model
    large_steps: int  # every large run, scratch and grown
    shrunk_steps: int  # the subcloned and drop-layers runs
    random_steps: int  # random init of the small model (longer, to measure how long it needs)
    ligo_steps: int
    eval_interval: int
    eval_batches: int
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_fraction: float = 0.05
    calib_tokens: int = 16384
    threads: int = 2


FULL = Budget(small=dict(num_layers=4, hidden_size=96, ffn_hidden_size=256, num_attention_heads=4,
                         num_query_groups=2, kv_channels=24),
              large=dict(num_layers=8, hidden_size=192, ffn_hidden_size=512, num_attention_heads=8,
                         num_query_groups=4, kv_channels=24),
              corpus_bytes=12_000_000, vocab_size=4096, seq_length=128, micro_batch_size=16,
              small_steps=600, large_steps=600, shrunk_steps=400, random_steps=1600, ligo_steps=100, eval_interval=25,
              eval_batches=12)
QUICK = Budget(small=dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                          num_query_groups=1, kv_channels=16),
               large=dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                          num_query_groups=2, kv_channels=16),
               corpus_bytes=400_000, vocab_size=512, seq_length=64, micro_batch_size=8,
               small_steps=30, large_steps=30, shrunk_steps=20, random_steps=40, ligo_steps=5, eval_interval=10, eval_batches=2)


def model_config(shape: dict, b: Budget, vocab: int) -> ModelConfig:
    """`vocab`: the tokenizer's size, padded by Megatron's rule."""
    return ModelConfig.from_dict(dict(**shape, **FAMILY, padded_vocab_size=padded_vocab_size(vocab, 128, 1), vocab_size=vocab,
                       max_position_embeddings=max(256, b.seq_length)))


# ---- data --------------------------------------------------------------------------------------------
@dataclass
class Data:
    train: TokenStream
    valid: TokenStream
    prefix: Path  # the indexed dataset (`{prefix}_{train,valid}`), for LiGO and calibration
    tokenizer: Path
    vocab_size: int


def prepare_data(out: Path, corpus: Path, b: Budget) -> Data:
    """A sentencepiece tokenizer and indexed train/valid splits of the first `corpus_bytes` of text."""
    prefix, done = out / "data" / "corpus", out / "data" / "done"
    if not done.is_file():
        docs = list(_first_bytes(load_documents(str(corpus), 0), b.corpus_bytes))
        tok = train_tokenizer(docs, out / "data" / "tokenizer", b.vocab_size)
        counts = build_indexed(docs, load_tokenizer(tok), prefix, valid_fraction=0.02)
        done.write_text(json.dumps(counts))
    tok = out / "data" / "tokenizer.model"
    train, valid = (TokenStream(f"{prefix}_{s}", b.seq_length) for s in ("train", "valid"))
    return Data(train, valid, prefix, tok, load_tokenizer(tok).get_piece_size())


def _first_bytes(docs, limit: int):
    total = 0
    for doc in docs:
        yield doc
        total += len(doc.encode())
        if total >= limit:
            return


# ---- training ----------------------------------------------------------------------------------------
def train(cfg: ModelConfig, state: dict | None, schedule: str, steps: int, data: Data, b: Budget, seed: int,
          desc: str, first_batch: int = 0, teacher: GPT | None = None,
          distill: DistillConfig | None = None, adam: optimizer_state.AdamMoments | None = None,
          warmup_steps: int | None = None, keep_adam: Path | None = None,
          evals_at: frozenset[int] = frozenset()) -> tuple[dict, GPT]:
    """AdamW with DeepSpeed's CPU settings; val loss at step 0, every eval_interval and at the end.
    Batches are the seed's order from `first_batch` on (a continued run sees new tokens). With a
    `teacher`, the training loss distills it (`distill`'s alpha, temperature, top_k); val loss is
    the plain next-token loss either way, and the KL and CE are logged at each evaluation. `adam`:
    Adam's state to start from (a grown one); `keep_adam`: where to save Adam's final state;
    `evals_at`: more steps to evaluate at (e.g. early ones, where a grown run may spike)."""
    train_stream, valid = data.train, data.valid
    model = GPT(cfg) if teacher is None else DistilledGPT(cfg, teacher, distill)
    if state is None:
        init_weights(model, seed)
    else:
        model.load_state_dict(state, strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=b.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    if adam is not None:
        optimizer_state.into_torch(opt, model, adam)
    warmup = max(1, round(b.warmup_fraction * steps)) if warmup_steps is None else warmup_steps
    sched = ScheduleConfig(name=schedule, lr=b.lr, min_lr=b.min_lr, warmup_steps=warmup)
    order = BatchOrder(train_stream.num_samples, b.micro_batch_size, 1, 1, seed)
    history, began = {"val": {0: evaluate(model, valid, b)}, "train": {}}, time.time()
    for step in tqdm(range(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, sched, steps)
        loss = model.loss(batch(train_stream, order.samples(first_batch + step, 0, 0)))  # + MoE aux in training
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history["train"][step + 1] = loss.item()
        if (step + 1) % b.eval_interval == 0 or step + 1 == steps or step + 1 in evals_at:
            history["val"][step + 1] = evaluate(model, valid, b)
            if teacher is not None:
                history.setdefault("distill", {})[step + 1] = model.last_losses
    history["seconds"] = round(time.time() - began, 1)
    if keep_adam is not None:
        keep_adam.parent.mkdir(parents=True, exist_ok=True)
        optimizer_state.save(optimizer_state.from_torch(opt, model), keep_adam)
    return history, model


@torch.no_grad()
def evaluate(model: GPT, valid: TokenStream, b: Budget) -> float:
    """Mean loss over the same held-out windows every time, spread evenly over the valid split."""
    model.eval()
    n = min(valid.num_samples, b.eval_batches * b.micro_batch_size)
    picks = [i * valid.num_samples // n for i in range(n)]
    losses = [model.loss(batch(valid, picks[i:i + b.micro_batch_size])).item()
              for i in range(0, n, b.micro_batch_size)]
    model.train()
    return sum(losses) / len(losses)


# ---- one seed ----------------------------------------------------------------------------------------
class Seed:
    """Every run of one seed, cached as runs/seed{seed}/{name}.json under `out`."""

    def __init__(self, out: Path, seed: int, b: Budget, data: Data):
        self.seed, self.b, self.data, self.tokenizer = seed, b, data, data.tokenizer
        self.runs, self.ckpt = out / "runs" / f"seed{seed}", out / "ckpt" / f"seed{seed}"
        self.small = model_config(b.small, b, data.vocab_size)
        self.large = model_config(b.large, b, data.vocab_size)

    def cached(self, name: str, make) -> dict:
        path = self.runs / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = make()
        report.write_json(path, result)
        return result

    def save(self, model: GPT, cfg: ModelConfig, name: str) -> Path:
        path = self.ckpt / name
        save_model({k: v.detach() for k, v in model.state_dict().items()}, cfg, path, overwrite=True)
        (path / "tokenizer.model").write_bytes(self.tokenizer.read_bytes())
        return path

    def pretrain(self, name: str, cfg: ModelConfig, steps: int, eval_interval: int | None = None) -> dict:
        def make():
            b = replace(self.b, eval_interval=eval_interval or self.b.eval_interval)
            history, model = train(cfg, None, "cosine", steps, self.data, b, self.seed, name)
            self.save(model, cfg, name)
            return history
        return self.cached(name, make)

    def target_yaml(self, cfg: ModelConfig, name: str) -> Path:
        path = self.ckpt / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        return path

    def grow_large(self, method: str) -> tuple[Path, dict]:
        """The small checkpoint grown to the large shape by `method`'s operators in turn (`scalegrow grow`'s
        own path, checkpoints on disk): the last checkpoint and what LiGO's operator recorded."""
        src, extra = self.ckpt / "small", {}
        data = DataOptions(str(self.data.prefix), str(self.tokenizer), self.b.seq_length, self.b.micro_batch_size)
        ops = GROWTH[method]
        for k, op in enumerate(ops):
            last = k == len(ops) - 1
            cfg = self.large if last else self.large.replace(num_layers=self.small.num_layers)
            dst = self.ckpt / (method if last else f"{method}.{k}")
            grow(src, dst, op, self.target_yaml(cfg, f"{method}.{k}"), seed=self.seed, overwrite=True,
                 progress=False, options=methods.options_with(op, methods.GROW, steps=self.b.ligo_steps),
                 data=data)
            extra.update(json.loads((dst / "scalegrow.json").read_text())["details"].get("ligo", {}))
            src = dst
        return src, extra

    def grown(self, method: str) -> dict:
        def make():
            path, extra = self.grow_large(method)
            model = load_model(path)
            history, _ = train(model.cfg, model.state_dict(), "lemon", self.b.large_steps, self.data, self.b,
                               self.seed, method)
            history["ligo_steps"] = self.b.ligo_steps if "ligo" in GROWTH[method] else 0
            history["ligo"] = extra
            return history
        return self.cached(method, make)

    def shrunk(self, name: str) -> dict:
        method, lr_scale = SHRINK[name]

        def make():
            dst = self.ckpt / f"shrunk-{method}"
            if not (dst / "scalegrow.json").is_file():
                data = DataOptions(str(self.data.prefix), str(self.tokenizer), self.b.seq_length)
                shrink(self.ckpt / "scratch", dst, method, self.target_yaml(self.small, "shrunk"),
                       options=methods.options_with(method, methods.SHRINK, tokens=self.b.calib_tokens), data=data,
                       overwrite=True, progress=False)
            model = load_model(dst)
            b = replace(self.b, lr=self.b.lr * lr_scale, min_lr=self.b.min_lr * lr_scale)
            history, _ = train(model.cfg, model.state_dict(), "cosine", b.shrunk_steps, self.data, b, self.seed,
                               f"shrunk-{name}")
            return history
        return self.cached(f"shrunk-{name}", make)

    def random_small(self) -> dict:
        return self.cached("shrunk-random", lambda: train(self.small, None, "cosine", self.b.random_steps,
                                                          self.data, self.b, self.seed, "random")[0])

    def run_all(self) -> dict:
        small = self.pretrain("small", self.small, self.b.small_steps)
        growth = {"scratch": self.pretrain("scratch", self.large, self.b.large_steps)}
        growth.update({m: self.grown(m) for m in GROWTH})
        shrunk = {"random": self.random_small(), **{m: self.shrunk(m) for m in SHRINK}}
        return {"small": small, "growth": growth, "shrink": shrunk}


# ---- report -----------------------------------------------------------------------------------------
def summarise(results: dict[int, dict], b: Budget, small: ModelConfig, large: ModelConfig) -> dict:
    tokens = b.micro_batch_size * b.seq_length
    large_f, small_f = flops_per_token(large, b.seq_length), flops_per_token(small, b.seq_length)
    small_total = b.small_steps * tokens * small_f
    growth, shrunk = [], []
    for seed, res in results.items():
        extra = {m: r.get("ligo_steps", 0) for m, r in res["growth"].items()}
        growth.append(report.growth_rows(res["growth"], extra, tokens, large_f, small_total))
        shrunk.append(report.shrink_rows(res["shrink"]))
    return {
        "budget": asdict(b), "seeds": list(results),
        "small": {"params": num_parameters(small), "flops_per_token": small_f, "pretrain_flops": small_total,
                  "final_val": [report.final_val(r["small"]) for r in results.values()]},
        "large": {"params": num_parameters(large), "flops_per_token": large_f,
                  "params_ratio": num_parameters(large) / num_parameters(small),
                  "scratch_flops": b.large_steps * tokens * large_f},
        "growth": growth, "shrink": shrunk,
        "growth_saved": report.aggregate(growth, "saved"),
        "growth_saved_with_small": report.aggregate(growth, "saved_with_small"),
        "shrink_speedup": report.aggregate(shrunk, "speedup"),
    }


def plots(results: dict[int, dict], summary: dict, b: Budget, out: Path) -> list[Path]:
    tokens = b.micro_batch_size * b.seq_length
    pflops = tokens * summary["large"]["flops_per_token"] / 1e15
    curves = {m: {s: r["growth"][m] for s, r in results.items()} for m in ["scratch", *GROWTH]}
    target = summary["growth"][0][0]["target_val"]
    shift = {f"{m}.shift": results[next(iter(results))]["growth"][m].get("ligo_steps", 0) for m in GROWTH}
    paths = [out / "growth_savings.png", out / "subcloning.png"]
    report.plot(curves, {"scale": pflops, **shift}, target,
                f"Grown vs scratch: {summary['small']['params'] / 1e6:.1f}M -> {summary['large']['params'] / 1e6:.1f}M "
                f"params, dict-gcide", "large-model training compute (PFLOPs)", paths[0])
    curves = {m: {s: r["shrink"][m] for s, r in results.items()} for m in ["random", *SHRINK]}
    report.plot(curves, {}, None,
                f"Small model ({summary['small']['params'] / 1e6:.1f}M) from a trained large one vs random init",
                "training steps", paths[1])
    return paths


def setup(argv: list[str] | None, doc: str, name: str, full: Budget,
          quick: Budget) -> tuple[list[int], Budget, Path, Data]:
    """(seeds, budget, output directory, data) from the command line of a benchmark on this corpus:
    --quick, --seeds, --out (default runs/NAME[_quick]), --corpus (fetched if missing)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and budgets: a smoke test of minutes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=None, help=f"default: runs/{name}[_quick]")
    p.add_argument("--corpus", type=Path, default=ROOT / "data" / "gcide.txt")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the budget's); 1 each lets two seeds run side by side")
    args = p.parse_args(argv)
    b = quick if args.quick else full
    out = args.out or ROOT / "runs" / (f"{name}_quick" if args.quick else name)
    torch.set_num_threads(args.threads or b.threads)
    if not args.corpus.is_file():
        subprocess.run(["bash", str(ROOT / "tools" / "get_corpus.sh"), str(args.corpus)], check=True)
    return args.seeds, b, out, prepare_data(out, args.corpus, b)


def run_seeds(seed_type: type[Seed], argv: list[str] | None, doc: str, name: str, full: Budget,
              quick: Budget) -> tuple[dict[int, dict], Seed, Path]:
    """Every seed's runs (`seed_type(...).run_all()`, cached), the last seed's runner (for the
    configs and budget) and the output directory, from a benchmark's command line (`setup`)."""
    seeds, b, out, data = setup(argv, doc, name, full, quick)
    runners = {seed: seed_type(out, seed, b, data) for seed in seeds}
    return {seed: run.run_all() for seed, run in runners.items()}, runners[seeds[-1]], out


def main(argv: list[str] | None = None) -> dict:
    results, run, out = run_seeds(Seed, argv, __doc__, "growth_savings", FULL, QUICK)
    b = run.b
    summary = summarise(results, b, run.small, run.large)
    summary["plots"] = [str(p) for p in plots(results, summary, b, out)]
    report.write_json(out / "results.json", summary)
    (out / "results.md").write_text(report.markdown(summary))
    print(json.dumps({k: summary[k] for k in ("growth_saved", "growth_saved_with_small", "shrink_speedup")},
                     indent=1))
    print(report.markdown(summary))
    print(f"wrote {out / 'results.json'}, results.md and {', '.join(summary['plots'])}")
    return summary


if __name__ == "__main__":
    main()
