"""Upcycled MoE vs continued dense training vs MoE from scratch, on the same tokens (issue 14).

    bash tools/get_corpus.sh && python tools/bench/moe_upcycle.py [--seeds 0 1] [--out DIR]
    python tools/bench/moe_upcycle.py --quick          # ~1 minute; CI's smoke test

Per seed: pretrain the dense small GPT of growth_savings.py (cosine, `dense_steps`), then continue
for `more_steps` on the next batches of the same order, three ways from that checkpoint:
- `dense-continued`: the dense model itself;
- `upcycle-8x2`: 8 experts (each a copy of the FFN), top-2 (`scalegrow grow --method upcycle`);
- `upcycle-granular`: 4 copies of 2 half-FFN segments = 8 experts of ffn/2, top-2 (granularity 2):
  the same active parameters as the dense model.
Against MoEs of both shapes trained from random init for `dense_steps + more_steps` on the same
batches. Every run uses the same cosine schedule over its own steps and the load-balancing loss
(coefficient 0.01). Compute is training FLOPs with active parameters (ModelConfig.flops_per_token):
an MoE token passes through its router and its top-k experts only; the continued runs also carry
the dense pretraining's FLOPs. Prints the results JSON; writes a plot next to it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scalegrow.commands import grow, load_model  # noqa: E402
from scalegrow.core.counts import flops_per_token, num_active_parameters, num_parameters
from scalegrow.methods import registry as methods  # noqa: E402

import growth_savings as gs  # noqa: E402
import savings_report as report  # noqa: E402

AUX = 0.01
# name -> (MoE fields, upcycling granularity)
SHAPES = {"8x2": (dict(num_moe_experts=8, moe_router_topk=2), 1),
          "granular": (dict(num_moe_experts=8, moe_router_topk=2), 2)}
FULL = replace(gs.FULL, small_steps=600, large_steps=400)  # dense pretraining, continuation
QUICK = replace(gs.QUICK, small_steps=20, large_steps=20)


class Seed(gs.Seed):
    """The runs of one seed (cached as runs/seed{seed}/{name}.json under --out)."""

    def moe_config(self, shape: str):
        fields, g = SHAPES[shape]
        return self.small.replace(**fields, moe_ffn_hidden_size=self.small.mlp.ffn_hidden_size // g,
                                  moe_aux_loss_coeff=AUX)

    def continued(self, name: str, cfg, state: dict) -> dict:
        b = self.b
        return gs.train(cfg, state, "cosine", b.large_steps, self.data, b, self.seed, name, first_batch=b.small_steps)[0]

    def upcycled(self, shape: str) -> dict:
        def make():
            _, g = SHAPES[shape]
            target = self.target_yaml(self.moe_config(shape), f"upcycle-{shape}")
            dst = self.ckpt / f"upcycle-{shape}"
            grow(self.ckpt / "dense", dst, "upcycle", target, seed=self.seed, overwrite=True, progress=False,
                 options=methods.options_with("upcycle", methods.GROW, granularity=g))
            model = load_model(dst)
            return self.continued(f"upcycle-{shape}", model.cfg, model.state_dict())
        return self.cached(f"upcycle-{shape}", make)

    def run_all(self) -> dict:
        b = self.b
        runs = {"dense": self.pretrain("dense", self.small, b.small_steps)}
        dense = load_model(self.ckpt / "dense")
        runs["dense-continued"] = self.cached("dense-continued", lambda: self.continued(
            "dense-continued", self.small, dense.state_dict()))
        for shape in SHAPES:
            runs[f"upcycle-{shape}"] = self.upcycled(shape)
            runs[f"scratch-{shape}"] = self.pretrain(f"scratch-{shape}", self.moe_config(shape),
                                                     b.small_steps + b.large_steps)
        return runs


def summarise(results: dict[int, dict], run: Seed) -> dict:
    """Per run: active/total params, FLOPs per token, final val loss, total training FLOPs (the dense
    pretraining included for continued runs), and the FLOPs each needs to reach the final val loss
    of `dense-continued`."""
    b = run.b
    tokens = b.micro_batch_size * b.seq_length
    configs = {"dense-continued": run.small, **{f"{k}-{s}": run.moe_config(s) for s in SHAPES
                                                for k in ("upcycle", "scratch")}}
    dense_flops = b.small_steps * tokens * flops_per_token(run.small, b.seq_length)
    rows = []
    for name, cfg in configs.items():
        per_token = flops_per_token(cfg, b.seq_length)
        pre = 0.0 if name.startswith("scratch") else dense_flops
        finals, reach = [], []
        for runs in results.values():
            target = report.final_val(runs["dense-continued"])
            finals.append(report.final_val(runs[name]))
            steps = report.steps_to(runs[name]["val"], target)
            reach.append(None if steps is None else pre + steps * tokens * per_token)
        got = [r for r in reach if r is not None]
        steps = b.large_steps if pre else b.small_steps + b.large_steps
        rows.append({"run": name, "params": num_parameters(cfg), "active_params": num_active_parameters(cfg),
                     "flops_per_token": per_token, "final_val": sum(finals) / len(finals),
                     "final_val_per_seed": finals, "total_flops": pre + steps * tokens * per_token,
                     "flops_to_dense_continued_final": sum(got) / len(got) if len(got) == len(reach) else None})
    return {"budget": {"dense_steps": b.small_steps, "more_steps": b.large_steps, "tokens_per_step": tokens,
                       "aux_loss_coeff": AUX, "seeds": sorted(results)},
            "dense": {"params": num_parameters(run.small), "pretrain_flops": dense_flops,
                      "final_val": [report.final_val(r["dense"]) for r in results.values()]},
            "rows": rows}


def plot(results: dict[int, dict], summary: dict, run: Seed, path: Path) -> None:
    """Val loss against total training FLOPs (active parameters); continued runs start where the
    dense pretraining ended. One colour per run, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = run.b.micro_batch_size * run.b.seq_length
    dense = ("dense (pretraining)", 0.0, flops_per_token(run.small, run.b.seq_length), "dense")
    lines = [dense] + [(r["run"], 0.0 if r["run"].startswith("scratch") else summary["dense"]["pretrain_flops"],
                        r["flops_per_token"], r["run"]) for r in summary["rows"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, pre, per_token, key) in enumerate(lines):
        for j, r in enumerate(results.values()):
            points = sorted((int(k), v) for k, v in r[key]["val"].items())
            ax.plot([(pre + s * tokens * per_token) / 1e12 for s, _ in points], [v for _, v in points],
                    color=f"C{i}", alpha=0.9 if j == 0 else 0.45, lw=1.3, ls=":" if "scratch" in label else "-",
                    label=label if j == 0 else None)
    ax.set_xlabel("training compute, active-parameter TFLOPs (dense pretraining included)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Dense {num_parameters(run.small) / 1e6:.2f}M upcycled to MoE vs continued vs MoE from scratch")
    low = min(r["final_val"] for r in summary["rows"])
    ax.set_ylim(low - 0.1, low + 1.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: dict) -> str:
    lines = ["| run | params (active) | final val loss | total TFLOPs | TFLOPs to dense-continued's final |",
             "|---|---|---|---|---|"]
    for r in summary["rows"]:
        reach = "never" if r["flops_to_dense_continued_final"] is None else f"{r['flops_to_dense_continued_final'] / 1e12:.4f}"
        lines.append(f"| {r['run']} | {r['params'] / 1e6:.2f}M ({r['active_params'] / 1e6:.2f}M) | "
                     f"{r['final_val']:.4f} | {r['total_flops'] / 1e12:.4f} | {reach} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    results, run, out = gs.run_seeds(Seed, argv, __doc__, "moe_upcycle", FULL, QUICK)
    summary = summarise(results, run)
    summary["plot"] = str(out / "moe_upcycle.png")
    plot(results, summary, run, Path(summary["plot"]))
    report.write_json(out / "results.json", summary)
    print(json.dumps(summary, indent=1))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
