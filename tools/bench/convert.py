"""Memory and speed of a streaming grow, against the largest output shard, a plain copy and megatron-core.

    python tools/bench/convert.py [--workdir DIR] [--keep] [--rounds N]

Cases: grow a ~1 GB fp32 TP2/PP2 checkpoint (16 layers, hidden 1024) to ~3 GB TP2/PP2 (24 layers,
hidden 1536) with LEMON; then re-partition that output to TP1/PP4, write it as torch_dist and as a
Hugging Face directory (1 GB safetensors shards), and grow an HF copy of the source HF -> HF (TP1/PP1:
one stage, whose layers the workers divide). Each runs with 1 and 2 workers, as the `scalegrow` CLI
in a child process (start-up included, and a `sync` so the bytes are on disk); its peak RSS comes
from wait4() (the largest process: with workers, the largest worker). Baselines: `cp -r` + `sync` of
the output it wrote (the same bytes), and for torch_dist megatron-core's own `dist_checkpointing.save`
of the same model (tools/bench/mcore_save.py; the model already in memory, the save alone timed).
Every case runs `--rounds` times, the cases alternating within each round; one JSON line per run,
then one per case with min/median/max.
Aims: peak RSS <= 1.5 x largest output shard + 0.5 GiB; wall time <= 3 x the copy; 2 workers <= 0.8 x 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

GiB = 2**30
SOURCE = dict(num_layers=16, hidden_size=1024, num_attention_heads=16, num_query_groups=4, kv_channels=64,
              ffn_hidden_size=2816, padded_vocab_size=32000, vocab_size=32000, max_position_embeddings=2048,
              normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
              untie_embeddings_and_output_weights=True, add_bias_linear=False)
TARGET = dict(num_layers=24, hidden_size=1536, num_attention_heads=24, num_query_groups=6, ffn_hidden_size=4224)


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return wall, usage.ru_maxrss * 1024


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(exe: list[str], work: Path, name: str, src: str, dst: str, command: list[str]) -> dict:
    startup, _ = run_measured([sys.executable, "-c", "import scalegrow.cli, scalegrow.commands"])
    os.sync()
    seconds, peak = run_measured(["sh", "-c", " ".join(exe + command[:1] + [
        "--src", str(work / src), "--dst", str(work / dst), "--no-progress"] + command[1:]) + " > /dev/null && sync"])
    shutil.rmtree(work / "copy", ignore_errors=True)
    os.sync()
    copy_s, _ = run_measured(["sh", "-c", f"cp -r {work / dst} {work / 'copy'} && sync"])  # the same bytes, on disk
    shutil.rmtree(work / "copy")
    shards = [p for p in (work / dst).rglob("*") if p.suffix in (".pt", ".distcp", ".safetensors")]
    largest = max(p.stat().st_size for p in shards)
    result = {
        "case": name, "source_bytes": dir_bytes(work / src), "output_bytes": dir_bytes(work / dst),
        "output_shards": len(shards), "largest_output_shard_bytes": largest,
        "peak_rss_bytes": peak, "rss_budget_bytes": int(1.5 * largest + 0.5 * GiB),
        "peak_rss_over_largest_shard": round(peak / largest, 3),
        "seconds": round(seconds, 2), "copy_seconds": round(copy_s, 2),
        "output_gb_per_s": round(dir_bytes(work / dst) / 1e9 / seconds, 3),
        "over_copy": round(seconds / copy_s, 2), "startup_seconds": round(startup, 2),
        "over_copy_after_startup": round((seconds - startup) / copy_s, 2),
    }
    result["rss_aim_met"] = peak <= result["rss_budget_bytes"]
    result["time_aim_met"] = seconds <= 3 * copy_s
    return result


def bench_setup(doc: str, options: Callable[[argparse.ArgumentParser], None] = lambda parser: None
                ) -> tuple[argparse.Namespace, Path, list[str]]:
    """(--workdir/--keep args and a benchmark's own `options`, the work directory, the CLI command)
    shared by the CLI benchmarks."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    options(parser)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scalegrow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    return args, work, [sys.executable, "-m", "scalegrow.cli"]


def cases(work: Path) -> list[tuple[str, str, str, list[str]]]:
    """(name, source, output, command) of every measured case, each with 1 and 2 workers."""
    grow = ["grow", "--target", str(work / "target.yaml")]
    one = [("LEMON grow 16L/h1024 -> 24L/h1536, TP2/PP2 -> TP2/PP2, fp32", "src", "dst", grow),
           ("convert (re-partition only) of the grown model, TP2/PP2 -> TP1/PP4, fp32", "dst", "dst-tp1pp4",
            ["convert", "--tp", "1", "--pp", "4"]),
           ("convert the grown model to torch_dist, TP2/PP2 -> torch_dist, fp32", "dst", "dst-dist",
            ["convert", "--format", "torch_dist"]),
           ("convert the grown model to HF safetensors (1 GB shards), TP2/PP2 -> hf, fp32", "dst", "dst-hf",
            ["convert", "--format", "hf", "--max-shard-size", "1GB"]),
           ("LEMON grow HF -> HF (1 GB shards, TP1/PP1), 16L/h1024 -> 24L/h1536, fp32", "src-hf", "dst-hf-grown",
            grow + ["--format", "hf", "--max-shard-size", "1GB"])]
    # the 1-worker grow writes `dst` itself: every later case reads it
    return [(f"{name}, {w} worker(s)", src, f"{dst}-{w}" if dst != "dst" or w == 2 else dst,
             command + ["--workers", str(w)]) for name, src, dst, command in one for w in (1, 2)]


def megatron_core_save(work: Path) -> dict:
    """megatron-core's save of the grown model to torch_dist (tools/bench/mcore_save.py), and its copy."""
    shutil.rmtree(work / "mcore-dist", ignore_errors=True)
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("mcore_save.py")), str(work / "dst"),
                          str(work / "mcore-dist")], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(work / "copy", ignore_errors=True)
    copy_s, _ = run_measured(["sh", "-c", f"cp -r {work / 'mcore-dist'} {work / 'copy'} && sync"])
    shutil.rmtree(work / "copy")
    return {"case": "megatron-core dist_checkpointing.save of the grown model (in memory) -> torch_dist, fp32",
            "seconds": result["save_seconds"], "copy_seconds": round(copy_s, 2), "output_bytes": result["bytes"],
            "over_copy": round(result["save_seconds"] / copy_s, 2), "files": result["files"]}


def summary(runs: list[dict]) -> dict:
    """min/median/max of a case's runs."""
    out = {"case": runs[0]["case"], "runs": len(runs)}
    for key in ("seconds", "copy_seconds", "over_copy", "peak_rss_bytes"):
        values = sorted(r[key] for r in runs if key in r)
        if values:
            out[key] = {"min": values[0], "median": statistics.median(values), "max": values[-1]}
    return out


def convert_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=1, help="runs of every case, alternating")
    parser.add_argument("--no-megatron-core", dest="megatron_core", action="store_false",
                        help="skip megatron-core's own torch_dist save (needs megatron-core installed)")


def main() -> None:
    args, work, exe = bench_setup(__doc__, convert_options)
    (work / "source.yaml").write_text(yaml.safe_dump(SOURCE))
    (work / "target.yaml").write_text(yaml.safe_dump(TARGET))
    shutil.rmtree(work / "src", ignore_errors=True)
    subprocess.run(exe + ["init", "--target", str(work / "source.yaml"), "--dst", str(work / "src"),
                          "--tp", "2", "--pp", "2"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(exe + ["convert", "--src", str(work / "src"), "--dst", str(work / "src-hf"), "--format", "hf",
                          "--max-shard-size", "1GB", "--overwrite", "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for name, src, dst, command in cases(work):
            shutil.rmtree(work / dst, ignore_errors=True)
            result = measure(exe, work, name, src, dst, command)
            runs.setdefault(name, []).append(result)
            print(json.dumps(result), flush=True)
        if args.megatron_core:
            result = megatron_core_save(work)
            runs.setdefault(result["case"], []).append(result)
            print(json.dumps(result), flush=True)
    for case_runs in runs.values():
        print(json.dumps(summary(case_runs)), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
