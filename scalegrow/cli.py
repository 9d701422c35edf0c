"""`scalegrow` console script (DESIGN §1). Exit 0: success; 2: bad input; 1: verify found a
difference over --atol; 3: internal error."""
from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings

import torch

from scalegrow import __version__
from scalegrow.errors import InputError

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors are bad input too: one line, exit 2
        raise InputError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scalegrow", description=__doc__)
    p.add_argument("--version", action="version", version=f"scalegrow {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("grow", help="grow a Megatron checkpoint (and re-partition it in the same pass)")
    g.add_argument("--src", required=True, help="source checkpoint directory")
    g.add_argument("--dst", required=True, help="output directory (must not exist)")
    g.add_argument("--method", default="lemon", help="growth method (default: lemon)")
    g.add_argument("--target", required=True, help="YAML of Megatron model args; keys left out keep the source's")
    _layout_args(g)
    g.add_argument("--seed", type=int, default=0, help="seed of the symmetry-breaking noise")
    g.add_argument("--steps", type=int, default=100, help="ligo: operator training steps")
    g.add_argument("--lr", type=float, default=2e-4, help="ligo: operator learning rate")
    g.add_argument("--data", default="embedded", help="ligo: training corpus (text/json/parquet file, "
                   "a preprocessed .bin/.idx prefix, or 'embedded')")
    g.add_argument("--tokenizer", default=None, help="ligo: sentencepiece model (default: the source's)")

    v = sub.add_parser("verify", help="check that two checkpoints compute the same function")
    v.add_argument("--src", required=True)
    v.add_argument("--dst", required=True)
    v.add_argument("--tokens", type=int, default=512, help="tokens in the random test batch")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--atol", type=float, default=1e-4, help="max |Δlogits| allowed (fp32)")

    k = sub.add_parser("shrink", help="initialise a smaller model from a larger one (weight subcloning)")
    k.add_argument("--src", required=True)
    k.add_argument("--dst", required=True)
    k.add_argument("--method", default="subclone", help="subclone (default) or drop-layers")
    k.add_argument("--target", required=True, help="YAML of Megatron model args; keys left out keep the source's")
    k.add_argument("--calib-data", default="embedded", help="calibration corpus (text/json/parquet file, "
                   "a preprocessed .bin/.idx prefix, or 'embedded')")
    k.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens")
    k.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the source's)")
    k.add_argument("--no-rescale", action="store_true",
                   help="do not rescale the kept MLP outputs (linear_fc2) after dropping neurons")
    _layout_args(k)

    e = sub.add_parser("eval", help="held-out next-token loss of a checkpoint")
    e.add_argument("path")
    e.add_argument("--data", default="embedded", help="corpus whose held-out split is used")
    e.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the checkpoint's)")
    e.add_argument("--tokens", type=int, default=32768)
    e.add_argument("--seq-length", type=int, default=256)

    c = sub.add_parser("convert", help="re-partition (TP/PP) and/or change format, tensors unchanged")
    c.add_argument("--src", required=True)
    c.add_argument("--dst", required=True)
    _layout_args(c)

    i = sub.add_parser("inspect", help="describe a checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print one JSON object")

    n = sub.add_parser("init", help="write a randomly initialised checkpoint from a model YAML")
    n.add_argument("--target", required=True, help="YAML of Megatron model args (all required ones)")
    n.add_argument("--dst", required=True)
    _layout_args(n, writes_any_format=False)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    return p


def _layout_args(p: argparse.ArgumentParser, writes_any_format: bool = True) -> None:
    p.add_argument("--tp", type=int, default=None, help="target tensor parallel size (default: source's)")
    p.add_argument("--pp", type=int, default=None, help="target pipeline parallel size (default: source's)")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, metavar="N",
                   help="layers on the first pipeline stage (uneven split, as in Megatron-LM)")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, metavar="N",
                   help="layers on the last pipeline stage (uneven split, as in Megatron-LM)")
    if writes_any_format:
        p.add_argument("--format", choices=("torch", "torch_dist"), default="torch",
                       help="output format: Megatron legacy 'torch' (default) or megatron-core 'torch_dist'")
        p.add_argument("--vocab-size", type=int, default=None,
                       help="the tokenizer's true vocabulary size, to re-pad for the target TP")
        p.add_argument("--dry-run", action="store_true",
                       help="read and write nothing: print every output shard's tensors and shapes as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print_plan(plan: dict) -> int:
    files = {name: {"tensors": len(keys), "shapes": {k: list(v) for k, v in keys.items()}}
             for name, keys in plan.items()}
    print(json.dumps({"files": files}))
    return EXIT_OK


def _target_layout(a):
    from scalegrow.pipeline import TargetLayout

    for name in ("tp", "pp", "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                 "vocab_size"):
        _positive(name.replace("_", "-"), getattr(a, name, None))
    return TargetLayout(a.tp, a.pp, a.decoder_first_pipeline_num_layers, a.decoder_last_pipeline_num_layers,
                        getattr(a, "format", "torch"), getattr(a, "vocab_size", None))


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"--{name}: must be >= 1, got {value}")


def cmd_grow(a) -> int:
    from scalegrow.pipeline import grow

    from scalegrow.pipeline import LigoOptions

    _positive("steps", a.steps)
    ligo = LigoOptions(steps=a.steps, lr=a.lr, data=a.data, tokenizer=a.tokenizer)
    summary = grow(a.src, a.dst, a.method, a.target, _target_layout(a), seed=a.seed,
                   overwrite=a.overwrite, progress=not a.no_progress, dry_run=a.dry_run, ligo=ligo)
    if a.dry_run:
        return _print_plan(summary)
    print(f"grew {a.src} with {a.method}: {summary}")
    return EXIT_OK


def cmd_shrink(a) -> int:
    from scalegrow.pipeline import CalibOptions, shrink

    _positive("calib-tokens", a.calib_tokens)
    calib = CalibOptions(a.calib_data, a.calib_tokens, a.tokenizer, rescale=not a.no_rescale)
    summary = shrink(a.src, a.dst, a.method, a.target, _target_layout(a), calib, overwrite=a.overwrite,
                     progress=not a.no_progress)
    print(f"shrank {a.src} with {a.method}: {summary}")
    return EXIT_OK


def cmd_eval(a) -> int:
    from scalegrow.pipeline import evaluate

    _positive("tokens", a.tokens), _positive("seq-length", a.seq_length)
    print(json.dumps(evaluate(a.path, a.data, a.tokenizer, a.tokens, a.seq_length)))
    return EXIT_OK


def cmd_convert(a) -> int:
    from scalegrow.pipeline import convert

    summary = convert(a.src, a.dst, _target_layout(a), overwrite=a.overwrite, progress=not a.no_progress,
                      dry_run=a.dry_run)
    if a.dry_run:
        return _print_plan(summary)
    print(f"converted {a.src}: {summary}")
    return EXIT_OK


def cmd_verify(a) -> int:
    from scalegrow.pipeline import verify

    result = verify(a.src, a.dst, tokens=a.tokens, seed=a.seed)
    print(json.dumps(result))
    return EXIT_OK if result["max_abs_diff"] <= a.atol else EXIT_MISMATCH


def cmd_inspect(a) -> int:
    from scalegrow.pipeline import inspect

    info = inspect(a.path)
    if a.json:
        print(json.dumps(info))
        return EXIT_OK
    m = info["model"]
    kind = {"torch": "Megatron legacy (torch)", "torch_dist": "megatron-core torch_dist",
            "deepspeed": "DeepSpeed"}.get(info["format"], info["format"])
    print(f"{info['path']}: {kind} checkpoint, iteration {info['iteration']}")
    print(f"  layout   TP={info['tensor_model_parallel_size']} PP={info['pipeline_model_parallel_size']} "
          f"layers/stage={info['layers_per_stage']} dtype={info['dtype']}")
    print(f"  model    {info['num_parameters'] / 1e6:.2f}M params: num_layers={m['num_layers']} "
          f"hidden_size={m['hidden_size']} ffn_hidden_size={m['ffn_hidden_size']} "
          f"heads={m['num_attention_heads']} groups={m['num_query_groups']} kv_channels={m['kv_channels']} "
          f"vocab={m['padded_vocab_size']}")
    print(f"           {m['normalization']}, {'SwiGLU' if m['swiglu'] else 'GELU'}, "
          f"{m['position_embedding_type']}, {'untied' if m['untie_embeddings_and_output_weights'] else 'tied'}, "
          f"bias={m['add_bias_linear']}")
    for shard in info["shards"]:
        print(f"  shard    {shard['file']}  {shard['bytes'] / 2**20:.2f} MiB")
    return EXIT_OK


def cmd_init(a) -> int:
    from scalegrow.config import ModelConfig
    from scalegrow.pipeline import init_checkpoint

    layout = _target_layout(a)
    cfg = ModelConfig.from_yaml(a.target)
    summary = init_checkpoint(cfg, a.dst, tp=layout.tp or 1, pp=layout.pp or 1, first=layout.first,
                              last=layout.last, seed=a.seed, dtype=DTYPES[a.dtype], overwrite=a.overwrite)
    print(f"initialised: {summary}")
    return EXIT_OK


COMMANDS = {"grow": cmd_grow, "shrink": cmd_shrink, "eval": cmd_eval, "convert": cmd_convert, "verify": cmd_verify, "inspect": cmd_inspect,
            "init": cmd_init}


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="megatron")
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except InputError as exc:
        print(f"scalegrow: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("scalegrow: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except Exception:  # an internal error: keep the traceback for the bug report
        traceback.print_exc()
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
