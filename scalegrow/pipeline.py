"""The commands behind the CLI, as plain functions: init, grow, verify, inspect.

Each one that writes a checkpoint builds it in a `DST.partial-*` sibling, writes `scalegrow.json`
next to it and renames it into place at the end.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import scalegrow
from scalegrow import arch
from scalegrow.checkpoint import open_checkpoint
from scalegrow.checkpoint.io import atomic_output_dir
from scalegrow.checkpoint.dist import write_torch_dist
from scalegrow.checkpoint.megatron import (TRACKER, MetaCheckpoint, expected_specs, iteration_dir_name,
                                           open_megatron)
from scalegrow.checkpoint.writer import MegatronWriter, PlanWriter
from scalegrow.checkpoint.sharding import StageLayout, padded_vocab_size
from scalegrow.config import ModelConfig
from scalegrow.errors import InputError
from scalegrow.growth import get_operator
from scalegrow.growth.base import GrowthOperator
from scalegrow.growth.identity import Identity
from scalegrow.model import GPT, init_weights
from scalegrow.stream import fit_vocab, grow_checkpoint

METADATA = "scalegrow.json"
FORMATS = ("torch", "torch_dist")


@dataclass
class Summary:
    dst: Path
    params_src: int | None
    params_dst: int
    seconds: float
    bytes_written: int
    tp: int
    pp: int

    def __str__(self) -> str:
        src = f"{self.params_src / 1e6:.2f}M -> " if self.params_src else ""
        return (f"wrote {self.dst} ({src}{self.params_dst / 1e6:.2f}M params, TP={self.tp} PP={self.pp}, "
                f"{self.bytes_written / 2**20:.1f} MiB) in {self.seconds:.1f}s")


@dataclass(frozen=True)
class TargetLayout:
    """Where and how to write: TP/PP (None: the source's), an uneven first/last stage, the format,
    and the tokenizer's true vocabulary size for re-padding (None: from args, else keep the rows)."""

    tp: int | None = None
    pp: int | None = None
    first: int | None = None
    last: int | None = None
    format: str = "torch"
    vocab_size: int | None = None


def write_metadata(out_dir: Path, cfg: ModelConfig, tp: int, layout: StageLayout, fmt: str, method: str,
                   iteration: int | str, source=None, **extra) -> None:
    meta = {
        "scalegrow_version": scalegrow.__version__,
        "format": fmt,
        "method": method,
        "model": cfg.to_dict(),
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": layout.pp,
        "layers_per_stage": list(layout.layers_per_stage),
        "iteration": iteration,
        "source": None if source is None else {
            "path": str(source.root.resolve()), "format": source.format,
            "manifest_sha256": source.manifest_sha256(), "model": source.config.to_dict(),
            "tensor_model_parallel_size": source.tp, "pipeline_model_parallel_size": source.pp},
        **extra,
    }
    (out_dir / METADATA).write_text(json.dumps(meta, indent=2) + "\n")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _check_dst(dst: str | Path, overwrite: bool) -> None:
    """Fail before any work when the output exists (atomic_output_dir checks again at the end)."""
    if Path(dst).exists() and not overwrite:
        raise InputError(f"{dst}: destination exists (pass --overwrite to replace it)")


def _layout(cfg: ModelConfig, pp: int, first: int | None = None, last: int | None = None) -> StageLayout:
    try:
        return StageLayout.build(cfg.num_layers, pp, first, last)
    except ValueError as exc:
        raise InputError(f"--pp: {exc}") from exc


def _target_vocab(cfg: ModelConfig, tp: int, vocab_size: int | None) -> ModelConfig:
    """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by × TP, so a new TP
    can need other padding. The true size comes from --vocab-size or args.vocab_size; without
    either, the padded rows are kept as the vocabulary (as Megatron's own converter does)."""
    true_size = vocab_size or cfg.vocab_size
    if true_size is not None and true_size > cfg.padded_vocab_size:
        raise InputError(f"--vocab-size: {true_size} exceeds the checkpoint's {cfg.padded_vocab_size} "
                         f"vocabulary rows")
    padded = padded_vocab_size(true_size or cfg.padded_vocab_size, cfg.make_vocab_size_divisible_by, tp)
    return cfg.replace(padded_vocab_size=padded, vocab_size=true_size)


def _check_tp(cfg: ModelConfig, tp: int, where: str) -> None:
    try:
        cfg.check_tp(tp)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from exc


def init_checkpoint(cfg: ModelConfig, dst: str | Path, tp: int = 1, pp: int = 1, first: int | None = None,
                    last: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                    overwrite: bool = False) -> Summary:
    """A randomly initialised (Megatron init) checkpoint: a stand-in for a pretrained one."""
    start = time.time()
    _check_tp(cfg, tp, "--tp")
    model = GPT(cfg)
    init_weights(model, seed)
    return save_model(model.state_dict(), cfg, dst, tp=tp, pp=pp, first=first, last=last, dtype=dtype,
                      overwrite=overwrite, method="init", start=start, extra={"seed": seed})


def save_model(sd: dict[str, torch.Tensor], cfg: ModelConfig, dst: str | Path, *, tp: int = 1,
               pp: int = 1, first: int | None = None, last: int | None = None, dtype: torch.dtype = torch.float32, overwrite: bool = False,
               method: str = "export", iteration: int | str = "release", start: float | None = None,
               base_args=None, extra: dict | None = None) -> Summary:
    """Write an in-memory reference-model state dict as a Megatron checkpoint at TP/PP."""
    start = time.time() if start is None else start
    cfg = _target_vocab(cfg, tp, None)
    _check_tp(cfg, tp, "--tp")
    layout = _layout(cfg, pp, first, last)
    full = fit_vocab(dict(sd), cfg.padded_vocab_size)
    if cfg.tied and pp > 1:
        full[arch.OUTPUT_LAYER] = full[arch.WORD_EMBEDDINGS]
    with atomic_output_dir(dst, overwrite) as out:
        writer = MegatronWriter(out, cfg, base_args, tp, layout, iteration, dtype)
        for stage in range(pp):
            writer.write_all(stage, {k: full[k] for k, _ in expected_specs(cfg, layout, stage)})
        writer.finish()
        write_metadata(out, cfg, tp, layout, "torch", method, iteration, None, **(extra or {}))
        nbytes = _dir_bytes(out)
    return Summary(Path(dst), None, cfg.num_parameters(), time.time() - start, nbytes, tp, pp)


@dataclass(frozen=True)
class LigoOptions:
    """Operator training for `--method ligo` (single process): steps, data and tokenizer."""

    steps: int = 100
    lr: float = 2e-4
    data: str = "embedded"
    tokenizer: str | None = None  # default: the tokenizer.model shipped with the source
    seq_length: int = 128
    micro_batch_size: int = 8


def grow(src_path: str | Path, dst: str | Path, method: str, target: str | Path | None,
         layout: TargetLayout = TargetLayout(), seed: int = 0, overwrite: bool = False,
         progress: bool = True, dry_run: bool = False, ligo: LigoOptions = LigoOptions()) -> Summary | dict:
    """Grow `src_path` with `method` to the model in the `target` YAML, written at `layout`.
    With `dry_run`, nothing is read or written: the output plan (file -> key -> shape) is returned."""
    start = time.time()
    _check_dst(dst, overwrite or dry_run)
    op_cls = get_operator(method)
    src = open_checkpoint(src_path)
    dst_cfg = ModelConfig.from_yaml(target, base=src.config) if target else src.config
    try:
        op = op_cls(src.config, dst_cfg, seed=seed)
    except ValueError as exc:
        raise InputError(f"{target or '--target'}: {exc}") from exc
    if dry_run:
        return _transform(_as_meta(src), op, dst, layout, overwrite, progress, start, dry_run=True)
    meta = {"seed": seed}
    if method == "ligo":
        meta["ligo"] = _train_ligo(op, src, src_path, ligo, seed, progress)
    return _transform(src, op, dst, layout, overwrite, progress, start, **meta)


def _train_ligo(op: GrowthOperator, src, src_path, opts: LigoOptions, seed: int, progress: bool) -> dict:
    """Train the LiGO operator here (CPU or one GPU) on `opts.data` with the source's tokenizer."""
    from scalegrow.train.ligo import train_local
    from scalegrow.train.prepare import corpus_streams, source_tokenizer

    seq = min(opts.seq_length, src.config.max_position_embeddings)
    with corpus_streams(opts.data, source_tokenizer(src_path, opts.tokenizer), seq) as (train, _):
        losses = train_local(op, src.state_dict(), train, opts.steps, opts.lr, warmup=max(1, opts.steps // 10),
                             micro_batch_size=opts.micro_batch_size, seed=seed, progress=progress)
    return {"steps": opts.steps, "lr": opts.lr, "data": opts.data, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None}


@dataclass(frozen=True)
class CalibOptions:
    """Calibration data for `shrink --method subclone`."""

    data: str = "embedded"
    tokens: int = 16384
    tokenizer: str | None = None
    seq_length: int = 256
    rescale: bool = True


def shrink(src_path: str | Path, dst: str | Path, method: str, target: str | Path | None,
           layout: TargetLayout = TargetLayout(), calib: CalibOptions = CalibOptions(), overwrite: bool = False,
           progress: bool = True) -> Summary:
    """Initialise a smaller model from `src_path` (weight subcloning or the drop-layers baseline)."""
    from scalegrow.growth import get_shrinker

    start = time.time()
    _check_dst(dst, overwrite)
    op_cls = get_shrinker(method)
    src = open_checkpoint(src_path)
    dst_cfg = ModelConfig.from_yaml(target, base=src.config) if target else src.config
    extra, meta, tokens = {}, {}, None
    if method == "subclone":
        extra["stats"], tokens = _calibrate(src, src_path, calib)
        meta["calibration"] = {"data": calib.data, "tokens": tokens.numel(), "rescale": calib.rescale}
    try:
        op = op_cls(src.config, dst_cfg, **extra)
    except ValueError as exc:
        raise InputError(f"{target or '--target'}: {exc}") from exc
    if method == "subclone" and calib.rescale:
        op.fit_rescale(src, tokens)
        meta["mlp_output_scales"] = {str(k): v for k, v in op.sel.scales.items()}
    meta["kept_layers"] = op.sel.layers
    return _transform(src, op, dst, layout, overwrite, progress, start, **meta)


def _calibrate(src, src_path, opts: CalibOptions):
    """Statistics of the source on `opts.tokens` calibration tokens (its train split), layer by layer."""
    from scalegrow.growth.calibrate import calibrate
    from scalegrow.train.data import batch
    from scalegrow.train.prepare import corpus_streams, source_tokenizer

    seq = min(opts.seq_length, src.config.max_position_embeddings)
    with corpus_streams(opts.data, source_tokenizer(src_path, opts.tokenizer), seq) as (train, _):
        n = max(1, min(train.num_samples, opts.tokens // seq))
        tokens = batch(train, list(range(n)))[:, :-1]
    return calibrate(src, src.config, tokens), tokens


def evaluate(path: str | Path, data: str = "embedded", tokenizer: str | None = None, tokens: int = 32768,
             seq_length: int = 256) -> dict:
    """Mean next-token loss of a checkpoint on the held-out split of `data`."""
    from scalegrow.train.data import batch
    from scalegrow.train.prepare import corpus_streams, source_tokenizer

    model = load_model(path)
    seq = min(seq_length, model.cfg.max_position_embeddings)
    with corpus_streams(data, source_tokenizer(path, tokenizer), seq) as (_, valid):
        n = max(1, min(valid.num_samples, tokens // seq))
        total = 0.0
        with torch.no_grad():
            for first in range(0, n, 8):
                windows = batch(valid, list(range(first, min(n, first + 8))))
                total += model.loss(windows).item() * len(windows)
    loss = total / n
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n * seq, "data": data}


def convert(src_path: str | Path, dst: str | Path, layout: TargetLayout = TargetLayout(),
            overwrite: bool = False, progress: bool = True, dry_run: bool = False) -> Summary | dict:
    """Re-partition (TP/PP) and/or change format; the tensors themselves are untouched."""
    start = time.time()
    _check_dst(dst, overwrite or dry_run)
    src = open_checkpoint(src_path)
    return _transform(_as_meta(src) if dry_run else src, Identity(src.config, src.config), dst, layout,
                      overwrite, progress, start, dry_run=dry_run)


def plan(src_cfg: ModelConfig, dst_cfg: ModelConfig, method: str = "lemon",
         layout: TargetLayout = TargetLayout(), src_tp: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Run `method` on meta tensors of `src_cfg`'s shapes and return the output plan
    {file: {key: shard shape}}; the operator really runs, but nothing is allocated or written."""
    op = get_operator(method)(src_cfg, dst_cfg)
    src = MetaCheckpoint(src_cfg, tp=src_tp, dtype=dtype)
    return _transform(src, op, Path("plan"), layout, True, False, time.time(), dry_run=True)


def _as_meta(src) -> MetaCheckpoint:
    return MetaCheckpoint(src.config, src.tp, src.layout, src.dtype, src.args, src.iteration)


def _transform(src, op: GrowthOperator, dst: str | Path, req: TargetLayout, overwrite: bool,
               progress: bool, start: float, dry_run: bool = False, **meta) -> Summary | dict:
    """Stream `op` applied to `src` into `dst` at the requested layout and format."""
    if req.format not in FORMATS:
        raise InputError(f"--format: unknown checkpoint format {req.format!r} (valid: {', '.join(FORMATS)})")
    tp, pp = req.tp or src.tp, req.pp or src.pp
    cfg = _target_vocab(op.dst, tp, req.vocab_size)
    _check_tp(cfg, tp, "--tp")
    keep_split = req.pp is None and req.first is None and req.last is None
    if keep_split and cfg.num_layers == src.layout.num_layers:
        layout = src.layout  # the source's own (possibly uneven) stage split
    else:
        layout = _layout(cfg, pp, req.first, req.last)
    if dry_run:
        writer = PlanWriter(Path(dst), cfg, src.args, tp, layout, src.iteration, src.dtype)
        grow_checkpoint(src, op, writer, progress=progress)
        return writer.plan
    with atomic_output_dir(dst, overwrite) as out:
        if req.format == "torch":
            writer = MegatronWriter(out, cfg, src.args, tp, layout, src.iteration, src.dtype)
            grow_checkpoint(src, op, writer, progress=progress)
        else:  # stream into a TP1/PP1 scratch copy, then save that (mmap'd) as torch_dist
            scratch = out / ".scratch"
            writer = MegatronWriter(scratch, cfg, src.args, 1, StageLayout((cfg.num_layers,)),
                                    src.iteration, src.dtype)
            grow_checkpoint(src, op, writer, progress=progress)
            args = _layout_args(cfg.to_megatron_args(src.args, tp=tp, pp=pp), layout)
            write_torch_dist(open_megatron(scratch), out / iteration_dir_name(src.iteration), args, src.iteration)
            shutil.rmtree(scratch)
            (out / TRACKER).write_text(str(src.iteration))
        write_metadata(out, cfg, tp, layout, req.format, op.name, src.iteration, src, **meta)
        nbytes = _dir_bytes(out)
    return Summary(Path(dst), src.config.num_parameters(), cfg.num_parameters(), time.time() - start,
                   nbytes, tp, pp)


def _layout_args(args, layout: StageLayout):
    for key, value in layout.megatron_args().items():
        setattr(args, key, value)
    return args


def load_model(path: str | Path) -> GPT:
    """The whole checkpoint as a reference GPT in fp32 (merges every TP/PP shard)."""
    ckpt = open_checkpoint(path)
    model = GPT(ckpt.config)
    model.load_state_dict({k: v.float() for k, v in ckpt.state_dict().items()}, strict=True)
    return model.eval()


def verify(src_path: str | Path, dst_path: str | Path, tokens: int = 512, seed: int = 0) -> dict:
    """Run the same random token batch through both models; compare logits and losses."""
    a, b = load_model(src_path), load_model(dst_path)
    vocab = min(a.cfg.vocab_size or a.cfg.padded_vocab_size, b.cfg.vocab_size or b.cfg.padded_vocab_size)
    seq = min(tokens, a.cfg.max_position_embeddings, b.cfg.max_position_embeddings)
    batch = torch.randint(0, vocab, (max(1, math.ceil(tokens / seq)), seq),
                          generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        la, lb = a(batch), b(batch)
    common = vocab
    diff = (la[..., :common] - lb[..., :common]).abs().max().item()
    scale = la[..., :common].abs().max().item()

    def loss(logits):  # over the shared vocabulary: re-padded rows are not part of the function
        return F.cross_entropy(logits[:, :-1, :common].flatten(0, 1), batch[:, 1:].flatten()).item()

    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale else 0.0,
            "loss_src": loss(la), "loss_dst": loss(lb)}


def inspect(path: str | Path) -> dict:
    ckpt = open_checkpoint(path)
    shards = [{"file": str(f.relative_to(ckpt.root)), "bytes": f.stat().st_size} for f in ckpt.files()]
    return {
        "path": str(ckpt.root), "format": ckpt.format, "iteration": ckpt.iteration,
        "tensor_model_parallel_size": ckpt.tp, "pipeline_model_parallel_size": ckpt.pp,
        "layers_per_stage": list(ckpt.layout.layers_per_stage), "dtype": str(ckpt.dtype).replace("torch.", ""),
        "num_parameters": ckpt.config.num_parameters(), "model": ckpt.config.to_dict(), "shards": shards,
        "total_bytes": sum(s["bytes"] for s in shards),
    }
