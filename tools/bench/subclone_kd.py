"""Subcloning from a strong parent, with and without knowledge distillation (issue 16).

    bash tools/get_corpus.sh && python tools/bench/subclone_kd.py [--seeds 0 1] [--threads 1]
    python tools/bench/subclone_kd.py --quick          # ~1 minute; CI's smoke test

growth_savings.py subcloned a weak parent: its large model, trained 600 steps, ended worse than the
small model trained 1600 steps from random init, so there was little to inherit. Here, per seed:

1. **parent**: the large GPT of growth_savings.py trained `large_steps` (cosine), twice random
   init's steps;
2. **target**: the small GPT from random init trained `random_steps` (cosine); its final val loss is
   the finish line;
3. **students**, each trained `shrunk_steps` (cosine, the same LR) from four initialisations,
   with and without logit distillation from the parent (Minitron, arXiv 2407.14679 §3.2: KL on the
   logits alone, alpha 1, T 1; `scalegrow/train/distill.py`):
   - `subclone`: `scalegrow shrink --method subclone` (arXiv 2312.09299) of the parent;
   - `drop-layers`: `scalegrow shrink --method drop-layers`, the unranked baseline;
   - `random`: the target run's own initialisation;
   - `subclone-width`: subclone to the shape `shrink --params` picks at the small model's parameter
     count (Minitron's rule: every layer kept, the width narrowed).

Speed-up = random_steps / the steps a student needs to reach the target (interpolated between
evaluations). A student's curve runs on a cosine over shrunk_steps, so mid-run it is still at a
high LR: reading its crossing off that curve understates the speed-up, never overstates it. FLOPs
(ModelConfig.flops_per_token): a student step costs 3 forward passes of the student per token, and
with distillation one forward pass of the teacher more. The parent's own training is reported
apart: it is the sunk cost that subcloning and distillation reuse. Every finished run is cached
under --out/runs, so an interrupted benchmark resumes. Prints the results JSON; writes a plot.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scalegrow.commands import DataOptions, load_model, shrink  # noqa: E402
from scalegrow.core.config import ModelConfig  # noqa: E402
from scalegrow.core.counts import flops_per_token, num_parameters
from scalegrow.methods import budget  # noqa: E402
from scalegrow.methods import registry as methods
from scalegrow.train.distill import DistillConfig  # noqa: E402

import growth_savings as gs  # noqa: E402
import savings_report as report  # noqa: E402

# large_steps: the parent's; random_steps: the target run's; shrunk_steps: every student's
FULL = replace(gs.FULL, small_steps=0, large_steps=3200, random_steps=1600, shrunk_steps=800, ligo_steps=0)
QUICK = replace(gs.QUICK, small_steps=0, large_steps=80, random_steps=40, shrunk_steps=20, ligo_steps=0)
KD = DistillConfig(alpha=1.0, temperature=1.0)  # Minitron's logit-only distillation
INITS = ("subclone", "drop-layers", "random", "subclone-width")  # subclone-width: Minitron's shape rule
RUNS = tuple(f"{init}{kd}" for init in INITS for kd in ("", "+kd"))


class Seed(gs.Seed):
    """The runs of one seed (cached as runs/seed{seed}/{name}.json under --out)."""

    def parent(self) -> dict:
        """The large model, evaluated 16 times (its curve is context; the race is the students')."""
        b = self.b
        return self.pretrain("parent", self.large, b.large_steps, max(b.eval_interval, b.large_steps // 16))

    def shape(self, init: str) -> ModelConfig:
        """A student's shape: the small model's, or for `subclone-width` the one `shrink --params`
        picks at the small model's parameter count (every layer kept, the width narrowed)."""
        return budget.shape_for(self.large, num_parameters(self.small)) if init == "subclone-width" else self.small

    def initial_state(self, init: str) -> dict | None:
        """A student's starting weights: shrunk from the parent, or None (random init)."""
        if init == "random":
            return None
        dst, method = self.ckpt / f"shrunk-{init}", init.removesuffix("-width")
        if not (dst / "scalegrow.json").is_file():
            data = DataOptions(str(self.data.prefix), str(self.tokenizer), self.b.seq_length)
            shrink(self.ckpt / "parent", dst, method, self.target_yaml(self.shape(init), init),
                   options=methods.options_with(method, methods.SHRINK, tokens=self.b.calib_tokens), data=data,
                   overwrite=True, progress=False)
        return load_model(dst).state_dict()

    def student(self, name: str) -> dict:
        init, kd = name.removesuffix("+kd"), name.endswith("+kd")

        def make():
            teacher = load_model(self.ckpt / "parent") if kd else None
            b = self.b
            return gs.train(self.shape(init), self.initial_state(init), "cosine", b.shrunk_steps, self.data, b,
                            self.seed, name, teacher=teacher, distill=KD)[0]
        return self.cached(name, make)

    def run_all(self) -> dict:
        runs = {"parent": self.parent(), "target": self.pretrain("target", self.small, self.b.random_steps)}
        runs.update({name: self.student(name) for name in RUNS})
        return runs


def student_rows(runs: dict, b, flops: dict) -> list[dict]:
    """Per student: steps and FLOPs (teacher forward included) to reach the target run's final val
    loss, and the speed-ups over the target run in steps and in FLOPs. `flops`: training FLOPs per
    token of each init's student (`students`), the teacher's forward FLOPs per token."""
    target, tokens = report.final_val(runs["target"]), b.micro_batch_size * b.seq_length
    random_flops = b.random_steps * tokens * flops["students"]["random"]
    rows = []
    for name in RUNS:
        run, kd = runs[name], name.endswith("+kd")
        steps = report.steps_to(run["val"], target)
        per_step = tokens * (flops["students"][name.removesuffix("+kd")] + (flops["teacher_forward"] if kd else 0.0))
        row = {"method": name, "distill": kd, "start_val": report.start_val(run),
               "final_val": report.final_val(run), "target_val": target, "steps_to_target": steps,
               "random_steps_to_final": report.steps_to(runs["target"]["val"], report.final_val(run)),
               "flops_per_step": per_step, "seconds": run["seconds"]}
        if steps:  # 0: below the target before training, where no speed-up is defined
            row.update(speedup=b.random_steps / steps, flops_to_target=steps * per_step,
                       flops_speedup=random_flops / (steps * per_step))
        rows.append(row)
    return rows


def parent_row(runs: dict, b, flops: dict) -> dict:
    """The parent: its final val loss, its val loss after random_steps (the target run's budget in
    steps), and what training it cost."""
    val = {int(k): v for k, v in runs["parent"]["val"].items()}
    at = min(val, key=lambda s: abs(s - b.random_steps))
    return {"final_val": report.final_val(runs["parent"]), "val_at_random_steps": val[at], "at_step": at,
            "target_val": report.final_val(runs["target"]),
            "flops": b.large_steps * b.micro_batch_size * b.seq_length * flops["parent"]}


def summarise(results: dict[int, dict], run: Seed) -> dict:
    b = run.b
    shapes = {init: run.shape(init) for init in INITS}
    flops = {"students": {init: flops_per_token(cfg, b.seq_length) for init, cfg in shapes.items()},
             "parent": flops_per_token(run.large, b.seq_length),
             "teacher_forward": flops_per_token(run.large, b.seq_length, training=False)}
    students = [student_rows(r, b, flops) for r in results.values()]
    return {"budget": asdict(b), "distill": asdict(KD), "seeds": list(results), "flops_per_token": flops,
            "small_params": num_parameters(run.small), "large_params": num_parameters(run.large),
            "shapes": {init: {k: cfg.to_dict()[k] for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                           "num_attention_heads", "num_query_groups")}
                       | {"params": num_parameters(cfg)} for init, cfg in shapes.items()},
            "random_flops": b.random_steps * b.micro_batch_size * b.seq_length * flops["students"]["random"],
            "parent": [parent_row(r, b, flops) for r in results.values()], "students": students,
            "speedup": report.aggregate(students, "speedup"),
            "flops_speedup": report.aggregate(students, "flops_speedup")}


def plot(results: dict[int, dict], summary: dict, path: Path) -> None:
    """Val loss of the target run and every student against steps (left) and against training
    TFLOPs, the teacher's forward passes included (right); one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["method"]: r for r in summary["students"][0]}
    per_step = {"target": rows["random"]["flops_per_step"], **{n: r["flops_per_step"] for n, r in rows.items()}}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for name in ("target", *RUNS):
        colour = "black" if name == "target" else f"C{INITS.index(name.removesuffix('+kd'))}"
        for j, runs in enumerate(results.values()):
            points = sorted((int(k), v) for k, v in runs[name]["val"].items())
            for ax, scale in zip(axes, (1.0, per_step[name] / 1e12)):
                ax.plot([s * scale for s, _ in points], [v for _, v in points], color=colour,
                        ls="-" if name.endswith("+kd") or name == "target" else ":", alpha=0.9 if j == 0 else 0.45,
                        lw=1.4, label=(f"{name} ({summary['budget']['random_steps']} steps)" if name == "target"
                                       else name) if j == 0 else None)
    target = summary["students"][0][0]["target_val"]
    for ax, label in zip(axes, ("student training steps", "training TFLOPs (teacher forward included)")):
        ax.axhline(target, color="black", ls="--", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].set_ylim(target - 0.4, target + 2.0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{summary['small_params'] / 1e6:.2f}M students of a {summary['large_params'] / 1e6:.2f}M parent, "
                 f"with (solid) and without (dotted) distillation; dashed: random init's final (first seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: dict) -> str:
    """The parent per seed, the students' shapes, then one row per student: means over seeds, the
    speed-ups' range in brackets."""
    def mean(method: str, key: str) -> float | None:
        values = [r[key] for rows in summary["students"] for r in rows
                  if r["method"] == method and r.get(key) is not None]
        return sum(values) / len(values) if values else None

    def cell(method: str, key: str) -> str:
        agg = summary[key][method]
        if agg["mean"] is None:
            return "at step 0" if mean(method, "start_val") <= mean(method, "target_val") else "not reached"
        spread = f" ({agg['min']:.2f}× – {agg['max']:.2f}×)" if agg["min"] != agg["max"] else ""
        reached, seeds = agg["reached"].split("/")
        return f"{agg['mean']:.2f}×{spread}" + ("" if reached == seeds else f" [{agg['reached']}]")

    def per_seed(rows: list[dict], key: str) -> str:
        return ", ".join(f"{r[key]:.3f}" for r in rows)

    p = summary["parent"]
    lines = [f"Parent: {summary['large_params'] / 1e6:.2f}M params, {summary['budget']['large_steps']} steps, "
             f"final val {per_seed(p, 'final_val')} (after {p[0]['at_step']} steps: "
             f"{per_seed(p, 'val_at_random_steps')}); the target, random init's final: {per_seed(p, 'target_val')}; "
             f"parent training {p[0]['flops'] / 1e12:.1f} TFLOPs, random init's {summary['random_flops'] / 1e12:.2f}.",
             "", "Students: " + "; ".join(f"{init}: {c['num_layers']} layers, hidden {c['hidden_size']}, FFN "
                                          f"{c['ffn_hidden_size']} ({c['params'] / 1e6:.2f}M)"
                                          for init, c in summary["shapes"].items()) + ".", "",
             "| student | val at step 0 | val after its steps | steps to the target | speed-up in steps | "
             "TFLOPs to the target (teacher incl.) | speed-up in FLOPs | random-init steps to its final |",
             "|---|---|---|---|---|---|---|---|"]
    for method in RUNS:
        steps, tflops, rand = (mean(method, k) for k in ("steps_to_target", "flops_to_target", "random_steps_to_final"))
        cells = [method, f"{mean(method, 'start_val'):.3f}", f"{mean(method, 'final_val'):.3f}",
                 "—" if steps is None else f"{steps:.0f}", cell(method, "speedup"),
                 "—" if tflops is None else f"{tflops / 1e12:.2f}", cell(method, "flops_speedup"),
                 "beyond its budget" if rand is None else f"{rand:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    results, run, out = gs.run_seeds(Seed, argv, __doc__, "subclone_kd", FULL, QUICK)
    summary = summarise(results, run)
    summary["plot"] = str(out / "subclone_kd.png")
    plot(results, summary, Path(summary["plot"]))
    report.write_json(out / "results.json", summary)
    print(json.dumps({k: summary[k] for k in ("speedup", "flops_speedup", "parent")}, indent=1))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
