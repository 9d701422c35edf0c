"""Both expert layouts of Hugging Face MoE checkpoints: per-expert tensors as the Hub has them
(`experts.{e}.gate_proj` ...) and transformers 5's fused 3-D tensors (`mlp.experts.gate_up_proj`
[E, 2F, H], `mlp.experts.down_proj` [E, H, F], the router as `mlp.gate`), which mergekit writes. The fused
checkpoints here are transformers' own per-expert saves restacked; transformers loads both strictly."""
from __future__ import annotations

import json

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.formats.options import HFOptions, LayoutOptions, OutputOptions

from hf_models import build, logits
from test_hf import TOKENS, close, safetensors_state

MOE = ("mixtral", "qwen3_moe", "qwen2_moe")


def fuse(src, dst):
    """A per-expert HF directory rewritten in the fused layout (everything else copied as it is)."""
    from safetensors.torch import save_file

    state, cfg = safetensors_state(src), json.loads((src / "config.json").read_text())
    experts = cfg.get("num_local_experts") or cfg["num_experts"]
    names = ("block_sparse_moe", "w1", "w3", "w2") if cfg["model_type"] == "mixtral" else \
        ("mlp", "gate_proj", "up_proj", "down_proj")
    out = {k.replace("block_sparse_moe.", "mlp."): v for k, v in state.items() if ".experts." not in k
           or "shared_expert" in k}
    for i in range(cfg["num_hidden_layers"]):
        one = [f"model.layers.{i}.{names[0]}.experts.{{e}}.{n}.weight" for n in names[1:]]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([state[one[0].format(e=e)], state[one[1].format(e=e)]]) for e in range(experts)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([state[one[2].format(e=e)]
                                                                    for e in range(experts)])
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {f: (build(f, root / f), fuse(root / f, root / f"{f}-fused")) for f in MOE}


@pytest.mark.parametrize("family", MOE)
def test_fused_checkpoint_reads_as_transformers_computes_and_verifies(models, family, capsys):
    per_expert, fused = models[family]
    with torch.no_grad():
        assert close(logits(fused, TOKENS), commands.load_model(fused)(TOKENS))
    assert cli.main(["verify", "--src", str(per_expert), "--dst", str(fused)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_abs_diff"] == 0.0


@pytest.mark.parametrize("family", MOE)
def test_each_layout_converts_to_the_other_tensor_for_tensor(models, tmp_path, family):
    """HF -> HF keeps the source's layout by default; --hf-expert-layout chooses the other, whose bytes
    are what transformers' own save (per-expert) or the restacking (fused) holds."""
    per_expert, fused = models[family]
    for src, layout, same_as in ((fused, None, fused), (fused, "per-expert", per_expert), (per_expert, "fused", fused)):
        out = tmp_path / f"{src.name}-{layout}"
        commands.convert(src, out, OutputOptions(format="hf", hf=HFOptions(expert_layout=layout)), progress=False)
        a, b = safetensors_state(same_as), safetensors_state(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (src.name, layout)
    with torch.no_grad():
        assert close(logits(per_expert, TOKENS), logits(tmp_path / f"{per_expert.name}-fused", TOKENS))


def test_megatron_round_trip_keeps_the_fused_layout(models, tmp_path):
    per_expert, fused = models["mixtral"]
    commands.convert(fused, tmp_path / "meg", OutputOptions(layout=LayoutOptions(tp=2, pp=2, ep=2)), progress=False)
    commands.convert(tmp_path / "meg", tmp_path / "back", OutputOptions(format="hf"), progress=False)
    a, b = safetensors_state(fused), safetensors_state(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_chooses_the_layout_by_name(models, tmp_path, capsys):
    per_expert, _ = models["qwen3_moe"]
    out = tmp_path / "fused"
    assert cli.main(["convert", "--src", str(per_expert), "--dst", str(out), "--hf-expert-layout", "fused"]) == 0
    names = set(safetensors_state(out))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any(".experts.0." in n for n in names)
    assert cli.main(["convert", "--src", str(per_expert), "--dst", str(tmp_path / "x"), "--hf-expert-layout",
                     "stacked"]) == 2
    assert "invalid choice: 'stacked'" in capsys.readouterr().err
