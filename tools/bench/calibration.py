"""Subcloning's calibration time per token at two model sizes, against a plain forward pass through
the same layers over the same tokens on the same device (the baseline, in the same run), as JSON lines.

    python tools/bench/calibration.py [--device cpu|cuda] [--tokens 8192] [--quick]

Each model is a random llama-like checkpoint written to disk (TP1/PP1): the calibration reads it one
layer at a time, as `scalegrow shrink` does. Figures: seconds per 1k tokens of the statistics pass
(`calibrate`, in micro-batches of `BATCH_TOKENS`, and once more with every token at once) and of the
rescale pass (`mlp_output_scales`), and each as a multiple of the forward pass.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from scalegrow.commands import save_model
from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import num_parameters
from scalegrow.core.device import resolve
from scalegrow.core.model import GPT, init_weights
from scalegrow.formats.registry import load_model, open_checkpoint
from scalegrow.methods import calibration
from scalegrow.methods.subclone import calibrate, mlp_output_scales
from scalegrow.operators.subclone import Subclone

LLAMA = dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
             untie_embeddings_and_output_weights=True, padded_vocab_size=32000, max_position_embeddings=256)
SIZES = {
    "small (6 x 256)": dict(num_layers=6, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                            num_query_groups=2),
    "medium (12 x 768)": dict(num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
                              num_query_groups=4),
}
QUICK = {"tiny (2 x 64)": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                               num_query_groups=2)}


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(name: str, shape: dict, tokens: int, seq: int, device: torch.device, work: Path) -> dict:
    cfg = ModelConfig.from_dict({**LLAMA, **shape})
    model = GPT(cfg)
    init_weights(model, 0)
    save_model(model.state_dict(), cfg, work / name)
    reader = open_checkpoint(work / name)
    windows = torch.randint(0, cfg.padded_vocab_size, (tokens // seq, seq), generator=torch.Generator().manual_seed(0))
    gpt = load_model(work / name).to(device)
    with torch.no_grad():  # the baseline: the same layers' forward pass (no logits), micro-batched alike
        gpt.hidden_states(windows[:1].to(device))  # warm up
        forward, _ = timed(lambda: [gpt.hidden_states(windows[s].to(device)) for s in calibration.spans(windows)])
    stats_s, stats = timed(lambda: calibrate(reader, windows, device))
    default, calibration.BATCH_TOKENS = calibration.BATCH_TOKENS, 10**9  # the same pass, every token at once
    whole_s, _ = timed(lambda: calibrate(reader, windows, device))
    calibration.BATCH_TOKENS = default
    half = cfg.replace(hidden_size=cfg.hidden_size // 2, ffn_hidden_size=cfg.mlp.ffn_hidden_size // 2)
    op = Subclone(cfg, half)
    op.select(stats)
    rescale_s, _ = timed(lambda: mlp_output_scales(reader, windows, op.sel, device))
    n = windows.numel()
    return {"model": name, "params": num_parameters(cfg), "device": str(device), "tokens": n,
            "forward_s_per_1k": 1000 * forward / n, "calibrate_s_per_1k": 1000 * stats_s / n,
            "rescale_s_per_1k": 1000 * rescale_s / n, "calibrate_whole_batch_s_per_1k": 1000 * whole_s / n,
            "micro_batch_tokens": calibration.BATCH_TOKENS, "calibrate_over_forward": stats_s / forward,
            "rescale_over_forward": rescale_s / forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="one tiny model, 512 tokens: a smoke test")
    args = parser.parse_args()
    device = resolve(args.device)
    sizes, tokens = (QUICK, 512) if args.quick else (SIZES, args.tokens)
    with tempfile.TemporaryDirectory() as work:
        for name, shape in sizes.items():
            print(json.dumps(measure(name, shape, tokens, args.seq_length, device, Path(work))), flush=True)


if __name__ == "__main__":
    main()
