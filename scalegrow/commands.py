"""The commands behind the CLI, as plain functions: init, grow, shrink, convert, plan, eval, verify,
inspect. Each is a few calls: open the source (formats), build and prepare an operator (methods), and
stream it into a new checkpoint (output)."""
from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator

import torch
import torch.nn.functional as F

from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import num_parameters
from scalegrow.core.device import resolve as resolve_device
from scalegrow.core.model import GPT, init_weights
from scalegrow.data import batch, companion_files, corpus_streams, source_tokenizer
from scalegrow.errors import InputError
from scalegrow.formats import optimizer
from scalegrow.formats.base import MemoryReader, MetaReader
from scalegrow.formats.options import LayoutOptions, OutputOptions
from scalegrow.formats.registry import FORMATS, load_model, open_checkpoint
from scalegrow.methods import budget
from scalegrow.methods import registry as methods
from scalegrow.methods.base import Context, LocalTrainer
from scalegrow.operators.identity import Identity
from scalegrow.write import moments, session
from scalegrow.write.destination import check_destination
from scalegrow.write.session import Summary, Topology


@dataclass(frozen=True)
class DataOptions:
    """The corpus a method's prepare step reads (LiGO's operator training, subcloning's calibration)
    when scalegrow tokenizes it itself: a text/json/parquet file, a .bin/.idx prefix, or 'embedded'."""

    data: str = "embedded"
    tokenizer: str | None = None  # sentencepiece model or tokenizer.json; None: the one shipped with the source
    seq_length: int | None = None  # None: the method's own (capped by the model's positions)
    micro_batch_size: int | None = None  # LiGO's batch; None: the local trainer's default


def init_checkpoint(cfg: ModelConfig, dst: str | Path, out: OutputOptions = OutputOptions(), seed: int = 0,
                    dtype: torch.dtype = torch.float32, overwrite: bool = False,
                    topology: Topology = Topology()) -> Summary:
    """A randomly initialised (Megatron init) checkpoint: a stand-in for a pretrained one."""
    start = time.time()
    model = GPT(cfg)
    init_weights(model, seed)
    return session.write(MemoryReader.of(model.state_dict(), cfg, dtype=dtype), Identity(cfg, cfg), dst, out,
                         topology=topology, method="init", details={"seed": seed}, overwrite=overwrite,
                         progress=False, start=start)


def save_model(sd: dict[str, torch.Tensor], cfg: ModelConfig, dst: str | Path, *, tp: int = 1, pp: int = 1,
               first: int | None = None, last: int | None = None, dtype: torch.dtype = torch.float32,
               overwrite: bool = False, iteration: int | str = "release", base_args=None) -> Summary:
    """Write an in-memory reference-model state dict as a Megatron checkpoint at TP/PP."""
    model = MemoryReader.of(sd, cfg, iteration=iteration, args=base_args, dtype=dtype)
    return session.write(model, Identity(cfg, cfg), dst, OutputOptions(layout=LayoutOptions(tp, pp, first, last)),
                         method="export", overwrite=overwrite, progress=False)


def grow(src_path: str | Path, dst: str | Path, method: str, target: str | Path | None,
         out: OutputOptions = OutputOptions(), seed: int = 0, overwrite: bool = False, progress: bool = True,
         dry_run: bool = False, options=None, data: DataOptions = DataOptions(), topology: Topology = Topology(),
         device: str | None = None, optimizer_state: bool = False) -> Summary | dict:
    """Grow `src_path` with `method` to the model in the `target` YAML, written at `out`; a prepare
    step (LiGO's training) runs on `device` (`core/device.py`). With `dry_run`, nothing is read or
    written: the output plan (file -> key -> shape) is returned. With `optimizer_state`, the source's
    Adam state is grown too, into `optimizer_state.pt` beside the weights (write/moments.py)."""
    job = Job(methods.GROW, method, out, topology, seed, overwrite, progress, data, device, optimizer_state)
    return _transform(job, src_path, dst, target, dry_run, options)


def shrink(src_path: str | Path, dst: str | Path, method: str, target: str | Path | ModelConfig | None,
           out: OutputOptions = OutputOptions(), options=None, data: DataOptions = DataOptions(),
           overwrite: bool = False, progress: bool = True, budget: dict | None = None,
           topology: Topology = Topology(), device: str | None = None) -> Summary:
    """Initialise a smaller model from `src_path` (weight subcloning or the drop-layers baseline),
    calibrating on `device`; `target` a YAML or a shape from `budget_shape` (whose `budget` record
    goes into scalegrow.json)."""
    job = Job(methods.SHRINK, method, out, topology, 0, overwrite, progress, data, device)
    return _transform(job, src_path, dst, target, False, options, {"budget": budget} if budget else {})


def target_config(src_path: str | Path, target: str | Path) -> ModelConfig:
    """The `target` YAML over the source's config, from the source's args alone."""
    return ModelConfig.from_yaml(target, base=open_checkpoint(src_path, validate=False, quiet=True).config)


def budget_shape(src_path: str | Path, params: str, tp: int | None = None) -> tuple[ModelConfig, dict]:
    """The shape `shrink --params` picks for `src_path` (methods/budget.py), from its args alone,
    splittable at the output's TP (`tp`, default: the source's)."""
    reader = open_checkpoint(src_path, validate=False, quiet=True)
    src = reader.config
    n = budget.parse(params, num_parameters(src))
    cfg = budget.shape_for(src, n, tp or reader.tp)
    return cfg, budget.rule(src, cfg, n)


@dataclass(frozen=True)
class Job:
    """What a grow or shrink is asked to do besides its source, target and method's options."""

    kind: str  # methods.GROW or methods.SHRINK
    method: str
    out: OutputOptions
    topology: Topology
    seed: int
    overwrite: bool
    progress: bool
    data: DataOptions
    device: str | None
    optimizer_state: bool = False  # grow the source's Adam state too (grow --optimizer-state)


def _transform(job: Job, src_path, dst, target, dry_run: bool, options, record: dict | None = None) -> Summary | dict:
    start, compute = time.time(), resolve_device(job.device)  # a device this machine lacks: refused first
    check_destination(dst, job.overwrite or dry_run, None if dry_run else src_path)
    src = open_checkpoint(src_path, validate=not dry_run, quiet=not job.progress)
    if isinstance(target, ModelConfig):  # a shape chosen for a budget (`budget_shape`)
        dst_cfg, where = target, "--params"
    else:
        dst_cfg = ModelConfig.from_yaml(target, base=src.config) if target else src.config
        where = str(target or "--target")

    if job.optimizer_state:
        moments.require_held(src, "--optimizer-state")

    def context(m: methods.Method, op) -> ContextManager[Context]:
        _check_entrywise(job, op)
        session.preflight(src, op.dst, job.out, dst)  # layout and room first: preparing is the heavy part
        ranks = job.topology.ranks
        if ranks:  # each rank would train or calibrate on its own, and might not agree to the bit
            raise InputError(f"--method {job.method} prepares its operator on data, which is not shared between "
                             f"ranks ({ranks}): run it on one node (--workers uses its cores), then "
                             f"convert across nodes")
        return _context(m, src, job, compute)

    op, details = methods.build_operator(job.method, job.kind, src.config, dst_cfg, seed=job.seed, options=options,
                                         context=None if dry_run else context, where=where)
    if dry_run:
        return session.plan(src, op, job.out)
    _check_entrywise(job, op)
    with _grown_optimizer_state(src, op, job.optimizer_state) as optimizer_file:
        return session.write(src, op, dst, job.out, topology=job.topology, details={**details, **(record or {})},
                             files={**companion_files(src.root, job.data.tokenizer), **optimizer_file},
                             overwrite=job.overwrite, progress=job.progress, desc=f"{job.kind}/{job.method}",
                             start=start)


def _check_entrywise(job: Job, op) -> None:
    if job.optimizer_state:
        moments.require_entrywise(op, "--optimizer-state", job.method)


@contextlib.contextmanager
def _grown_optimizer_state(src, op, wanted: bool) -> Iterator[dict[str, Path]]:
    """{`optimizer_state.pt`: a temporary file of the source's Adam state grown with the weights}, for
    the writer to copy into the output; {} when not `wanted`."""
    if not wanted:
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="scalegrow-adam-") as tmp:
        path = Path(tmp) / optimizer.FILE
        optimizer.save(moments.grow(op, src.optimizer_state()), path)
        yield {optimizer.FILE: path}


@contextlib.contextmanager
def _context(method: methods.Method, src, job: Job, compute: torch.device) -> Iterator[Context]:
    """A prepare step's context on this process: `data` tokenized with the source's tokenizer, its
    computing on `compute`."""
    data = job.data
    seq = min(data.seq_length or method.seq_length, src.config.max_position_embeddings)
    batch_size = {"micro_batch_size": data.micro_batch_size} if data.micro_batch_size else {}
    trainer = LocalTrainer(seed=job.seed, progress=job.progress, device=compute, **batch_size)
    with corpus_streams(data.data, source_tokenizer(src.root, data.tokenizer), seq) as (train, _):
        yield Context(src, train, data.data, trainer, job.progress, device=compute)


def convert(src_path: str | Path, dst: str | Path, out: OutputOptions = OutputOptions(),
            overwrite: bool = False, progress: bool = True, dry_run: bool = False,
            topology: Topology = Topology()) -> Summary | dict:
    """Re-partition (TP/PP) and/or change format; the tensors themselves are untouched."""
    start = time.time()
    check_destination(dst, overwrite or dry_run, None if dry_run else src_path)
    src = open_checkpoint(src_path, validate=not dry_run, quiet=not progress)
    op = Identity(src.config, src.config)
    if dry_run:
        return session.plan(src, op, out)
    return session.write(src, op, dst, out, topology=topology, files=companion_files(src.root), overwrite=overwrite,
                         progress=progress, desc="convert", start=start)


def plan(src_cfg: ModelConfig, dst_cfg: ModelConfig, method: str = "lemon", out: OutputOptions = OutputOptions(),
         src_tp: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The output plan {file: {key: shard shape}} of growing a model of `src_cfg`'s shape with
    `method`; the operator really runs, on meta tensors, and nothing is allocated or written."""
    op, _ = methods.build_operator(method, methods.GROW, src_cfg, dst_cfg)
    return session.plan(MetaReader.of(src_cfg, src_tp, dtype), op, out)


def evaluate(path: str | Path, data: str = "embedded", tokenizer: str | None = None, tokens: int = 32768,
             seq_length: int = 256, device: str | None = None) -> dict:
    """Mean next-token loss of a checkpoint on the held-out split of `data`, computed on `device`."""
    compute = resolve_device(device)
    model = load_model(path).to(compute)
    seq = min(seq_length, model.cfg.max_position_embeddings)
    with corpus_streams(data, source_tokenizer(path, tokenizer), seq) as (_, valid):
        n = max(1, min(valid.num_samples, tokens // seq))
        total = 0.0
        with torch.no_grad():
            for first in range(0, n, 8):
                windows = batch(valid, list(range(first, min(n, first + 8)))).to(compute)
                total += model.loss(windows).item() * len(windows)
    loss = total / n
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n * seq, "data": data}


def verify(src_path: str | Path, dst_path: str | Path, tokens: int = 512, seed: int = 0,
           device: str | None = None) -> dict:
    """Run the same random token batch through both models on `device`; compare logits and losses."""
    compute = resolve_device(device)
    a, b = load_model(src_path).to(compute), load_model(dst_path).to(compute)
    vocab = min(a.cfg.vocab_size or a.cfg.padded_vocab_size, b.cfg.vocab_size or b.cfg.padded_vocab_size)
    seq = min(tokens, a.cfg.max_position_embeddings, b.cfg.max_position_embeddings)
    batch_ = torch.randint(0, vocab, (max(1, math.ceil(tokens / seq)), seq),
                           generator=torch.Generator().manual_seed(seed)).to(compute)
    with torch.no_grad():
        la, lb = a(batch_)[..., :vocab], b(batch_)[..., :vocab]  # re-padded rows are not part of the function
    diff = (la - lb).abs().max().item()
    scale = la.abs().max().item()

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch_[:, 1:].flatten()).item()

    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale else 0.0, "max_abs_logit": scale,
            "loss_src": loss(la), "loss_dst": loss(lb)}


def inspect(path: str | Path) -> dict:
    ckpt = open_checkpoint(path)
    shards = [{"file": str(f.relative_to(ckpt.root)), "bytes": f.stat().st_size} for f in ckpt.files()]
    return {
        "path": str(ckpt.root), "format": ckpt.format, "description": FORMATS[ckpt.format].description,
        "iteration": ckpt.iteration, "tensor_model_parallel_size": ckpt.tp, "pipeline_model_parallel_size": ckpt.pp,
        "layers_per_stage": list(ckpt.layout.stages.layers_per_stage), "dtype": str(ckpt.dtype).replace("torch.", ""),
        "num_parameters": num_parameters(ckpt.config), "model": ckpt.config.to_dict(), "shards": shards, **ckpt.notes(),
        "total_bytes": sum(s["bytes"] for s in shards),
    }
