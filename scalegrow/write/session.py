"""The write session: resolve the output layout and check for room before any heavy work, stream an
operator's result into the format's writer inside an atomic `DST.partial-*` directory (one process,
forked workers, or several ranks each writing a share of the files: the `Topology`), record
`scalegrow.json` and the tokenizer, rename into place.

Every command that writes (grow, shrink, convert, init) and every training export ends here.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import num_parameters
from scalegrow.core.layout import Layout, Stages
from scalegrow.errors import InputError
from scalegrow.formats import metadata, registry
from scalegrow.formats.base import MetaReader, Reader
from scalegrow.formats.io import WriteError, atomic_output_dir, freed_memory_kept, tree_bytes
from scalegrow.formats.options import LayoutOptions, OutputOptions
from scalegrow.formats.plan import PlanWriter
from scalegrow.operators.base import Operator
from scalegrow.write import executor, workers
from scalegrow.write.destination import check_room, explain_full_device
from scalegrow.write.ranks import Ranks


@dataclass(frozen=True)
class Topology:
    """Which processes write one checkpoint: forked workers on this node, among several ranks."""

    workers: int | None = 1  # processes writing the output files (None: as cores and memory allow)
    ranks: Ranks | None = None  # this is one of several ranks writing the files (None: alone)


@dataclass
class Summary:
    dst: Path
    params_src: int | None
    params_dst: int
    seconds: float
    bytes_written: int
    tp: int
    pp: int
    rank: str | None = None  # one of several ranks ("rank 1 of 2"): bytes_written are its own files'

    def __str__(self) -> str:
        if self.rank:
            return (f"wrote its share of {self.dst} as {self.rank} ({self.bytes_written / 2**20:.1f} MiB) "
                    f"in {self.seconds:.1f}s; rank 0 renamed it into place")
        src = f"{self.params_src / 1e6:.2f}M -> " if self.params_src else ""
        return (f"wrote {self.dst} ({src}{self.params_dst / 1e6:.2f}M params, TP={self.tp} PP={self.pp}, "
                f"{self.bytes_written / 2**20:.1f} MiB) in {self.seconds:.1f}s")


def resolve(source: Reader, cfg: ModelConfig, opts: OutputOptions) -> tuple[ModelConfig, Layout]:
    """The target config as the output format stores it (its vocabulary padding) and the layout:
    the source's own stage split (uneven too) when neither PP nor the layer count changes."""
    fmt, asked = registry.get(opts.format), opts.layout
    if not fmt.parallel:
        return _unparallel(fmt, cfg, opts)
    tp = asked.tp or source.tp
    cfg = fmt.target_config(cfg, tp, opts.vocab_size)
    try:
        cfg.check_tp(tp)
    except ValueError as exc:
        raise InputError(f"--tp: {exc}") from exc
    ep = _expert_parallel(cfg, asked.ep or (source.layout.ep if cfg.moe else 1))
    keep_split = asked.pp is None and asked.first is None and asked.last is None
    if keep_split and cfg.num_layers == source.layout.stages.num_layers:
        return cfg, Layout(tp, source.layout.stages, ep)
    try:
        return cfg, Layout(tp, Stages.build(cfg.num_layers, asked.pp or source.pp, asked.first, asked.last), ep)
    except ValueError as exc:
        raise InputError(f"--pp: {exc}") from exc


def _expert_parallel(cfg: ModelConfig, ep: int) -> int:
    if ep > 1 and not cfg.moe:
        raise InputError(f"--ep: {ep} expert-parallel ranks, but this model is dense (no num_moe_experts)")
    if cfg.moe and cfg.moe.num_experts % ep:
        raise InputError(f"--ep: num_moe_experts {cfg.moe.num_experts} is not divisible by expert parallel size {ep}")
    return ep


def _unparallel(fmt, cfg: ModelConfig, opts: OutputOptions) -> tuple[ModelConfig, Layout]:
    """A format without model parallelism (HF): one pipeline stage at TP 1, whatever the source's."""
    asked: LayoutOptions = opts.layout
    for flag, value in (("--tp", asked.tp), ("--pp", asked.pp), ("--ep", asked.ep)):
        if value not in (None, 1):
            raise InputError(f"{flag}: the {fmt.name} format has no model parallelism (got {value}; "
                             f"--format torch or torch_dist writes a Megatron checkpoint)")
    if asked.first is not None or asked.last is not None:
        raise InputError(f"--decoder-first/last-pipeline-num-layers: the {fmt.name} format has no pipeline stages")
    return fmt.target_config(cfg, 1, opts.vocab_size), Layout.single(cfg.num_layers)


def refuse_dropped_tensors(source: Reader, opts: OutputOptions) -> None:
    """A source's multi-token-prediction layers go nowhere: refused by name unless --drop-mtp."""
    mtp = getattr(source, "mtp", ())
    if mtp and not opts.drop_mtp:
        layers = sorted({".".join(name.split(".")[:3]) for name in mtp})
        names = ", ".join(f"{layer}.*" for layer in layers)
        raise InputError(f"{names}: {len(layers)} multi-token-prediction layer(s) ({len(mtp)} tensors, "
                         f"num_nextn_predict_layers) that scalegrow's model and every output lack; --drop-mtp "
                         f"writes the model without them (transformers ignores them too)")


def preflight(source: Reader, cfg: ModelConfig, opts: OutputOptions, dst: str | Path) -> tuple[ModelConfig, Layout]:
    """Every check that needs no tensor data: the output layout (`resolve`), and room for the output
    on the destination's device. Callers run it before any heavy work (calibration, training)."""
    refuse_dropped_tensors(source, opts)
    cfg, layout = resolve(source, cfg, opts)
    check_room(registry.get(opts.format).size(cfg, layout, opts.weights_dtype(source.dtype)), dst)
    return cfg, layout


def write(source: Reader, op: Operator, dst: str | Path, opts: OutputOptions = OutputOptions(), *,
          topology: Topology = Topology(), method: str | None = None, details: dict | None = None,
          source_record: dict | None = None, training: dict | None = None, files: dict[str, Path] | None = None,
          overwrite: bool = False, progress: bool = True, desc: str | None = None,
          start: float | None = None) -> Summary:
    """Stream `op` applied to `source` into a new checkpoint at `dst`, with `files` (name -> path, e.g.
    the tokenizer) copied beside it. `source_record` is the provenance to record (default: `source`
    itself, unless it lives in memory); `desc` names the progress bar."""
    start = time.time() if start is None else start
    cfg, layout = preflight(source, op.dst, opts, dst)
    fmt, group = registry.get(opts.format), topology.ranks
    if source_record is None and source.on_disk:
        source_record = metadata.source_record(source)
    origin = source.hf_origin()  # an HF family travels, so the model can go back to HF as it was
    details = {**({"hf": origin} if origin else {}), **(details or {}), **op.details()}
    n, sizes, mine = _workers(fmt, cfg, layout, opts.weights_dtype(source.dtype), topology)
    with group.output_dir(dst, overwrite) if group else atomic_output_dir(dst, overwrite) as out:
        try:
            with freed_memory_kept():  # layer after layer of the same sizes: reused, not faulted in afresh
                _stream(source, op, lambda: fmt.writer(out, cfg, layout, source, opts), sizes, mine, n, out, group,
                        progress, desc or op.name)
        except (WriteError, OSError, RuntimeError) as exc:
            explain_full_device(exc, out, dst)
            raise
        if group and not group.leader:  # its files are there; rank 0 records, copies and renames
            return Summary(Path(dst), None, num_parameters(cfg), time.time() - start, sum(mine.values()),
                           layout.tp, layout.pp, rank=str(group))
        metadata.write(out, metadata.record(fmt.name, cfg, layout, source.iteration, method or op.name,
                                            source_record, details, training))
        for name, path in (files or {}).items():
            (out / name).parent.mkdir(exist_ok=True)  # additional_chat_templates/
            shutil.copyfile(path, out / name)
        nbytes = tree_bytes(out)
    params_src = num_parameters(source.config) if source.on_disk else None
    return Summary(Path(dst), params_src, num_parameters(cfg), time.time() - start, nbytes, layout.tp, layout.pp)


def _stream(source: Reader, op: Operator, make_writer, sizes: dict, mine: dict, n: int, out: Path,
            group: Ranks | None, progress: bool, desc: str) -> None:
    """This process writes every file; or its `n` forked workers write this rank's share (`mine`),
    rank 0 waits for every rank's, and then writes what the format writes once (`complete`: the
    tracker, an index, metadata)."""
    if n == 1 and group is None:
        executor.run(source, op, make_writer(), progress=progress, desc=desc)
        return
    bar = workers.progress_bar(sum(sizes.values()), progress and (group is None or group.leader), desc)
    completing = make_writer()  # before the fork: what it imports (DCP's ~1 s) the workers then share
    workers.run(source, op, make_writer, workers.divide(mine, n), out, bar, group.check if group else lambda: None,
                group.rank if group else 0)
    if group:
        group.gather(lambda: workers.move(bar, out))
    bar.close()
    if group is None or group.leader:
        completing.complete()


def _workers(fmt, cfg: ModelConfig, layout: Layout, dtype, topology: Topology) -> tuple[int, dict, dict]:
    """How many processes write this rank's share (--workers, or with None what cores and memory
    allow), the bytes of every work unit of the output, and of this rank's (all, when alone)."""
    ranks = topology.ranks
    sizes = fmt.work_units(cfg, layout, dtype)
    mine = ranks.share(sizes) if ranks else sizes
    n, note = workers.count(topology.workers, mine)
    if note:
        print(f"scalegrow: {note}", file=sys.stderr)
    return n, sizes, mine


def plan(source: Reader, op: Operator, opts: OutputOptions = OutputOptions(), progress: bool = False) -> dict:
    """The output plan {file: {key: shard shape}}: the operator really runs, on meta tensors of the
    source's shapes, but nothing is read, allocated or written."""
    refuse_dropped_tensors(source, opts)
    meta = MetaReader.like(source)
    cfg, layout = resolve(meta, op.dst, opts)
    planner = registry.get(opts.format).planner or PlanWriter
    writer = planner(Path("plan"), cfg, layout, meta, opts)
    executor.run(meta, op, writer, progress=progress)
    return writer.plan
