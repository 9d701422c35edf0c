"""Bridge to megatron-core: its `GPTModel` for a `ModelConfig`, and a private process group.

The library uses megatron-core's own model only as a *template* of names and shardings for the
`torch_dist` format (built on the meta device, so it allocates nothing). Tests use the same builders
to run megatron-core as the oracle.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from scalegrow.config import ModelConfig


def transformer_config(cfg: ModelConfig, tp: int = 1, pp: int = 1, first: int | None = None,
                       last: int | None = None, **extra):
    """megatron-core `TransformerConfig` for `cfg`, with CPU-safe fusion settings."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels, normalization=cfg.normalization, layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.swiglu, activation_func=F.silu if cfg.swiglu else F.gelu,
        add_bias_linear=cfg.add_bias_linear, add_qkv_bias=cfg.add_qkv_bias,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=torch.float32 if pp > 1 else None,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        **extra,
    )


def build_gpt(cfg: ModelConfig, tp: int = 1, pp: int = 1, pre_process: bool = True,
              post_process: bool = True, first: int | None = None, last: int | None = None,
              parallel_output: bool = True, **extra):
    """megatron-core's `GPTModel` with the local (non-Transformer-Engine) layer spec."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return GPTModel(
            config=transformer_config(cfg, tp, pp, first, last, **extra),
            transformer_layer_spec=get_gpt_layer_local_spec(normalization=cfg.normalization),
            vocab_size=cfg.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre_process, post_process=post_process, parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.tied,
            position_embedding_type=cfg.position_embedding_type,
            rotary_percent=cfg.rotary_percent, rotary_base=cfg.rotary_base,
        )


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """megatron-core's TP1/PP1 parallel state on a private one-process gloo group (a FileStore, no
    network), torn down on exit. Reuses an already initialised one-process TP1/PP1 state."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("torch_dist conversion runs in a single process, outside a distributed job")
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(1, 1)
        yield
        return
    with tempfile.TemporaryDirectory(prefix="scalegrow-pg-") as tmp:
        store = dist.FileStore(str(Path(tmp) / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            ps.initialize_model_parallel(1, 1)
            yield
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()


@contextlib.contextmanager
def cpu_fallbacks_without_cuda() -> Iterator[None]:
    """megatron-core's checkpoint writer calls `torch.cuda.synchronize()` and allocates a flag on
    `torch.cuda.current_device()` unconditionally. On a machine without CUDA, for the duration of
    the call, synchronising is a no-op and the current device is the CPU."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved
