"""Does growth still pay at real token budgets? (issue 28) The growth_savings race at 0.25, 2, 8 and 20
tokens per parameter of the large model, and grown optimizer state against LEMON's re-warmup.

    bash tools/get_corpus.sh && python tools/bench/token_budgets.py --seeds 0 1 [--out DIR]
    python tools/bench/token_budgets.py --quick          # a smoke test of a minute

Per seed: pretrain the small GPT once, at its own budget (20 tokens per its parameter, cosine), keeping
Adam's state. Then at every budget, for the same number of large-model steps: scratch (cosine, 5%
warmup), and the small model grown by LEMON or by HyperCloning then stacking (G_stack's operator needs
the same width: HyperCloning widens first), each trained on LEMON's schedule (the same peak LR, 5%
re-warmup, decayed over 60% of the run); LEMON once more without the re-warmup, and twice with Adam's
moments and step count grown with the weights (`scalegrow.write.moments`), without and with the re-warmup;
and LEMON's weights on scratch's cosine schedule (LEMON's faster decay, or the initialisation?). Savings are
the large-model compute each grown run needs to reach scratch's final validation loss, without and with
the small model's pretraining; the loss gap is each run's final loss minus scratch's, at the same
large-model compute. Every finished run is cached under --out/runs; prints JSON, writes plots beside it.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scalegrow.commands import load_model  # noqa: E402
from scalegrow.core.counts import flops_per_token, num_parameters  # noqa: E402
from scalegrow.formats import optimizer as optimizer_state  # noqa: E402
from scalegrow.methods import registry as methods  # noqa: E402
from scalegrow.write import moments  # noqa: E402

import growth_savings as gs  # noqa: E402
import savings_report as report  # noqa: E402

# the large model: 4 x 64 (0.32 M parameters with a 1024-piece vocabulary), the small one 2 x 32 (0.09 M)
FULL = replace(gs.FULL, small=dict(num_layers=2, hidden_size=32, ffn_hidden_size=88, num_attention_heads=2,
                                   num_query_groups=1, kv_channels=16),
               large=dict(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                          num_query_groups=2, kv_channels=16),
               corpus_bytes=24_000_000, vocab_size=1024, threads=1, eval_batches=16)
QUICK = replace(gs.QUICK, threads=1)
BUDGETS = {"full": (0.25, 2.0, 8.0, 20.0), "quick": (0.25, 0.5)}
SMALL_TOKENS_PER_PARAM = {"full": 20.0, "quick": 1.0}  # the small model's own budget, the same at every large one
EVALS = 24  # evaluations per run, besides the early ones below
EARLY = frozenset({1, 2, 5, 10, 20, 50, 100})  # where a grown run's loss spikes, if it does
METHODS = ("scratch", "lemon", "hypercloning+stack", "lemon-no-rewarmup", "lemon+adam", "lemon+adam+rewarmup",
           "lemon-cosine")


class Seed(gs.Seed):
    """One seed's runs: the small model at runs/seed{s}/small.json, each budget's in tpp{x}/."""

    @property
    def mode(self) -> str:
        return "quick" if self.b is QUICK else "full"

    def steps_for(self, tokens_per_param: float, cfg) -> int:
        return max(8, round(tokens_per_param * num_parameters(cfg) / (self.b.micro_batch_size * self.b.seq_length)))

    def small_model(self) -> dict:
        def make():
            steps = self.steps_for(SMALL_TOKENS_PER_PARAM[self.mode], self.small)
            b = replace(self.b, eval_interval=max(1, steps // EVALS))
            history, model = gs.train(self.small, None, "cosine", steps, self.data, b, self.seed, "small",
                                      keep_adam=self.ckpt / "small.adam.pt")
            self.save(model, self.small, "small")
            history["steps"] = steps
            return history
        return self.cached("small", make)

    def at_budget(self, tokens_per_param: float) -> "Budgeted":
        return Budgeted(self, tokens_per_param)

    def run_all(self) -> dict:
        small = self.small_model()
        budgets = BUDGETS[self.mode]
        return {"small": small, "budgets": {str(x): self.at_budget(x).run_all() for x in budgets}}


class Budgeted(gs.Seed):
    """The large-model runs of one seed at one budget (cached under runs/seed{s}/tpp{x}/)."""

    def __init__(self, seed: Seed, tokens_per_param: float):
        steps = seed.steps_for(tokens_per_param, seed.large)
        b = replace(seed.b, large_steps=steps, eval_interval=max(1, steps // EVALS))
        super().__init__(seed.runs.parents[1], seed.seed, b, seed.data)
        self.runs = seed.runs / f"tpp{tokens_per_param:g}"
        self.early = frozenset(s for s in EARLY if s < steps)

    def train(self, name: str, state, schedule: str, **kw) -> dict:
        history, _ = gs.train(self.large, state, schedule, self.b.large_steps, self.data, self.b, self.seed, name,
                              evals_at=self.early, **kw)
        return history

    def run(self, name: str) -> dict:
        def make():
            if name == "scratch":
                return self.train(name, None, "cosine")
            method = "hypercloning+stack" if name == "hypercloning+stack" else "lemon"
            state = self.grow_only(method)
            if name == "lemon-no-rewarmup":
                return self.train(name, state, "lemon", warmup_steps=0)
            if name == "lemon-cosine":  # scratch's schedule: is it the initialisation or LEMON's faster decay?
                return self.train(name, state, "cosine")
            if name.startswith("lemon+adam"):
                op, _ = methods.build_operator("lemon", methods.GROW, self.small, self.large, seed=self.seed)
                adam = moments.grow(op, optimizer_state.load(self.ckpt / "small.adam.pt"))
                return self.train(name, state, "lemon", adam=adam,
                                  **({} if name.endswith("rewarmup") else {"warmup_steps": 0}))
            return self.train(name, state, "lemon")
        return self.cached(name, make)

    def grow_only(self, method: str) -> dict:
        """The grown weights (growth_savings' growth through `scalegrow grow`), before any training."""
        return load_model(self.grow_large(method)[0]).state_dict()

    def run_all(self) -> dict:
        return {"steps": self.b.large_steps, "runs": {m: self.run(m) for m in METHODS}}


# ---- report -----------------------------------------------------------------------------------------
def spike(run: dict, steps: int) -> tuple[float, int | None]:
    """How far the validation loss rises above its start in the first 10% of the run (at least 100 steps:
    twice a 5% warmup), and the first evaluation after that peak at which it is back at or below its
    start (0: it never rose; None: never back)."""
    points = sorted((int(k), v) for k, v in run["val"].items())
    start = points[0][1]
    early = [(k, v) for k, v in points if 0 < k <= max(100, steps // 10)]
    peak_step, peak = max(early, key=lambda kv: kv[1], default=(0, start))
    if peak <= start:
        return peak - start, 0
    return peak - start, next((k for k, v in points if k > peak_step and v <= start), None)


def summarise(results: dict[int, dict], run: Seed) -> dict:
    b, small, large = run.b, run.small, run.large
    tokens = b.micro_batch_size * b.seq_length
    large_f, small_f = flops_per_token(large, b.seq_length), flops_per_token(small, b.seq_length)
    budgets = {}
    for x in next(iter(results.values()))["budgets"]:
        rows = []
        for res in results.values():
            small_total = res["small"]["steps"] * tokens * small_f
            at = res["budgets"][x]["runs"]
            seed_rows = report.growth_rows(at, {}, tokens, large_f, small_total)
            for row in seed_rows:
                row["final_gap"] = row["final_val"] - report.final_val(at["scratch"])
                row["spike"], row["recovered"] = spike(at[row["method"]], res["budgets"][x]["steps"])
            rows.append(seed_rows)
        budgets[x] = {"steps": next(iter(results.values()))["budgets"][x]["steps"], "rows": rows,
                      **{key: report.aggregate(rows, key) for key in ("saved", "saved_with_small", "final_gap",
                                                                         "spike", "recovered")}}
    return {"budget": asdict(b), "seeds": list(results), "small_tokens_per_param": SMALL_TOKENS_PER_PARAM[run.mode],
            "small": {"params": num_parameters(small), "flops_per_token": small_f,
                      "steps": [r["small"]["steps"] for r in results.values()],
                      "final_val": [report.final_val(r["small"]) for r in results.values()]},
            "large": {"params": num_parameters(large), "flops_per_token": large_f}, "budgets": budgets}


def plot(summary: dict, path: Path) -> None:
    """Saved compute (without and with the small model's pretraining) and the final loss gap against
    tokens per parameter, one line per method: the mean over seeds, the bars their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(summary["budgets"], key=float)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = [("saved", "large-model compute saved (%)", 100), ("saved_with_small", "saved, small pretraining "
              "included (%)", 100), ("final_gap", "final val loss - scratch's (nats)", 1)]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label, scale) in zip(axes, panels):
        for i, method in enumerate(METHODS[1:]):
            agg = [summary["budgets"][x][key].get(method, {}) for x in xs]
            pts = [(float(x), a) for x, a in zip(xs, agg) if a.get("mean") is not None]
            missed = [float(x) for x, a in zip(xs, agg) if a.get("mean") is None]
            ax.errorbar([p[0] for p in pts], [scale * a["mean"] for _, a in pts],
                        yerr=[[scale * (a["mean"] - a["min"]) for _, a in pts], [scale * (a["max"] - a["mean"])
                                                                                   for _, a in pts]],
                        marker="o", capsize=3, color=colours[i % 10], label=method, alpha=0.85)
            if missed and key != "final_gap":  # never reached scratch's final loss: marked below zero
                ax.scatter(missed, [-8 - 3 * i] * len(missed), marker="x", color=colours[i % 10])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("tokens per parameter of the large model")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-60, 60)  # 0.25 tokens/param (small pretraining 5x the run) is off the scale
    axes[1].annotate("0.25: -404%\n(small pretraining\n5x the run)", (0.25, -60), xytext=(0.3, -50), fontsize=7)
    for ax in axes[:2]:
        ax.text(0.02, 0.02, "x: never reached scratch's final loss", transform=ax.transAxes, fontsize=7)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Growth {summary['small']['params'] / 1e6:.2f}M -> {summary['large']['params'] / 1e6:.2f}M "
                 f"params against the token budget (dict-gcide, {len(summary['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: dict) -> str:
    def steps(agg: dict) -> str:
        if not agg or agg.get("mean") is None:
            return "never"
        return f"{agg['mean']:.0f} ({agg['min']} … {agg['max']})" + ("" if agg["reached"].split("/")[0] ==
                                                                    agg["reached"].split("/")[1] else " some never")

    def cell(agg: dict, pct: bool) -> str:
        if not agg or agg.get("mean") is None:
            return f"not reached ({agg.get('reached', '-')})"
        f = (lambda v: f"{100 * v:+.1f}%") if pct else (lambda v: f"{v:+.3f}")
        reached, seeds = agg["reached"].split("/")
        return f"{f(agg['mean'])} ({f(agg['min'])} … {f(agg['max'])})" + (
            f" [reached in {reached} of {seeds} seeds]" if reached != seeds else "")
    lines = ["| tokens/param | steps | method | saved | saved incl. small | final loss − scratch "
             "| spike (first 10%) | back at its start loss (step) |", "|---|---|---|---|---|---|---|---|"]
    for x, at in sorted(summary["budgets"].items(), key=lambda kv: float(kv[0])):
        for method in METHODS[1:]:
            lines.append(f"| {x} | {at['steps']} | {method} | {cell(at['saved'].get(method, {}), True)} | "
                         f"{cell(at['saved_with_small'].get(method, {}), True)} | "
                         f"{cell(at['final_gap'].get(method, {}), False)} | "
                         f"{cell(at['spike'].get(method, {}), False)} | {steps(at['recovered'].get(method, {}))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    results, run, out = gs.run_seeds(Seed, argv, __doc__, "token_budgets", FULL, QUICK)
    summary = summarise(results, run)
    plot(summary, out / "token_budgets.png")
    report.write_json(out / "results.json", summary)
    (out / "results.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out / 'results.json'}, results.md and {out / 'token_budgets.png'}")
    return summary


if __name__ == "__main__":
    main()
