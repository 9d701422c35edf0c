"""Writing a checkpoint: resolve the output layout, stream an operator's result into the format's
writer inside an atomic `DST.partial-*` directory, record `scalegrow.json`, rename into place.

Every command that writes (grow, shrink, convert, init) and every training export ends here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from scalegrow import executor, metadata
from scalegrow.config import ModelConfig
from scalegrow.errors import InputError
from scalegrow.formats import registry
from scalegrow.formats.base import MetaReader, Reader
from scalegrow.formats.io import atomic_output_dir
from scalegrow.formats.plan import PlanWriter
from scalegrow.operators.base import Operator
from scalegrow.parallel import Layout, Stages


@dataclass(frozen=True)
class OutputOptions:
    """Where and how to write: TP/PP (None: the source's), an uneven first/last stage, the format,
    and the tokenizer's true vocabulary size for re-padding (None: from args, else keep the rows)."""

    tp: int | None = None
    pp: int | None = None
    first: int | None = None
    last: int | None = None
    format: str = "torch"
    vocab_size: int | None = None


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


def check_destination(dst: str | Path, overwrite: bool) -> None:
    """Fail before any work when the output exists (atomic_output_dir checks again at the end)."""
    if Path(dst).exists() and not overwrite:
        raise InputError(f"{dst}: destination exists (pass --overwrite to replace it)")


def resolve(source: Reader, cfg: ModelConfig, opts: OutputOptions) -> tuple[ModelConfig, Layout]:
    """The target config as the output format stores it (its vocabulary padding) and the layout:
    the source's own stage split (uneven too) when neither PP nor the layer count changes."""
    fmt = registry.get(opts.format)
    tp = opts.tp or source.tp
    cfg = fmt.target_config(cfg, tp, opts.vocab_size)
    try:
        cfg.check_tp(tp)
    except ValueError as exc:
        raise InputError(f"--tp: {exc}") from exc
    keep_split = opts.pp is None and opts.first is None and opts.last is None
    if keep_split and cfg.num_layers == source.layout.stages.num_layers:
        return cfg, Layout(tp, source.layout.stages)
    try:
        return cfg, Layout(tp, Stages.build(cfg.num_layers, opts.pp or source.pp, opts.first, opts.last))
    except ValueError as exc:
        raise InputError(f"--pp: {exc}") from exc


def write(source: Reader, op: Operator, dst: str | Path, opts: OutputOptions = OutputOptions(), *,
          method: str | None = None, details: dict | None = None, source_record: dict | None = None,
          training: dict | None = None, overwrite: bool = False, progress: bool = True,
          start: float | None = None) -> Summary:
    """Stream `op` applied to `source` into a new checkpoint at `dst`. `source_record` is the
    provenance to record (default: `source` itself, unless it lives in memory)."""
    start = time.time() if start is None else start
    cfg, layout = resolve(source, op.dst, opts)
    fmt = registry.get(opts.format)
    if source_record is None and source.on_disk:
        source_record = metadata.source_record(source)
    with atomic_output_dir(dst, overwrite) as out:
        executor.run(source, op, fmt.writer(out, cfg, layout, source), progress=progress)
        metadata.write(out, metadata.record(fmt.name, cfg, layout, source.iteration, method or op.name,
                                            source_record, {**(details or {}), **op.details()}, training))
        nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    params_src = source.config.num_parameters() if source.on_disk else None
    return Summary(Path(dst), params_src, cfg.num_parameters(), time.time() - start, nbytes, layout.tp, layout.pp)


def plan(source: Reader, op: Operator, opts: OutputOptions = OutputOptions(), progress: bool = False) -> dict:
    """The output plan {file: {key: shard shape}}: the operator really runs, on meta tensors of the
    source's shapes, but nothing is read, allocated or written."""
    meta = MetaReader.like(source)
    cfg, layout = resolve(meta, op.dst, opts)
    writer = PlanWriter(Path("plan"), cfg, layout, meta)
    executor.run(meta, op, writer, progress=progress)
    return writer.plan
