"""FP8 weights quantised in blocks (DeepSeek-V3's and the Qwen3 FP8 releases' format) read as bf16:
transformers' own CPU dequantisation is the oracle, on a tiny llama and a tiny Qwen3-MoE."""
from __future__ import annotations

import json
import math

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.formats.hf import fp8
from scalegrow.formats.options import HFOptions, OutputOptions

from hf_models import build
from test_hf import safetensors_state

BLOCK = (16, 16)  # dividing every shape here: transformers' reading of a partial block differs (below)
FP8_MAX = 448.0  # float8_e4m3fn's largest value


def quantise(src, dst, block=BLOCK):
    """`src` with every projection weight in FP8 blocks and its scale_inv beside it, the rest in bf16
    (DeepSeek's routing bias in fp32, as its release has it)."""
    from safetensors.torch import save_file

    from scalegrow.formats.hf.shards import always_fp32

    out = {}
    for name, t in safetensors_state(src).items():
        if name.endswith("_proj.weight"):
            rows, cols = t.shape[-2:]
            grid = (*t.shape[:-2], math.ceil(rows / block[0]), block[0], math.ceil(cols / block[1]), block[1])
            padded = torch.zeros(*t.shape[:-2], grid[-4] * block[0], grid[-2] * block[1])
            padded[..., :rows, :cols] = t
            amax = padded.reshape(grid).abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # [..., R, C]
            scale = amax / FP8_MAX
            out[name] = (t / fp8.dequantize(torch.ones_like(t), scale, block, torch.float32)).to(torch.float8_e4m3fn)
            out[name + fp8.SCALE_SUFFIX] = scale.float()
        else:
            out[name] = t if always_fp32(name) else t.to(torch.bfloat16)
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.update(dtype="bfloat16", quantization_config={"quant_method": "fp8", "weight_block_size": list(block),
                                                          "activation_scheme": "dynamic", "fmt": "e4m3"})
    (dst / "config.json").write_text(json.dumps(config))
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def transformers_state(path) -> dict[str, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])  # the Hub's Qwen3 FP8 MoE: experts one by one
def test_fp8_blocks_read_as_transformers_dequantises_them(tmp_path, family):
    src = build(family, tmp_path / family)
    quantised = quantise(src, tmp_path / "fp8")
    layout = "fused" if family == "qwen3_moe" else None  # transformers holds experts fused in memory
    commands.convert(quantised, tmp_path / "out", OutputOptions(format="hf", hf=HFOptions(expert_layout=layout)),
                     progress=False)
    ours, theirs = safetensors_state(tmp_path / "out"), transformers_state(quantised)
    theirs = {k: v for k, v in theirs.items() if k in ours or k != "lm_head.weight"}
    assert ours.keys() == theirs.keys() and [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def test_a_last_partial_block_takes_its_own_scale():
    """DeepSeek's shapes need not divide by 128 (kv_a_proj_with_mqa's 576 rows): blocks are ceil-divided,
    as DeepSeek's own weight_dequant has it. (transformers 5.23 instead divides the rows evenly by the
    scale grid, blocks of 288 for those 576 rows, a different function.)"""
    weight = torch.randn(5, 7).to(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0, 3.0], [5.0, 7.0]])  # blocks of 4 x 4: rows 0-3 / 4, columns 0-3 / 4-6
    got = fp8.dequantize(weight, scale, (4, 4), torch.float32)
    want = torch.tensor([[scale[i // 4, j // 4].item() for j in range(7)] for i in range(5)]) * weight.float()
    assert torch.equal(got, want)


@pytest.mark.parametrize("change, words", [
    ({"quant_method": "gptq", "weight_block_size": None}, "quantization_config: quant_method 'gptq'"),
    ({"weight_block_size": [128, 128]}, None),  # the blocks are the scales' business: refused below
])
def test_other_quantisation_and_missing_scales_are_refused_by_name(tmp_path, capsys, change, words):
    quantised = quantise(build("llama", tmp_path / "llama"), tmp_path / "fp8")
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"].update(change)
    (quantised / "config.json").write_text(json.dumps(config))
    if words is None:  # drop one scale: its weight has no meaning
        from safetensors.torch import save_file
        state = safetensors_state(quantised)
        del state["model.layers.0.mlp.down_proj.weight_scale_inv"]
        save_file(state, quantised / "model.safetensors", metadata={"format": "pt"})
        words = "model.layers.0.mlp.down_proj.weight: an FP8 tensor without"
    capsys.readouterr()  # transformers' progress while building
    assert cli.main(["convert", "--src", str(quantised), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
