"""Scaled rope (Llama 3.x's `llama3`, linear interpolation, YaRN) with transformers and megatron-core as
the oracles: each variant a tiny random llama saved by transformers (tests/hf_models.py)."""
from __future__ import annotations

import json

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT
from scalegrow.formats.megatron_args import config_from_args, config_to_args
from scalegrow.formats.options import HFOptions, LayoutOptions, OutputOptions
from scalegrow.formats.registry import open_checkpoint

from helpers import tree_sha256, write_yaml
from hf_models import COMMON, VOCAB, build, logits

HF = OutputOptions(format="hf", hf=HFOptions(max_shard_size=200_000))
# long enough for the low frequencies to turn (the scaling changes the logits by 6e-3 of their scale)
TOKENS = torch.randint(0, VOCAB, (2, 512), generator=torch.Generator().manual_seed(0))
LLAMA3 = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
ROPES = {  # Llama 3.1 and 3.2's own settings (base 500000, factor 8 and 32), one of other constants, linear
    "llama3.1": {**LLAMA3, "rope_theta": 500000.0, "factor": 8.0},
    "llama3.2": {**LLAMA3, "rope_theta": 500000.0, "factor": 32.0},
    "llama3-other": {**LLAMA3, "rope_theta": 10000.0, "factor": 16.0, "low_freq_factor": 2.0,
                     "high_freq_factor": 8.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # Qwen's long-context YaRN (its original context shrunk to 64 so 512 tokens reach past it), and
    # DeepSeek's spelling with the mscale terms, a narrower ramp and no rounding of its ends
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16.0, "truncate": False},
    "plain": {"rope_type": "default", "rope_theta": 10000.0},
}
YARN = ("yarn", "yarn-mscale")  # HF -> HF only: megatron-core's GPTModel has no YaRN settings of its own
MEGATRON = ("llama3.1", "llama3.2", "linear")  # what megatron-core reproduces


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """variant -> a saved llama (the same weights for every variant: only the rope differs)."""
    import transformers

    root = tmp_path_factory.mktemp("rope")
    return {name: build("llama", root / name, config=transformers.LlamaConfig(
        **{**COMMON, "max_position_embeddings": 131072}, rope_parameters=rope, tie_word_embeddings=False))
        for name, rope in ROPES.items()}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * a.abs().max().item()


@pytest.mark.parametrize("variant", [v for v in ROPES if v != "plain"])
def test_reader_computes_what_transformers_computes_and_the_scaling_matters(hf, variant):
    model = commands.load_model(hf[variant])
    unscaled = GPT(model.cfg.replace(use_rope_scaling=False, rotary_seq_len_interpolation_factor=None,
                                     use_yarn=False)).eval()
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours, plain = model(TOKENS), unscaled(TOKENS)
    assert close(logits(hf[variant], TOKENS), ours)
    assert not close(plain, ours, rel=1e-3)  # the same weights with the rope unscaled compute something else


def test_read_config_names_the_scaling(hf):
    rope = open_checkpoint(hf["llama3.2"]).config.rope
    assert (rope.base, rope.scaling.factor, rope.scaling.original_max_position) == (500000, 32.0, 8192)
    assert rope.scaling.megatron_core_constants and rope.interpolation is None
    assert open_checkpoint(hf["linear"]).config.rope.interpolation == 4.0
    assert not open_checkpoint(hf["llama3-other"]).config.rope.scaling.megatron_core_constants


@pytest.mark.parametrize("variant", ROPES)
def test_megatron_args_and_flat_dict_round_trip(hf, variant):
    cfg = open_checkpoint(hf[variant]).config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    if variant not in YARN:
        assert config_from_args(config_to_args(cfg, None, tp=1, pp=1)) == cfg


@pytest.mark.slow
def test_megatron_core_at_tp2_pp2_equals_transformers(hf, tmp_path):
    """HF -> Megatron TP2/PP2 -> megatron-core's GPTModel built as Megatron-LM builds it from these
    args (--use-rope-scaling --rope-scaling-factor, --rotary-seq-len-interpolation-factor)."""
    import mcore

    got = mcore.hf_logits_at_tp2_pp2({variant: hf[variant] for variant in MEGATRON}, TOKENS, tmp_path)
    for variant in MEGATRON:
        assert close(logits(hf[variant], TOKENS), got[variant][..., :VOCAB], rel=1e-4), variant


@pytest.mark.parametrize("variant", ["llama3.2", "llama3-other", "linear", "yarn", "yarn-mscale"])
def test_lemon_growth_hf_to_hf_keeps_the_scaled_rope_and_the_function(hf, tmp_path, variant):
    target = write_yaml(tmp_path / "t.yaml", num_layers=6, hidden_size=128, ffn_hidden_size=192,
                        num_attention_heads=8, num_query_groups=4, kv_channels=16)
    commands.grow(hf[variant], tmp_path / "big", "lemon", target, HF, progress=False)
    config = json.loads((tmp_path / "big" / "config.json").read_text())
    assert config["rope_parameters"] == ROPES[variant] and config["head_dim"] == 16
    assert close(logits(hf[variant], TOKENS), logits(tmp_path / "big", TOKENS), rel=1e-4)


@pytest.mark.parametrize("variant", MEGATRON)
def test_hf_to_megatron_to_hf_is_identical(hf, tmp_path, variant):
    commands.convert(hf[variant], tmp_path / "meg", OutputOptions(layout=LayoutOptions(tp=2, pp=2)), progress=False)
    args = torch.load(next((tmp_path / "meg").rglob("model_optim_rng.pt")), weights_only=False)["args"]
    if variant != "linear":
        assert args.use_rope_scaling and args.rope_scaling_factor == ROPES[variant]["factor"]
    else:
        assert not args.use_rope_scaling and args.rotary_seq_len_interpolation_factor == 4.0
    commands.convert(tmp_path / "meg", tmp_path / "back", HF, progress=False)
    src, out = (json.loads((p / "config.json").read_text()) for p in (hf[variant], tmp_path / "back"))
    assert out["rope_parameters"] == src["rope_parameters"] == ROPES[variant]
    assert close(logits(hf[variant], TOKENS), logits(tmp_path / "back", TOKENS), rel=0)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("variant, words", [("llama3-other", "rope_scaling: megatron-core's llama3 rope scaling fixes"),
                                            ("yarn", "use_yarn: megatron-core's GPTModel takes YaRN's settings only")])
def test_megatron_output_refuses_what_megatron_core_does_not_reproduce(hf, tmp_path, capsys, fmt, variant, words):
    src = hf[variant]
    before = tree_sha256(src)
    assert cli.main(["convert", "--src", str(src), "--dst", str(tmp_path / "out"), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert words in err and (variant != "llama3-other" or "2, 8 and 64" in err)
    assert len(err.strip().splitlines()) == 1
    assert tree_sha256(src) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rope, words", [
    ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "rope_type: 'dynamic' is not supported"),
    ({"rope_type": "longrope", "rope_theta": 1e4}, "rope_type: 'longrope' is not supported"),
])
def test_other_rope_types_are_refused_by_name(hf, tmp_path, capsys, rope, words):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf["plain"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    assert cli.main(["convert", "--src", str(src), "--dst", str(tmp_path / "out"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_older_rope_scaling_spelling_is_read(hf, tmp_path):
    """transformers 4's `rope_scaling` (with `type`) and a top-level `rope_theta`."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf["linear"], src)
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters")
    (src / "config.json").write_text(json.dumps({**config, "rope_theta": 10000.0,
                                                 "rope_scaling": {"type": "linear", "factor": 4.0}}))
    assert open_checkpoint(src).config.rope == open_checkpoint(hf["linear"]).config.rope
