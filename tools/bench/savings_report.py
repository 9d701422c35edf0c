"""Figures for `growth_savings.py`: training FLOPs, steps to a target loss, savings, plots, a table.

FLOPs per token are `ModelConfig.flops_per_token` (Kaplan et al. 2020, §2.1; training = 3 × forward):
    6 · N + 6 · num_layers · seq_length · (num_attention_heads · kv_channels)
where N counts every matmul weight a token passes through: the transformer layers (in an MoE layer
the router and the top-k experts) and the output layer (the input embedding is a lookup, not a
matmul). Every large-model run has the same N and tokens per step, so compute is proportional to steps; LiGO's operator steps run the large model
forward and backward and are counted at the same rate.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def start_val(history: dict) -> float:
    """A run's val loss at its first evaluation (JSON keys are strings, so steps sort as ints)."""
    return history["val"][min(history["val"], key=int)]


def final_val(history: dict) -> float:
    """A run's val loss at its last evaluation."""
    return history["val"][max(history["val"], key=int)]


def steps_to(val: dict[int, float], target: float) -> float | None:
    """First step at which the validation curve reaches `target`, interpolated linearly between
    evaluations; None if it never does."""
    points = sorted((int(k), v) for k, v in val.items())
    for i, (step, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return float(step)
            s0, l0 = points[i - 1]
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
    return None


def growth_rows(runs: dict[str, dict], extra_steps: dict[str, int], tokens_per_step: int,
                large_flops: float, small_flops_total: float) -> list[dict]:
    """One row per method: steps and FLOPs to reach scratch's final val loss, fraction saved."""
    scratch = runs["scratch"]
    target = final_val(scratch)
    base = steps_to(scratch["val"], target)
    rows = []
    for name, run in runs.items():
        reach = steps_to(run["val"], target)
        extra = extra_steps.get(name, 0)
        row = {"method": name, "final_val": final_val(run), "start_val": start_val(run), "target_val": target,
               "steps_to_target": reach, "extra_steps": extra, "seconds": run["seconds"]}
        if reach is not None:
            flops = (reach + extra) * tokens_per_step * large_flops
            small = small_flops_total if name != "scratch" else 0.0
            row["flops_to_target"] = flops
            row["saved"] = 1.0 - (reach + extra) / base
            row["saved_with_small"] = 1.0 - (flops + small) / (base * tokens_per_step * large_flops)
        rows.append(row)
    return rows


def shrink_rows(runs: dict[str, dict]) -> list[dict]:
    """Subcloning, as the paper measures it: for each initialisation, the steps random init needs to
    reach that run's final val loss, over the steps the run itself took (speed-up). Random init
    trains longer; if it never gets there, its whole budget gives a lower bound."""
    random = runs["random"]
    budget = max(random["val"], key=int)
    rows = []
    for name, run in runs.items():
        target = final_val(run)
        own, rand = steps_to(run["val"], target), steps_to(random["val"], target)
        rows.append({"method": name, "start_val": start_val(run), "final_val": target,
                     "steps": own, "random_steps_to_final": rand,
                     "speedup": rand / own if rand is not None and own else None,
                     "speedup_at_least": None if rand is not None or not own else int(budget) / own})
    return rows


def aggregate(per_seed: list[list[dict]], key: str) -> dict[str, dict]:
    """Mean, min and max of `key` per method over seeds (seeds that never reach count as missing)."""
    out = {}
    for rows in per_seed:
        for row in rows:
            out.setdefault(row["method"], []).append(row.get(key))
    summary = {}
    for method, values in out.items():
        got = [v for v in values if v is not None]
        summary[method] = {"mean": statistics.fmean(got) if got else None, "min": min(got, default=None),
                           "max": max(got, default=None), "reached": f"{len(got)}/{len(values)}"}
    return summary


def plot(curves: dict[str, dict[str, dict]], x_scale: dict[str, float], target: float | None, title: str,
         xlabel: str, path: Path) -> None:
    """Val-loss curves, one colour per method, one line per seed; `x_scale` maps steps to the x unit
    (and shifts runs that spent compute before step 0, such as LiGO's operator)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, seeds) in enumerate(curves.items()):
        for j, (seed, run) in enumerate(seeds.items()):
            points = sorted((int(k), v) for k, v in run["val"].items())
            shift, scale = x_scale.get(f"{method}.shift", 0.0), x_scale.get("scale", 1.0)
            ax.plot([(s + shift) * scale for s, _ in points], [v for _, v in points], color=colours[i % 10],
                    alpha=0.9 if j == 0 else 0.45, lw=1.6 if method in ("scratch", "random") else 1.2,
                    label=method if j == 0 else None)
    if target is not None:
        ax.axhline(target, color="black", ls="--", lw=0.8, label="target: the baseline's final (first seed)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    low = min(v for seeds in curves.values() for run in seeds.values() for v in run["val"].values())
    ax.set_ylim(low - 0.1, low + 2.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def markdown(summary: dict) -> str:
    """The tables of docs/RESULTS.md: per-method means over seeds (and their range)."""
    def cell(agg: dict, pct: bool) -> str:
        if agg["mean"] is None:
            return f"not reached ({agg['reached']})"
        f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.2f}×")
        spread = f" ({f(agg['min'])} – {f(agg['max'])})" if agg["min"] != agg["max"] else ""
        reached, seeds = agg["reached"].split("/")
        return f"{f(agg['mean'])}{spread}" + (f" [reached in {agg['reached']} seeds]" if reached != seeds else "")

    def mean(rows_per_seed, method, key):
        values = [r[key] for rows in rows_per_seed for r in rows if r["method"] == method and r.get(key) is not None]
        return sum(values) / len(values) if values else None

    g, s = summary["growth"], summary["shrink"]
    lines = ["| method | val loss at step 0 | final val loss | steps to target | compute saved | "
             "saved incl. small pretraining |", "|---|---|---|---|---|---|"]
    for method, agg in summary["growth_saved"].items():
        steps = mean(g, method, "steps_to_target")
        extra = mean(g, method, "extra_steps") or 0
        lines.append(f"| {method} | {mean(g, method, 'start_val'):.3f} | {mean(g, method, 'final_val'):.3f} | "
                     + (f"{steps:.0f}" if steps is not None else "—") + (f" + {extra:.0f} operator" if extra else "")
                     + f" | {cell(agg, True)} | {cell(summary['growth_saved_with_small'][method], True)} |")
    lines += ["", "| init | val loss at step 0 | val loss after its steps | random-init steps to that loss | "
              "speed-up |", "|---|---|---|---|---|"]
    for method, agg in summary["shrink_speedup"].items():
        rand = mean(s, method, "random_steps_to_final")
        bound = mean(s, method, "speedup_at_least")
        speed = cell(agg, False) if agg["mean"] is not None else (f"> {bound:.1f}×" if bound else "—")
        lines.append(f"| {method} | {mean(s, method, 'start_val'):.3f} | {mean(s, method, 'final_val'):.3f} | "
                     + (f"{rand:.0f}" if rand is not None else "not within budget") + f" | {speed} |")
    return "\n".join(lines) + "\n"
