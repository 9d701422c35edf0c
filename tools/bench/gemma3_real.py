"""Real pretrained weights: Gemma 3 270M (tests/real_weights.py fetches and caches it), as JSON lines.

    python tools/bench/gemma3_real.py [--workdir DIR]

1. Reading: scalegrow's reference model against transformers on 512 tokens of the GPL-3.
2. LEMON, HF -> HF: 640 -> 768 wide, 4 -> 8 heads in 2 groups, FFN 2048 -> 2560, 18 -> 24 layers;
   the grown model's logits in transformers against the source's, and the time against a copy of
   the output's bytes.
3. Shrinking without training: subclone and drop-layers to several smaller shapes, calibrated on four
   licence texts (GPL-3, GFDL-1.3, MPL-2.0, LGPL-2.1; 16k tokens), scored by transformers on 2048
   tokens of four others (Apache-2.0, Artistic, CC0-1.0, BSD). The source's own loss is the baseline.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from hf_models import logits  # noqa: E402
from real_weights import gemma3_270m, license_text  # noqa: E402
from test_real_weights import english_windows, lm_loss  # noqa: E402

from scalegrow import commands  # noqa: E402
from scalegrow.formats.options import OutputOptions  # noqa: E402

HF = OutputOptions(format="hf")
GROWN = dict(num_layers=24, hidden_size=768, ffn_hidden_size=2560, num_attention_heads=8, num_query_groups=2)
SHAPES = {
    "half width: hidden 320, 2 heads, FFN 1024": dict(hidden_size=320, ffn_hidden_size=1024, num_attention_heads=2,
                                                     num_query_groups=1),
    "half width, 4 heads kept: hidden 320, FFN 1024": dict(hidden_size=320, ffn_hidden_size=1024),
    "hidden 640 -> 512": dict(hidden_size=512),
    "FFN 2048 -> 1024": dict(ffn_hidden_size=1024),
    "18 -> 12 layers": dict(num_layers=12),
}
CALIBRATION = ("GPL-3", "GFDL-1.3", "MPL-2.0", "LGPL-2.1")
HELD_OUT = ("Apache-2.0", "Artistic", "CC0-1.0", "BSD")


def yaml_of(path: Path, values: dict) -> Path:
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return path


def reading(src: Path) -> dict:
    import transformers

    ids = english_windows(src, license_text("GPL-3"), 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs, ours = model(ids).logits, commands.load_model(src)(ids)
        loss = model(ids, labels=ids).loss.item()
    return {"case": "read", "max_abs_diff": (theirs - ours).abs().max().item(),
            "largest_logit": theirs.abs().max().item(), "gpl3_loss": round(loss, 4)}


def lemon(src: Path, work: Path) -> dict:
    start = time.perf_counter()
    commands.grow(src, work / "big", "lemon", yaml_of(work / "big.yaml", GROWN), HF, progress=False)
    grow_s = time.perf_counter() - start
    start = time.perf_counter()
    shutil.copytree(work / "big", work / "copy")
    copy_s = time.perf_counter() - start
    shutil.rmtree(work / "copy")
    ids = english_windows(src, license_text("GPL-3"), 1)
    small, big = logits(src, ids), logits(work / "big", ids)
    params = sum(p.numel() for p in commands.load_model(work / "big").parameters())
    return {"case": "lemon", "target": GROWN, "params": params, "grow_s": round(grow_s, 1), "copy_s": round(copy_s, 1),
            "max_abs_diff": (small - big).abs().max().item(), "relative": ((small - big).abs().max() /
                                                                             small.abs().max()).item()}


def shrinking(src: Path, work: Path):
    calibration = work / "calibration.txt"
    calibration.write_text("\n\n".join(license_text(n) for n in CALIBRATION))
    held_out = english_windows(src, "\n\n".join(license_text(n) for n in HELD_OUT), 4)
    data = commands.DataOptions(data=str(calibration), seq_length=512)
    yield {"case": "source", "held_out_loss": round(lm_loss(src, held_out), 3)}
    for shape, values in SHAPES.items():
        row = {"case": "shrink", "target": shape}
        for method in ("subclone", "drop-layers"):
            start = time.perf_counter()
            commands.shrink(src, work / method, method, yaml_of(work / "small.yaml", values), HF, data=data,
                            progress=False)
            row[method] = round(lm_loss(work / method, held_out), 3)
            row[f"{method}_s"] = round(time.perf_counter() - start, 1)
            shutil.rmtree(work / method)
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gemma3-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = gemma3_270m()
    print(json.dumps(reading(src)), flush=True)
    print(json.dumps(lemon(src, work)), flush=True)
    for row in shrinking(src, work):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
