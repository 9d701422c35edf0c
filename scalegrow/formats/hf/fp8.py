"""FP8 weights quantised in blocks, as DeepSeek-V3 and the Qwen3 FP8 releases ship them, read as
full-precision tensors one at a time.

config.json says `quantization_config: {"quant_method": "fp8", "weight_block_size": [128, 128]}`; each
quantised weight W (float8_e4m3fn, [rows, cols], or [E, rows, cols] for fused experts) has a sibling
`W_scale_inv` (`….weight_scale_inv`, float32, [ceil(rows/b0), ceil(cols/b1)]) holding, per block, the
factor that restores it: W_full[i, j] = W[i, j] · scale_inv[i // b0, j // b1] (a last, partial block
included, as DeepSeek's own `weight_dequant` has it). The product is taken in fp32 and stored in the
checkpoint's other dtype (bf16), as transformers' CPU dequantisation does; an output never carries the
quantisation (its weights are the dequantised ones).
"""
from __future__ import annotations

import torch

from scalegrow.formats.hf.family import Unsupported

QUANT_KEY = "quantization_config"
SCALE_SUFFIX = "_scale_inv"  # `model.layers.0.mlp.down_proj.weight_scale_inv`
FP8_DTYPE = "F8_E4M3"


def block_size(hf: dict) -> tuple[int, int] | None:
    """The quantisation blocks a config.json names (None: not quantised); any other method is refused."""
    quant = hf.get(QUANT_KEY)
    if not quant:
        return None
    method, block = quant.get("quant_method"), quant.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise Unsupported(f"{QUANT_KEY}: quant_method {method!r} with weight_block_size {block!r} is not supported "
                          f"(only fp8 in [rows, cols] blocks is read, as DeepSeek-V3 ships it)")
    return int(block[0]), int(block[1])


def split_scales(entries: dict) -> tuple[dict, dict]:
    """(the tensors, weight name -> its scale's entry): scales are not tensors of the model."""
    scales = {name.removesuffix(SCALE_SUFFIX): e for name, e in entries.items() if name.endswith(SCALE_SUFFIX)}
    return {n: e for n, e in entries.items() if not n.endswith(SCALE_SUFFIX)}, scales


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """W · scale_inv per block ([..., rows, cols] with [..., ceil(rows/b0), ceil(cols/b1)]), in `dtype`."""
    rows, cols = weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (weight.float() * scale).to(dtype)
