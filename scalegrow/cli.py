"""`scalegrow`: grow, shrink, convert, verify and inspect Megatron, DeepSpeed and Hugging Face checkpoints.
Exit 0: success; 2: bad input; 1: verify found a difference over --atol + --rtol; 3: internal error."""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import traceback


from scalegrow import __version__, commands
from scalegrow.commands import DataOptions
from scalegrow.core.config import ModelConfig
from scalegrow.errors import InputError
from scalegrow.formats import registry as formats
from scalegrow.formats.hf.family import EXPERT_LAYOUTS
from scalegrow.formats.hf.registry import FAMILIES as HF_FAMILIES
from scalegrow.formats.options import (
    DTYPES,
    TORCH_DIST_COMMON,
    TORCH_DIST_MODELS,
    HFOptions,
    LayoutOptions,
    OutputOptions,
    TorchDistOptions,
)
from scalegrow.methods import registry as methods
from scalegrow.write.ranks import Ranks
from scalegrow.write.session import Topology

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors are bad input too: one line, exit 2
        raise InputError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scalegrow", description=__doc__)
    p.add_argument("--version", action="version", version=f"scalegrow {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    _grow_parser(sub.add_parser("grow", help="grow a checkpoint (and re-partition it in the same pass)"))
    _shrink_parser(sub.add_parser("shrink", help="initialise a smaller model from a larger one"))
    c = sub.add_parser("convert", help="re-partition (TP/PP) and/or change format, tensors unchanged")
    _paths(c, "source checkpoint directory")
    _output_args(c, "the source's")
    v = sub.add_parser("verify", help="check that two checkpoints compute the same function")
    v.add_argument("--src", required=True, help="the first checkpoint (any format and layout)")
    v.add_argument("--dst", required=True, help="the second checkpoint (any format and layout)")
    v.add_argument("--tokens", type=int, default=512, help="tokens in the random test batch (default: 512)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random test batch (default: 0)")
    v.add_argument("--atol", type=float, default=1e-4, help="|Δlogits| still the same, absolute (default: 1e-4)")
    v.add_argument("--rtol", type=float, default=1e-3, help="and relative to the source's largest |logit|: a "
                   "grown 3B model's fp32 noise reaches ~1e-4 of it, bf16 rounding of its weights ~3e-3 "
                   "(default: 1e-3)")
    _device_arg(v, "the forward passes")
    e = sub.add_parser("eval", help="held-out next-token loss of a checkpoint")
    e.add_argument("path", help="checkpoint directory")
    e.add_argument("--data", default=DataOptions.data, help="corpus whose held-out split is used: a text/json/"
                   "parquet file, a .bin/.idx prefix, or 'embedded' (default: embedded)")
    e.add_argument("--tokenizer", default=None,
                   help="sentencepiece model or HF tokenizer.json (default: the checkpoint's)")
    e.add_argument("--tokens", type=int, default=32768, help="held-out tokens (default: 32768)")
    e.add_argument("--seq-length", type=int, default=256, help="tokens per window (default: 256)")
    _device_arg(e, "the forward passes")
    i = sub.add_parser("inspect", help="describe a checkpoint")
    i.add_argument("path", help="checkpoint directory")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    n = sub.add_parser("init", help="write a randomly initialised checkpoint from a model YAML")
    n.add_argument("--target", required=True, help="YAML of Megatron model args (all required ones)")
    n.add_argument("--dst", required=True, help="output directory (must not exist)")
    _output_args(n, "1", any_format=False)
    n.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default: 0)")
    n.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (default: fp32)")
    return p


def _grow_parser(g: argparse.ArgumentParser) -> None:
    _paths(g, "source checkpoint directory (Megatron torch/torch_dist, DeepSpeed or Hugging Face)")
    _method_arg(g, methods.GROW)
    g.add_argument("--target", default=None, help="YAML of Megatron model args; keys left out keep the source's "
                   "(default: the source's shape; a stack --layers map sets the depth)")
    _output_args(g, "the source's")
    g.add_argument("--seed", type=int, default=0, help="seed of the symmetry-breaking noise (default: 0)")
    g.add_argument("--optimizer-state", action="store_true", help="also grow the source's Adam state (a DeepSpeed "
                   "checkpoint's, any ZeRO stage) into optimizer_state.pt beside the weights, for `pretrain "
                   "init.optimizer_state=true` (docs/METHODS.md)")
    _method_options(g, methods.GROW)


def _shrink_parser(k: argparse.ArgumentParser) -> None:
    _paths(k, "source checkpoint directory (Megatron torch/torch_dist, DeepSpeed or Hugging Face)")
    _method_arg(k, methods.SHRINK)
    k.add_argument("--target", default=None, help="YAML of Megatron model args; keys left out keep the source's "
                   "(default: none; give --target or --params)")
    k.add_argument("--params", default=None, metavar="N", help="instead of --target: a parameter budget (1.5B, "
                   "350M, or a fraction of the source's like 0.5); the shape is chosen by Minitron's rule (every "
                   "layer kept, hidden, FFN and query groups narrowed alike), printed and recorded (default: none)")
    _method_options(k, methods.SHRINK)
    _output_args(k, "the source's")


def _method_arg(p: argparse.ArgumentParser, kind: str) -> None:
    default = methods.DEFAULT[kind]
    p.add_argument("--method", default=default, help=f"{kind} method: {', '.join(methods.names(kind))} "
                   f"(default: {default})")


def _method_options(p: argparse.ArgumentParser, kind: str) -> None:
    """The flags of `kind`'s methods, as each method's options declare them (given flags only reach
    the namespace), and the corpus and device of their prepare steps."""
    for flag, owners in methods.command_flags(kind).values():
        what = f"{', '.join(owners)}: {flag.help}"
        if flag.switch:
            p.add_argument(flag.name, dest=flag.dest, action="store_true", default=argparse.SUPPRESS,
                           help=f"{what}: turn it off" if flag.default else f"{what} (default: off)")
            continue
        p.add_argument(flag.name, dest=flag.dest, type=flag.type, default=argparse.SUPPRESS, choices=flag.choices,
                       metavar=flag.metavar, help=what if flag.default is None else f"{what} (default: {flag.default})")
    for name, what in methods.corpora(kind).items():
        p.add_argument(name, dest="data", default=DataOptions.data, help=f"{what}: a text/json/parquet file, "
                       "a preprocessed .bin/.idx prefix, or 'embedded' (default: embedded)")
    p.add_argument("--tokenizer", default=None, help="the prepare step's tokenizer: a sentencepiece model or an HF "
                   "tokenizer.json (default: the one shipped with --src)")
    _device_arg(p, "the method's prepare step (its calibration or training)")


def _device_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default=None, metavar="DEVICE", help=f"where {what} computes: cpu, cuda or cuda:N "
                   "(default: cuda when a GPU is available, else cpu)")


def _paths(p: argparse.ArgumentParser, src_help: str) -> None:
    p.add_argument("--src", required=True, help=src_help)
    p.add_argument("--dst", required=True, help="output directory: must not exist (see --overwrite) and must "
                   "not overlap --src")


def _output_args(p: argparse.ArgumentParser, layout_default: str, any_format: bool = True) -> None:
    p.add_argument("--tp", type=int, default=None, help=f"tensor parallel size (default: {layout_default})")
    p.add_argument("--pp", type=int, default=None, help=f"pipeline parallel size (default: {layout_default})")
    p.add_argument("--ep", type=int, default=None, help=f"expert parallel size of an MoE model: files "
                   f"mp_rank_TT[_PPP]_EEE each hold E/EP experts (default: {layout_default})")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, metavar="N",
                   help="layers on the first pipeline stage, as in Megatron-LM (default: an even split)")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, metavar="N",
                   help="layers on the last pipeline stage, as in Megatron-LM (default: an even split)")
    if any_format:
        p.add_argument("--format", choices=formats.writable(), default=None,
                       help="output format: " + ", ".join(f"{name} ({formats.FORMATS[name].description})"
                                                          for name in formats.writable()) +
                       " (default: the source's: an HF source gives HF; a DeepSpeed one, torch)")
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="the written weights' dtype (default: "
                       "the source's; fp32 keeps a bf16 model grown with LEMON lossless to fp32 noise)")
        p.add_argument("--drop-mtp", action="store_true", help="write without the source's multi-token-prediction "
                       "layers (DeepSeek-V3's model.layers.61.*), which no output holds yet and transformers ignores "
                       "(default: refuse such a source)")
        p.add_argument("--vocab-size", type=int, default=None, help="the tokenizer's true vocabulary size, to "
                       "re-pad for the target TP (default: the source's args, else its padded rows)")
        p.add_argument("--max-shard-size", type=_size, default=HFOptions.max_shard_size, metavar="SIZE",
                       help="hf: largest safetensors file, e.g. 5GB, 500MB, 2GiB or bytes (default: 5GB)")
        p.add_argument("--hf-model-type", default=None, metavar="TYPE",
                       help="hf: the family to write: " + ", ".join(HF_FAMILIES) + " (default: the source's, "
                       "as recorded in its config.json or scalegrow.json, else the one its structure implies)")
        p.add_argument("--hf-expert-layout", choices=EXPERT_LAYOUTS, default=None,
                       help="hf: an MoE model's experts: per-expert tensors as the Hub has them, or fused 3-D "
                       "mlp.experts.gate_up_proj/down_proj as transformers 5 holds them and mergekit writes them "
                       "(default: the source's; per-expert for a model that never was HF)")
        p.add_argument("--torch-dist-common", choices=TORCH_DIST_COMMON, default=TorchDistOptions.common,
                       help="torch_dist: where the common state (args, iteration) goes: common.pt, which megatron-core "
                       "0.16 to 0.19 all read (0.19 logs that it is deprecated), or inline, inside the .distcp files "
                       "as megatron-core 0.19 saves it (0.16 to 0.18 cannot read that) (default: common.pt)")
        p.add_argument("--torch-dist-model", choices=TORCH_DIST_MODELS, default=None,
                       help="torch_dist: the megatron-core model whose keys it has: gpt (GPTModel's; megatron-core "
                       "0.19's HybridModel runs load it too) or hybrid (HybridModel's, --hybrid-layer-pattern of "
                       "'*-' pairs; only HybridModel runs load it) (default: the source's, else gpt)")
        p.add_argument("--dry-run", action="store_true", help="print every output file's tensors and shapes as "
                       "JSON; reads only the source's args (no tensor data) and writes nothing")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes writing the output: legacy rank files (torch), or layers (torch_dist, hf: each "
                   "computed once and written into its place); each holds about one file, or a few layers, in memory "
                   "(default: as many as the usable cores, the output and the available memory allow)")
    p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars, and no chatter from DeepSpeed")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def _size(text: str) -> int:
    """'5GB' -> 5e9 bytes, as transformers reads max_shard_size (KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _print_plan(plan: dict) -> int:
    files = {name: {"tensors": len(keys), "shapes": {k: list(v) for k, v in keys.items()}}
             for name, keys in plan.items()}
    print(json.dumps({"files": files}))
    return EXIT_OK


def _output_options(a) -> OutputOptions:
    for name in ("tp", "pp", "ep", "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                 "vocab_size"):
        _positive(name.replace("_", "-"), getattr(a, name, None))
    layout = LayoutOptions(a.tp, a.pp, a.decoder_first_pipeline_num_layers, a.decoder_last_pipeline_num_layers, a.ep)
    hf = HFOptions(getattr(a, "max_shard_size", HFOptions.max_shard_size), getattr(a, "hf_model_type", None),
                   getattr(a, "hf_expert_layout", None))
    torch_dist = TorchDistOptions(getattr(a, "torch_dist_common", TorchDistOptions.common),
                                  getattr(a, "torch_dist_model", None))
    fmt = getattr(a, "format", None) or (formats.default_output(a.src) if getattr(a, "src", None) else "torch")
    return OutputOptions(fmt, layout, getattr(a, "vocab_size", None), hf, torch_dist, getattr(a, "dtype", None),
                         getattr(a, "drop_mtp", False))


def _topology(a) -> Topology:
    return Topology(a.workers, a.ranks)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"--{name}: must be >= 1, got {value}")


def cmd_grow(a) -> int:
    options = methods.options_from_flags(a.method, methods.GROW, vars(a))
    summary = commands.grow(a.src, a.dst, a.method, a.target, _output_options(a), seed=a.seed,
                            overwrite=a.overwrite, progress=not a.no_progress, dry_run=a.dry_run, options=options,
                            data=DataOptions(a.data, a.tokenizer), topology=_topology(a), device=a.device,
                            optimizer_state=a.optimizer_state)
    if a.dry_run:
        return _print_plan(summary)
    print(f"grew {a.src} with {a.method}: {summary}")
    return EXIT_OK


def cmd_shrink(a) -> int:
    options = methods.options_from_flags(a.method, methods.SHRINK, vars(a))
    if (a.target is None) == (a.params is None):
        raise InputError("shrink: give the target shape, --target T.yaml, or a budget, --params N (one of them)")
    target, budget = a.target, None
    if a.params is not None:
        target, budget = commands.budget_shape(a.src, a.params, a.tp)
        shape = " ".join(f"{k}={v}" for k, v in budget["chose"].items())
        print(f"shrink --params {a.params}: {budget['params_chosen'] / 1e6:.2f}M params, {shape}",
              file=sys.stderr if a.dry_run else sys.stdout)
    if a.dry_run:  # the shape only: which neurons stay is what calibration decides
        cfg = target if budget else commands.target_config(a.src, target)
        print(json.dumps({"target": cfg.to_dict(), **({"budget": budget} if budget else {})}))
        return EXIT_OK
    summary = commands.shrink(a.src, a.dst, a.method, target, _output_options(a), options,
                              DataOptions(a.data, a.tokenizer), overwrite=a.overwrite, progress=not a.no_progress,
                              budget=budget, topology=_topology(a), device=a.device)
    print(f"shrank {a.src} with {a.method}: {summary}")
    return EXIT_OK


def cmd_eval(a) -> int:
    _positive("tokens", a.tokens), _positive("seq-length", a.seq_length)
    print(json.dumps(commands.evaluate(a.path, a.data, a.tokenizer, a.tokens, a.seq_length, a.device)))
    return EXIT_OK


def cmd_convert(a) -> int:
    summary = commands.convert(a.src, a.dst, _output_options(a), overwrite=a.overwrite,
                               progress=not a.no_progress, dry_run=a.dry_run, topology=_topology(a))
    if a.dry_run:
        return _print_plan(summary)
    print(f"converted {a.src}: {summary}")
    return EXIT_OK


def cmd_verify(a) -> int:
    result = commands.verify(a.src, a.dst, tokens=a.tokens, seed=a.seed, device=a.device)
    scale = result["max_abs_logit"]
    same = result["max_abs_diff"] <= a.atol + a.rtol * scale
    result = {"verdict": "same" if same else "different", **result}
    print(json.dumps(result))
    print(f"verify: {'SAME' if same else 'DIFFERENT'}: max |Δlogits| {result['max_abs_diff']:.3g} "
          f"{'<=' if same else '>'} --atol {a.atol:g} + --rtol {a.rtol:g} x max |logit| {scale:.3g}", file=sys.stderr)
    return EXIT_OK if same else EXIT_MISMATCH


def cmd_inspect(a) -> int:
    info = commands.inspect(a.path)
    if a.json:
        print(json.dumps(info))
        return EXIT_OK
    m = info["model"]
    print(f"{info['path']}: {info['description']} checkpoint ({info['format']}), iteration {info['iteration']}")
    print(f"  layout   TP={info['tensor_model_parallel_size']} PP={info['pipeline_model_parallel_size']} "
          f"layers/stage={info['layers_per_stage']} dtype={info['dtype']}")
    print(f"  model    {info['num_parameters'] / 1e6:.2f}M params: num_layers={m['num_layers']} "
          f"hidden_size={m['hidden_size']} ffn_hidden_size={m['ffn_hidden_size']} "
          f"heads={m['num_attention_heads']} groups={m['num_query_groups']} kv_channels={m['kv_channels']} "
          f"vocab={m['padded_vocab_size']}")
    print(f"           {m['normalization']}, {'SwiGLU' if m['swiglu'] else 'GELU'}, "
          f"{m['position_embedding_type']}, {'untied' if m['untie_embeddings_and_output_weights'] else 'tied'}, "
          f"bias={m['add_bias_linear']}")
    if "common_state" in info:
        print(f"  common   {info['common_state']}")
    for shard in info["shards"]:
        print(f"  shard    {shard['file']}  {shard['bytes'] / 2**20:.2f} MiB")
    return EXIT_OK


def cmd_init(a) -> int:
    cfg = ModelConfig.from_yaml(a.target)
    summary = commands.init_checkpoint(cfg, a.dst, _output_options(a), seed=a.seed, dtype=DTYPES[a.dtype],
                                       overwrite=a.overwrite, topology=_topology(a))
    print(f"initialised: {summary}")
    return EXIT_OK


COMMANDS = {"grow": cmd_grow, "shrink": cmd_shrink, "eval": cmd_eval, "convert": cmd_convert, "verify": cmd_verify,
            "inspect": cmd_inspect, "init": cmd_init}


WRITERS = ("grow", "shrink", "convert", "init")  # the commands several ranks can share


def _run(args) -> int:
    """The command; under torchrun or srun, as one of the ranks that write its output together
    (`write/ranks.py`): a failure here, at any point, stops the others."""
    args.ranks = Ranks.connect() if args.command in WRITERS and not getattr(args, "dry_run", False) else None
    try:
        return COMMANDS[args.command](args)
    except BaseException as exc:
        if args.ranks:
            args.ranks.fail(exc)
        raise
    finally:
        if args.ranks:
            args.ranks.close()


def _stop(signum, frame):
    """SIGTERM (srun and torchrun stop the other ranks with it) unwinds like an error: no output is left."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # bare `scalegrow`: say what it can do
            parser.print_help()
            return EXIT_OK
        return _run(args)
    except InputError as exc:
        print(f"scalegrow: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("scalegrow: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except Exception:  # an internal error: keep the traceback for the bug report
        traceback.print_exc()
        return EXIT_INTERNAL
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
