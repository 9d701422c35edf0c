"""`scalegrow.json`: the record beside every checkpoint scalegrow writes, one schema for all of them.

    scalegrow_version    the package version that wrote it
    format               torch | torch_dist | hf | deepspeed
    method               what made it: a method (lemon, subclone, identity, ...), init, pretrain, grow_pretrain
    model                the resolved model config (Megatron names)
    tensor_model_parallel_size, pipeline_model_parallel_size, layers_per_stage, iteration
    source               provenance: the input checkpoint's path, format, manifest sha256, model and layout
                         (null for a random init or a training run from scratch)
    details              what the method decided: seed, kept layers, LiGO's operator losses, ...
    training             a training export's summary (steps, losses, run config); null otherwise
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import scalegrow
from scalegrow.core.config import ModelConfig
from scalegrow.core.layout import Layout
from scalegrow.errors import InputError

METADATA = "scalegrow.json"


def source_record(reader) -> dict[str, Any]:
    """Where a checkpoint came from: enough to find the exact input again (`reader`: a format Reader)."""
    return {"path": str(reader.root.resolve()), "format": reader.format, "manifest_sha256": reader.manifest_sha256(),
            "model": reader.config.to_dict(), "tensor_model_parallel_size": reader.tp,
            "pipeline_model_parallel_size": reader.pp}


def record(fmt: str, cfg: ModelConfig, layout: Layout, iteration: int | str, method: str,
           source: dict | None = None, details: dict | None = None, training: dict | None = None) -> dict[str, Any]:
    return {
        "scalegrow_version": scalegrow.__version__,
        "format": fmt,
        "method": method,
        "model": cfg.to_dict(),
        "tensor_model_parallel_size": layout.tp,
        "pipeline_model_parallel_size": layout.pp,
        "layers_per_stage": list(layout.stages.layers_per_stage),
        "iteration": iteration,
        "source": source,
        "details": details or {},
        "training": training,
    }


def write(out_dir: Path, meta: dict[str, Any]) -> None:
    (out_dir / METADATA).write_text(json.dumps(meta, indent=2) + "\n")


def read_model(out_dir: Path) -> ModelConfig:
    """The model config recorded beside a checkpoint."""
    path = out_dir / METADATA
    try:
        return ModelConfig.from_dict(json.loads(path.read_text())["model"])
    except FileNotFoundError:
        raise InputError(f"{path}: missing (a DeepSpeed checkpoint needs the model config scalegrow "
                         f"training writes beside it)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable model config ({exc})") from exc
