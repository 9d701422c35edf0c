"""Sliding-window attention as a per-layer pattern (Mistral's window everywhere, Qwen's from
max_window_layers on or by layer_types), with transformers and megatron-core as the oracles: each
variant a tiny random model saved by transformers (tests/hf_models.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT
from scalegrow.formats.megatron_args import config_from_args, config_to_args
from scalegrow.formats.options import HFOptions, LayoutOptions, OutputOptions
from scalegrow.formats.registry import open_checkpoint
from scalegrow.methods import registry as methods

from helpers import write_yaml
from hf_models import COMMON, VOCAB, build, logits, train_tokenizer

HF = OutputOptions(format="hf", hf=HFOptions(max_shard_size=200_000))
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))  # 3x the window
ROPE = {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
TYPES = {"s": "sliding_attention", "f": "full_attention"}


def configs():
    import transformers

    return {  # variant -> (transformers config, the window megatron-core sees, its window layers)
        "mistral": (transformers.MistralConfig(**COMMON, **ROPE, sliding_window=8), (7, 0), [1, 1, 1, 1]),
        "qwen2": (transformers.Qwen2Config(**COMMON, **ROPE, use_sliding_window=True, sliding_window=8,
                                           max_window_layers=2), (7, 0), [0, 0, 1, 1]),
        "qwen3": (transformers.Qwen3Config(**COMMON, **ROPE, head_dim=24, use_sliding_window=True, sliding_window=6,
                                           layer_types=[TYPES[t] for t in "sfsf"]), (5, 0), [1, 0, 1, 0]),
    }


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("sliding")
    tokenizer = train_tokenizer(root / "tokenizer")  # subclone and LiGO read text through it
    return {name: build("llama", root / name, tokenizer, config=config) for name, (config, _, _) in configs().items()}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * a.abs().max().item()


def types_of(path) -> list[str] | None:
    return json.loads((path / "config.json").read_text()).get("layer_types")


@pytest.mark.parametrize("variant", ["mistral", "qwen2", "qwen3"])
def test_reader_computes_what_transformers_computes_and_the_window_matters(hf, variant):
    _, window, pattern = configs()[variant]
    model = commands.load_model(hf[variant])
    assert model.cfg.attention.window == window and model.cfg.window_pattern() == [bool(w) for w in pattern]
    full = GPT(model.cfg.replace(window_size=None, window_attn_skip_freq=None)).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours, unwindowed = model(TOKENS), full(TOKENS)
    assert close(logits(hf[variant], TOKENS), ours)
    assert not close(unwindowed, ours, rel=1e-3)  # beyond the window the same weights compute otherwise


def test_qwen25s_window_key_without_the_flag_is_full_attention(tmp_path):
    """Qwen2.5's configs say sliding_window 131072 with use_sliding_window false: the flag decides."""
    import transformers

    src = build("qwen2", tmp_path / "q", config=transformers.Qwen2Config(
        **COMMON, **ROPE, use_sliding_window=False, max_window_layers=2))
    config = json.loads((src / "config.json").read_text())  # as Qwen2.5's own config.json has it
    (src / "config.json").write_text(json.dumps({**config, "sliding_window": 131072}))
    assert open_checkpoint(src).config.attention.window is None
    commands.convert(src, tmp_path / "out", HF, progress=False)
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["use_sliding_window"] is False and config["sliding_window"] == 131072
    assert close(logits(src, TOKENS), logits(tmp_path / "out", TOKENS), rel=0)


@pytest.mark.parametrize("variant", ["mistral", "qwen2", "qwen3"])
def test_megatron_args_and_flat_dict_round_trip(hf, variant):
    cfg = open_checkpoint(hf[variant]).config
    args = config_to_args(cfg, None, tp=1, pp=1)
    assert args.window_size == configs()[variant][1] and isinstance(args.window_size, tuple)
    assert config_from_args(args) == cfg and ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.slow
def test_megatron_core_at_tp2_pp2_equals_transformers(hf, tmp_path):
    """HF -> Megatron TP2/PP2 -> megatron-core's GPTModel with window_size and window_attn_skip_freq."""
    import mcore

    got = mcore.hf_logits_at_tp2_pp2(hf, TOKENS, tmp_path)
    for variant in hf:
        assert close(logits(hf[variant], TOKENS), got[variant][..., :VOCAB], rel=1e-4), variant


@pytest.mark.parametrize("variant", ["mistral", "qwen2", "qwen3"])
def test_hf_to_megatron_to_hf_is_identical(hf, tmp_path, variant):
    commands.convert(hf[variant], tmp_path / "meg", OutputOptions(layout=LayoutOptions(tp=2, pp=2)), progress=False)
    commands.convert(tmp_path / "meg", tmp_path / "back", HF, progress=False)
    src, out = (json.loads((p / "config.json").read_text()) for p in (hf[variant], tmp_path / "back"))
    for key in ("sliding_window", "use_sliding_window", "layer_types"):
        assert out.get(key) == src.get(key), key
    assert close(logits(hf[variant], TOKENS), logits(tmp_path / "back", TOKENS), rel=0)


@pytest.mark.parametrize("variant, types", [("mistral", None), ("qwen2", "ffssss"), ("qwen3", "sfssff")])
def test_lemon_depth_growth_keeps_every_source_layers_type(hf, tmp_path, variant, types):
    """4 -> 6 layers: LEMON's new blocks follow layers 2 and 3 and copy them, types included
    (qwen2's f f s s becomes f f s s s s, qwen3's s f s f becomes s f s s f f), and layer_types is
    written to match; lossless."""
    target = write_yaml(tmp_path / "t.yaml", num_layers=6, hidden_size=128, ffn_hidden_size=192,
                        num_attention_heads=8, num_query_groups=4, kv_channels=16 if variant != "qwen3" else 24)
    commands.grow(hf[variant], tmp_path / "big", "lemon", target, HF, progress=False)
    assert types_of(tmp_path / "big") == (None if types is None else [TYPES[t] for t in types])
    if variant == "mistral":
        assert json.loads((tmp_path / "big/config.json").read_text())["sliding_window"] == 8
    assert close(logits(hf[variant], TOKENS), logits(tmp_path / "big", TOKENS), rel=1e-4)


def test_stack_by_a_layer_map_and_drop_layers_keep_the_types(hf, tmp_path):
    src = hf["qwen3"]  # s f s f
    options = methods.options_with("stack", methods.GROW, layers="0-3,2-3", zero_copies=True)
    commands.grow(src, tmp_path / "up", "stack", None, HF, options=options, progress=False)
    assert types_of(tmp_path / "up") == [TYPES[t] for t in "sfsfsf"]
    assert close(logits(src, TOKENS), logits(tmp_path / "up", TOKENS), rel=1e-5)
    target = write_yaml(tmp_path / "t.yaml", num_layers=2)
    commands.shrink(src, tmp_path / "down", "drop-layers", target, HF, progress=False)
    assert types_of(tmp_path / "down") == [TYPES[t] for t in "ss"]  # drop-layers keeps layers 0 and 2
    assert logits(tmp_path / "down", TOKENS).isfinite().all()


def test_subclone_and_ligo_outputs_load_and_evaluate(hf, tmp_path):
    """subclone keeps the types of the layers it keeps (recorded); LiGO grows a window-everywhere model
    deeper and a mixed one wider, and refuses to mix layers of both kinds by name."""
    target = write_yaml(tmp_path / "small.yaml", num_layers=3, hidden_size=48, ffn_hidden_size=64)
    commands.shrink(hf["qwen2"], tmp_path / "sub", "subclone", target, HF, progress=False)
    kept = json.loads((tmp_path / "sub/scalegrow.json").read_text())["details"]["kept_layers"]
    assert types_of(tmp_path / "sub") == [TYPES["s" if i >= 2 else "f"] for i in kept]
    deeper = write_yaml(tmp_path / "deep.yaml", num_layers=6)
    wider = write_yaml(tmp_path / "wide.yaml", hidden_size=96, ffn_hidden_size=128)
    ligo = methods.options_with("ligo", methods.GROW, steps=2)
    commands.grow(hf["mistral"], tmp_path / "ligo_deep", "ligo", deeper, HF, options=ligo, progress=False)
    commands.grow(hf["qwen2"], tmp_path / "ligo_wide", "ligo", wider, HF, options=ligo, progress=False)
    assert types_of(tmp_path / "ligo_wide") == types_of(hf["qwen2"])
    for out in ("sub", "ligo_deep", "ligo_wide"):
        assert 0 < commands.evaluate(tmp_path / out, tokens=2048)["loss"] < 20
        assert logits(tmp_path / out, TOKENS).isfinite().all()
    with pytest.raises(Exception, match="window_attn_skip_freq: LiGO mixes every source layer"):
        commands.grow(hf["qwen2"], tmp_path / "x", "ligo", deeper, HF, options=ligo, progress=False)


def test_a_mixed_pattern_cannot_be_written_as_mistral(hf, tmp_path, capsys):
    src = hf["qwen3"]
    assert cli.main(["convert", "--src", str(src), "--dst", str(tmp_path / "m"), "--hf-model-type", "mistral"]) == 2
    err = capsys.readouterr().err
    assert "cannot be written as mistral" in err and "window_attn_skip_freq=2" in err
    assert not (tmp_path / "m").exists()


def test_other_layer_types_are_refused_by_name(hf, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf["qwen3"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "layer_types": ["chunked_attention"] * 4}))
    assert cli.main(["convert", "--src", str(src), "--dst", str(tmp_path / "out")]) == 2
    assert "layer_types: ['chunked_attention'] is not supported" in capsys.readouterr().err


def test_hybrid_layout_refuses_a_window_on_some_layers_only(hf, tmp_path, capsys):
    args = ["convert", "--src", str(hf["qwen2"]), "--format", "torch_dist", "--torch-dist-model"]
    assert cli.main([*args, "hybrid", "--dst", str(tmp_path / "h")]) == 2
    assert "window_attn_skip_freq: a sliding window on some layers only" in capsys.readouterr().err
    assert cli.main([*args, "gpt", "--dst", str(tmp_path / "g")]) == 0
    assert open_checkpoint(tmp_path / "g").config == open_checkpoint(hf["qwen2"]).config.replace(
        padded_vocab_size=open_checkpoint(tmp_path / "g").config.padded_vocab_size)
