"""Max |Δlogits| of LEMON growth per model family and growth shape (fp32), as JSON lines.

    python tools/bench/lossless.py [--seeds 3]

Each source model gets Megatron init plus noise (so norms/biases are not trivial), is grown in
memory, and both models run the same random batch. The figure is the largest difference over seeds.
"""
from __future__ import annotations

import argparse
import json

import torch

from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT, init_weights
from scalegrow.operators.lemon import LemonGrowth
from scalegrow.write.executor import apply

BASE = dict(num_layers=4, hidden_size=128, num_attention_heads=8, ffn_hidden_size=384,
            padded_vocab_size=512, max_position_embeddings=128)
FAMILIES = {
    "gpt2 (LN, GELU, MHA, learned, tied, bias)": dict(normalization="LayerNorm"),
    "llama (RMS, SwiGLU, GQA, rope, untied)": dict(
        normalization="RMSNorm", swiglu=True, num_query_groups=4, position_embedding_type="rope",
        untie_embeddings_and_output_weights=True, add_bias_linear=False),
    "LN+SwiGLU+GQA+rope+tied+qkv-bias": dict(
        swiglu=True, num_query_groups=4, position_embedding_type="rope", add_bias_linear=False, add_qkv_bias=True),
    "RMS+GELU+MHA+learned+untied+bias": dict(normalization="RMSNorm", untie_embeddings_and_output_weights=True),
}
SHAPES = {
    "width 2x": dict(hidden_size=256, num_attention_heads=16, ffn_hidden_size=768),
    "width 1.5x": dict(hidden_size=192, num_attention_heads=12, ffn_hidden_size=576),
    "depth 2x": dict(num_layers=8),
    "depth 3x": dict(num_layers=12),
    "width 1.5x + depth 1.5x": dict(hidden_size=192, num_attention_heads=12, ffn_hidden_size=576, num_layers=6),
}


def measure(family: dict, shape: dict, seed: int) -> float:
    src = ModelConfig.from_dict(dict(**BASE, **family))
    groups = {"num_query_groups": shape.get("num_attention_heads", 8) // 2} if "num_query_groups" in family else {}
    dst = ModelConfig.from_dict({**shape, **groups}, base=src)
    small = GPT(src)
    init_weights(small, seed)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    op = LemonGrowth(src, dst, seed=seed)
    big = GPT(op.dst)
    big.load_state_dict(apply(op, small.state_dict()))
    x = torch.randint(0, src.padded_vocab_size, (4, 128), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (big(x) - small(x)).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    for fname, family in FAMILIES.items():
        for sname, shape in SHAPES.items():
            worst = max(measure(family, shape, s) for s in range(args.seeds))
            print(json.dumps({"family": fname, "growth": sname, "max_abs_diff": worst}), flush=True)


if __name__ == "__main__":
    main()
