"""Held-out loss of each shrink initialisation against random init, as JSON lines.

    python tools/bench/shrink.py [--workdir DIR] [--steps 300]

Trains gpt-tiny (4 layers, hidden 128, 4 heads in 2 KV groups, SwiGLU 352, RMSNorm, rope) for
`--steps` steps on the embedded corpus (1 MB, sentencepiece BPE 512), saves it at TP2/PP2, then for
every target shape initialises the small model with subclone (with and without the FFN rescale),
drop-layers and random init, and measures each one's held-out loss on 16k tokens (`scalegrow eval`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from scalegrow.commands import DataOptions, evaluate, save_model, shrink
from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT, init_weights
from scalegrow.data import (
    BatchOrder,
    TokenStream,
    batch,
    build_indexed,
    embedded_documents,
    load_tokenizer,
    train_tokenizer,
)
from scalegrow.formats.options import LayoutOptions, OutputOptions
from scalegrow.methods.subclone import SubcloneOptions

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {
    "2 layers, hidden 64, 2 heads / 1 group, FFN 176": dict(num_layers=2, hidden_size=64, num_attention_heads=2,
                                                             num_query_groups=1, ffn_hidden_size=176),
    "hidden 64, 2 heads / 1 group, FFN 176": dict(hidden_size=64, num_attention_heads=2, num_query_groups=1,
                                                  ffn_hidden_size=176),
    "FFN 352 -> 128": dict(ffn_hidden_size=128),
    "hidden 128 -> 96": dict(hidden_size=96),
    "2 layers": dict(num_layers=2),
}
CASES = {"subclone": ("subclone", True), "subclone, no rescale": ("subclone", False),
         "drop-layers": ("drop-layers", True)}


def train_large(work: Path, steps: int) -> ModelConfig:
    docs = list(embedded_documents(1_000_000))
    tok = train_tokenizer(docs, work / "tokenizer", vocab_size=512)
    build_indexed(docs, load_tokenizer(tok), work / "corpus", 0.05)
    cfg = ModelConfig.from_yaml(ROOT / "configs/models/gpt-tiny.yaml").replace(vocab_size=512,
                                                                              max_position_embeddings=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    init_weights(model, 0)
    stream = TokenStream(work / "corpus_train", 64)
    order = BatchOrder(stream.num_samples, 16, 1, 1, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 10)
        loss = model.loss(batch(stream, order.samples(step, 0, 0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model.state_dict(), cfg, work / "big", tp=2, pp=2)
    shutil.copy(tok, work / "big" / "tokenizer.model")
    return cfg


def held_out(work: Path, path: Path) -> float:
    return evaluate(path, str(work / "corpus"), tokenizer=str(work / "tokenizer.model"), tokens=16384)["loss"]


def measure(work: Path, big: ModelConfig, name: str, target: dict) -> dict:
    (work / "t.yaml").write_text(json.dumps(target))
    row = {"target": name}
    for case, (method, rescale) in CASES.items():
        out = work / "out"
        options = SubcloneOptions(tokens=8192, rescale=rescale) if method == "subclone" else None
        shrink(work / "big", out, method, work / "t.yaml", OutputOptions(layout=LayoutOptions(tp=1, pp=1)), options,
               DataOptions(str(work / "corpus")), overwrite=True, progress=False)
        row[case] = held_out(work, out)
    model = GPT(ModelConfig.from_dict(target, base=big))
    init_weights(model, 1)
    save_model(model.state_dict(), model.cfg, work / "out", overwrite=True)
    row["random init"] = held_out(work, work / "out")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scalegrow-shrink-"))
    work.mkdir(parents=True, exist_ok=True)
    big = train_large(work, args.steps)
    print(json.dumps({"source": "gpt-tiny", "steps": args.steps, "held_out_loss": held_out(work, work / "big")}))
    for name, target in TARGETS.items():
        print(json.dumps(measure(work, big, name, target)), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
