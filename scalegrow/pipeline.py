"""The commands behind the CLI, as plain functions: init, grow, verify, inspect.

Each one that writes a checkpoint builds it in a `DST.partial-*` sibling, writes `scalegrow.json`
next to it and renames it into place at the end.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import scalegrow
from scalegrow import arch
from scalegrow.checkpoint import open_checkpoint
from scalegrow.checkpoint.io import atomic_output_dir
from scalegrow.checkpoint.megatron import MegatronCheckpoint, MegatronWriter, expected_specs
from scalegrow.checkpoint.sharding import StageLayout
from scalegrow.config import ModelConfig
from scalegrow.errors import InputError
from scalegrow.growth import get_operator
from scalegrow.model import GPT, init_weights
from scalegrow.stream import grow_checkpoint

METADATA = "scalegrow.json"


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


def write_metadata(out_dir: Path, cfg: ModelConfig, writer: MegatronWriter, method: str,
                   source: MegatronCheckpoint | None, **extra) -> None:
    meta = {
        "scalegrow_version": scalegrow.__version__,
        "format": "torch",
        "method": method,
        "model": cfg.to_dict(),
        "tensor_model_parallel_size": writer.tp,
        "pipeline_model_parallel_size": writer.layout.pp,
        "layers_per_stage": list(writer.layout.layers_per_stage),
        "iteration": writer.iteration,
        "source": None if source is None else {
            "path": str(source.root.resolve()), "manifest_sha256": source.manifest_sha256(),
            "model": source.config.to_dict(), "tensor_model_parallel_size": source.tp,
            "pipeline_model_parallel_size": source.pp},
        **extra,
    }
    (out_dir / METADATA).write_text(json.dumps(meta, indent=2) + "\n")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _layout(cfg: ModelConfig, pp: int) -> StageLayout:
    try:
        return StageLayout.build(cfg.num_layers, pp)
    except ValueError as exc:
        raise InputError(f"--pp: {exc}") from exc


def _check_tp(cfg: ModelConfig, tp: int, where: str) -> None:
    try:
        cfg.check_tp(tp)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from exc


def init_checkpoint(cfg: ModelConfig, dst: str | Path, tp: int = 1, pp: int = 1, seed: int = 0,
                    dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Summary:
    """A randomly initialised (Megatron init) checkpoint: a stand-in for a pretrained one."""
    start = time.time()
    _check_tp(cfg, tp, "--tp")
    model = GPT(cfg)
    init_weights(model, seed)
    return save_model(model.state_dict(), cfg, dst, tp=tp, pp=pp, dtype=dtype, overwrite=overwrite,
                      method="init", start=start, extra={"seed": seed})


def save_model(sd: dict[str, torch.Tensor], cfg: ModelConfig, dst: str | Path, *, tp: int = 1,
               pp: int = 1, dtype: torch.dtype = torch.float32, overwrite: bool = False,
               method: str = "export", iteration: int | str = "release", start: float | None = None,
               base_args=None, extra: dict | None = None) -> Summary:
    """Write an in-memory reference-model state dict as a Megatron checkpoint at TP/PP."""
    start = time.time() if start is None else start
    layout = _layout(cfg, pp)
    full = dict(sd)
    if cfg.tied and pp > 1:
        full[arch.OUTPUT_LAYER] = sd[arch.WORD_EMBEDDINGS]
    with atomic_output_dir(dst, overwrite) as out:
        writer = MegatronWriter(out, cfg, base_args, tp, layout, iteration, dtype)
        for stage in range(pp):
            writer.write_all(stage, {k: full[k] for k, _ in expected_specs(cfg, layout, stage)})
        writer.finish()
        write_metadata(out, cfg, writer, method, None, **(extra or {}))
        nbytes = _dir_bytes(out)
    return Summary(Path(dst), None, cfg.num_parameters(), time.time() - start, nbytes, tp, pp)


def grow(src_path: str | Path, dst: str | Path, method: str, target: str | Path | None,
         tp: int | None = None, pp: int | None = None, seed: int = 0, overwrite: bool = False,
         progress: bool = True) -> Summary:
    start = time.time()
    op_cls = get_operator(method)
    src = open_checkpoint(src_path)
    dst_cfg = ModelConfig.from_yaml(target, base=src.config) if target else src.config
    try:
        op = op_cls(src.config, dst_cfg, seed=seed)
    except ValueError as exc:
        raise InputError(f"{target}: {exc}") from exc
    tp, pp = tp or src.tp, pp or src.pp
    _check_tp(op.dst, tp, "--tp")
    layout = _layout(op.dst, pp)
    with atomic_output_dir(dst, overwrite) as out:
        writer = MegatronWriter(out, op.dst, src.args, tp, layout, src.iteration, src.dtype)
        grow_checkpoint(src, op, writer, progress=progress)
        write_metadata(out, op.dst, writer, method, src, seed=seed)
        nbytes = _dir_bytes(out)
    return Summary(Path(dst), src.config.num_parameters(), op.dst.num_parameters(), time.time() - start,
                   nbytes, tp, pp)


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
    common = min(la.shape[-1], lb.shape[-1])
    diff = (la[..., :common] - lb[..., :common]).abs().max().item()
    scale = la[..., :common].abs().max().item()

    def loss(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).item()

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
