"""The README's Llama-3.2 example, as written, on a model with Llama-3.2-1B's real config values.

    python tools/bench/hf_growth.py [--workdir DIR] [--keep]

Source: Llama-3.2-1B's config.json values (16 layers, hidden 2048, 32 heads in 8 KV groups of 64, SwiGLU
8192, vocab 128256 tied, rope base 500000 with `llama3` scaling: factor 32, low 1, high 4, original
8192; 131072 positions, rms eps 1e-5; 1.24 B params), random weights in bf16, written as an HF
directory by `scalegrow init` + `convert --format hf`. Target: 28 layers, hidden 3072, 48 heads in 8
groups (3.12 B params, Llama-3.2-3B-sized). Child processes (peak RSS from wait4): the `--dry-run`
plan; the growth HF -> HF in bf16, 5 GB shards, against `cp -r` of its output; then the README's
commands in order: the growth with `--dtype fp32`, `verify` (exit 0: the same function) and the
conversion to Megatron at TP2/PP2. Prints one JSON line per case.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from convert import bench_setup, measure, run_measured  # noqa: E402  (the same measurement as the Megatron cases)

SOURCE = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
              kv_channels=64, padded_vocab_size=128256, vocab_size=128256, max_position_embeddings=8192,
              normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True, position_embedding_type="rope",
              rotary_base=500000, untie_embeddings_and_output_weights=False, add_bias_linear=False,
              use_rope_scaling=True, rope_scaling_factor=32.0, rope_scaling_low_freq_factor=1.0,
              rope_scaling_high_freq_factor=4.0, rope_scaling_original_max_position_embeddings=8192)
SOURCE["max_position_embeddings"] = 131072
TARGET = dict(num_layers=28, hidden_size=3072, num_attention_heads=48, num_query_groups=8)


def main() -> None:
    args, work, exe = bench_setup(__doc__)
    (work / "llama-1b.yaml").write_text(yaml.safe_dump(SOURCE))
    (work / "llama-3b.yaml").write_text(yaml.safe_dump(TARGET))
    if not (work / "llama-1b-hf").is_dir():
        shutil.rmtree(work / "llama-1b-megatron", ignore_errors=True)
        subprocess.run(exe + ["init", "--target", str(work / "llama-1b.yaml"), "--dst", str(work / "llama-1b-megatron"),
                              "--dtype", "bf16"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(exe + ["convert", "--src", str(work / "llama-1b-megatron"), "--dst", str(work / "llama-1b-hf"),
                              "--format", "hf", "--hf-model-type", "llama", "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(work / "llama-1b-megatron")
    grow = ["grow", "--src", str(work / "llama-1b-hf"), "--target", str(work / "llama-3b.yaml"), "--format", "hf"]
    seconds, peak = run_measured(exe + grow + ["--dst", str(work / "plan"), "--dry-run"])
    print(json.dumps({"case": "LEMON 1B -> 3B-shaped, --dry-run (plan only)", "seconds": round(seconds, 2),
                      "peak_rss_bytes": peak}), flush=True)
    shutil.rmtree(work / "llama-3b-hf", ignore_errors=True)
    print(json.dumps(measure(exe, work, "LEMON grow Llama-3.2-1B-shaped -> 3B-shaped, HF -> HF, bf16, 5 GB shards",
                             "llama-1b-hf", "llama-3b-hf", grow[:1] + grow[3:])), flush=True)
    rope = json.loads((work / "llama-3b-hf" / "config.json").read_text())["rope_parameters"]
    print(json.dumps({"case": "the grown config.json's rope", "rope_parameters": rope}), flush=True)
    shutil.rmtree(work / "llama-3b-hf")  # the README's commands: grown in fp32, verified, converted
    fp32 = work / "llama-3b-hf-fp32"
    for name, command in (
            ("README: grow --dtype fp32 (LEMON exact to fp32 noise)", grow + ["--dtype", "fp32", "--dst", str(fp32),
                                                                              "--no-progress"]),
            ("README: verify (exit 0: SAME)", ["verify", "--src", str(work / "llama-1b-hf"), "--dst", str(fp32)]),
            ("README: convert to Megatron TP2/PP2", ["convert", "--src", str(fp32), "--dst",
                                                     str(work / "llama-3b-megatron"), "--format", "torch", "--tp", "2",
                                                     "--pp", "2", "--no-progress"])):
        seconds, peak = run_measured(exe + command)  # exits non-zero (and stops here) unless it worked
        print(json.dumps({"case": name, "seconds": round(seconds, 2), "peak_rss_bytes": peak}), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
