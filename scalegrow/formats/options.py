"""What a write is asked for, split by what it concerns: the output's format, its partition
(`LayoutOptions`), the tokenizer's vocabulary, and each format's own options (`HFOptions`). How many
processes write it is the write engine's (`write.session.Topology`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype's names


@dataclass(frozen=True)
class LayoutOptions:
    """The output's partition as asked for (Megatron-LM's names); None keeps the source's."""

    tp: int | None = None  # tensor parallel size
    pp: int | None = None  # pipeline parallel size
    first: int | None = None  # decoder_first_pipeline_num_layers: an uneven first stage
    last: int | None = None  # decoder_last_pipeline_num_layers: an uneven last stage
    ep: int | None = None  # expert parallel size (MoE)


@dataclass(frozen=True)
class HFOptions:
    """The Hugging Face format's own options."""

    max_shard_size: int = 5 * 10**9  # the largest safetensors file, as transformers' save_pretrained ("5GB")
    model_type: str | None = None  # the family to write (None: the source's, else its structure's)
    # an MoE model's experts: "per-expert" (the Hub's) or "fused" (transformers 5's 3-D tensors);
    # None: the source's (per-expert for a model that never was HF)
    expert_layout: str | None = None


TORCH_DIST_COMMON = ("common.pt", "inline")
TORCH_DIST_MODELS = ("gpt", "hybrid")


@dataclass(frozen=True)
class TorchDistOptions:
    """megatron-core's torch_dist format's own options."""

    # where the common state (args, iteration) goes: common.pt, which megatron-core 0.16 to 0.19 all
    # read (0.19 logs that it is deprecated), or inline, inside the .distcp files, as 0.19 saves it
    # (0.16 to 0.18 cannot read that)
    common: str = "common.pt"
    # the megatron-core model whose keys it has: gpt (GPTModel's, which HybridModel runs of megatron-core
    # 0.19 also load) or hybrid (HybridModel's `*-` layers, which only they load); None: the source's
    model: str | None = None


@dataclass(frozen=True)
class OutputOptions:
    format: str = "torch"
    layout: LayoutOptions = field(default_factory=LayoutOptions)
    vocab_size: int | None = None  # the tokenizer's true size, to re-pad the vocabulary (None: from args)
    hf: HFOptions = field(default_factory=HFOptions)
    torch_dist: TorchDistOptions = field(default_factory=TorchDistOptions)
    dtype: str | None = None  # the weights' dtype, a DTYPES name (None: the source's)
    drop_mtp: bool = False  # write without a source's multi-token-prediction layers (no output holds them yet)

    def weights_dtype(self, source: torch.dtype) -> torch.dtype:
        """What the output's tensors are stored in: `dtype`, else the source's (a bf16 model grown with
        LEMON into fp32 keeps the function to fp32 noise; stored in bf16 each weight is rounded)."""
        return DTYPES[self.dtype] if self.dtype is not None else source
