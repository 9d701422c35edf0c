"""megatron-core 0.19's HybridModel checkpoints (torch_dist): a GPT model as `*-` layer pairs.
scalegrow's HybridModel layout against megatron-core's own `dist_checkpointing.save` of a HybridModel,
its saves read and grown into what HybridModel and GPTModel load (GPT output also through megatron-core's
GPT-to-Hybrid load path), and the patterns no GPT model computes refused by name."""
import argparse
import json
import re
import warnings

import pytest
import torch

from scalegrow.cli import main
from scalegrow.formats.base import MemoryReader
from scalegrow.formats.megatron_args import config_from_args, config_to_args
from scalegrow.formats.options import OutputOptions, TorchDistOptions
from scalegrow.formats.registry import open_checkpoint
from scalegrow.operators.identity import Identity
from scalegrow.write.session import write

from helpers import family_config, random_model, tokens, write_yaml
from test_torch_dist import chunks, common_state

CASES = {"llama": ("llama", {}), "gpt2": ("gpt2", {}),  # gpt2: LayerNorm biases, learned positions, tied
         "moe-qwen3": ("qwen3", dict(num_moe_experts=4, moe_router_topk=2))}


@pytest.fixture
def hybrid_mcore(mcore):
    if mcore.version() < (0, 19):
        pytest.skip("HybridModel and its GPT-checkpoint load path are megatron-core >= 0.19's")
    return mcore


def as_hybrid(gpt_state: dict) -> dict:
    """GPTModel's state dict as HybridModel's, by megatron-core's own rule: GPT layer i's norm and
    attention are hybrid layer 2i, the rest of it layer 2i+1; the final norm is `final_norm`."""
    out = {}
    for key, value in gpt_state.items():
        match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.*)", key)
        if match:
            i, name = int(match.group(1)), match.group(2)
            key = f"decoder.layers.{2 * i + (0 if name.startswith(('input_layernorm', 'self_attention')) else 1)}.{name}"
        out[key.replace("decoder.final_layernorm.", "decoder.final_norm.")] = value
    return out


def hybrid_model(mcore, cfg, gpt_state: dict):
    model = mcore.build_hybrid(cfg).eval()
    state = as_hybrid(gpt_state)
    state.update({k: None for k in model.state_dict() if k.endswith("_extra_state") and k not in state})
    mcore.load_strict(model, state)
    return model


def hybrid_save(mcore, cfg, gpt_state: dict, root, args: argparse.Namespace, iteration: int = 5):
    """megatron-core's own save of a HybridModel holding `gpt_state`, as Megatron-LM lays it out."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    model = hybrid_model(mcore, cfg, gpt_state)
    iter_dir = root / f"iter_{iteration:07d}"
    iter_dir.mkdir(parents=True)
    state = {"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0, "iteration": iteration}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_checkpointing.save(state, str(iter_dir),
                                sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return model


def hybrid_args(cfg, pattern=None) -> argparse.Namespace:
    """A HybridModel run's args: the pattern, and num_layers counting every hybrid layer."""
    args = config_to_args(cfg)
    args.hybrid_layer_pattern = pattern or ("*E" if cfg.moe else "*-") * cfg.num_layers
    args.num_layers = 2 * cfg.num_layers
    return args


@pytest.mark.parametrize("case", sorted(CASES))
def test_hybrid_layout_matches_megatron_core_hybrid_model_save(hybrid_mcore, tmp_path, case):
    family, extra = CASES[case]
    cfg = family_config(family, num_layers=2, **extra)
    sd = random_model(cfg, seed=4).state_dict()
    ours = tmp_path / "ours"
    write(MemoryReader.of(sd, cfg, iteration=5), Identity(cfg, cfg), ours,
          OutputOptions("torch_dist", torch_dist=TorchDistOptions("inline", "hybrid")), progress=False)
    args = common_state(ours / "iter_0000005")["args"]
    assert (args.hybrid_layer_pattern, args.num_layers) == (hybrid_args(cfg).hybrid_layer_pattern, 4)
    hybrid_save(hybrid_mcore, cfg, sd, tmp_path / "theirs", args)
    our_items, our_data = chunks(ours / "iter_0000005")
    their_items, their_data = chunks(tmp_path / "theirs/iter_0000005")
    assert our_items == their_items  # keys, kinds, global shapes, dtypes
    assert our_data.keys() == their_data.keys()
    for key, value in their_data.items():
        if torch.is_tensor(value):
            assert torch.equal(our_data[key], value), key
        elif key[0] != "common_state/shard_0_1":
            assert our_data[key] == value, key
    reader = open_checkpoint(tmp_path / "theirs")
    assert reader.config == cfg and reader.megatron_model == "hybrid"
    back = reader.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("out", ["hybrid", "gpt"])
def test_hybrid_model_save_grows_into_what_megatron_core_loads_with_the_source_logits(hybrid_mcore, tmp_path,
                                                                                      capsys, out):
    """megatron-core's save of a HybridModel, grown by LEMON (wider, 2 -> 3 GPT layers) into torch_dist:
    in HybridModel's layout it loads into a HybridModel of pattern `*-*-*-`; in GPTModel's into a
    GPTModel, and into that HybridModel through megatron-core's GPT-checkpoint retargeting. Each
    computes the source HybridModel's logits."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.gpt_checkpoint_interop import (
        gpt_compatible_layer_maps,
        retarget_sharded_state_dict_to_gpt_checkpoint,
    )

    mcore = hybrid_mcore
    cfg = family_config("llama", num_layers=2)
    source = hybrid_save(mcore, cfg, random_model(cfg, seed=7).state_dict(), tmp_path / "src", hybrid_args(cfg))
    assert main(["inspect", str(tmp_path / "src"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["megatron_model"], report["hybrid_layer_pattern"]) == ("hybrid", "*-*-")
    assert report["model"]["num_layers"] == 2
    target = write_yaml(tmp_path / "t.yaml", hidden_size=96, num_attention_heads=6, ffn_hidden_size=150,
                        num_layers=3)
    extra = [] if out == "hybrid" else ["--torch-dist-model", "gpt"]  # hybrid: the source's, by default
    assert main(["grow", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "big"), "--target", str(target),
                 "--format", "torch_dist", "--torch-dist-common", "inline", *extra, "--no-progress"]) == 0
    grown = open_checkpoint(tmp_path / "big").config
    x = tokens(cfg, seq=24)
    with torch.no_grad():
        want = mcore.forward(source, x)
    ckpt = str(tmp_path / "big/iter_0000005")
    loaded = []
    if out == "gpt":
        gpt = mcore.build_gpt(grown).eval()
        state = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, ckpt)
        assert getattr(state["args"], "hybrid_layer_pattern", None) is None and state["args"].num_layers == 3
        mcore.load_strict(gpt, state["model"])
        loaded.append(gpt)
    model = mcore.build_hybrid(grown).eval()
    request = {"model": model.sharded_state_dict()}
    if out == "gpt":  # what Megatron-LM does when a HybridModel run loads a GPT checkpoint
        maps = gpt_compatible_layer_maps("*-" * grown.num_layers)
        retarget_sharded_state_dict_to_gpt_checkpoint(request["model"], maps)  # in place
    state = dist_checkpointing.load(request, ckpt)
    if out == "hybrid":
        assert (state["args"].hybrid_layer_pattern, state["args"].num_layers) == ("*-*-*-", 6)
        assert config_from_args(state["args"]) == grown
    model.load_state_dict(state["model"], strict=True)
    loaded.append(model)
    for m in loaded:
        assert (mcore.forward(m, x) - want).abs().max().item() <= 1e-4, type(m).__name__


def test_hybrid_layout_at_two_pipeline_stages_names_them_in_the_pattern(tmp_path):
    """HybridModel's args at PP 2 split the pattern with '|' (Megatron-LM's stage boundaries); the
    reader takes the stages from them, and a boundary inside a GPT layer is refused by name."""
    cfg = family_config("llama", num_layers=3)
    write(MemoryReader.of(random_model(cfg).state_dict(), cfg, iteration=5), Identity(cfg, cfg), tmp_path / "d",
          OutputOptions("torch_dist", torch_dist=TorchDistOptions(model="hybrid")), progress=False)
    assert main(["convert", "--src", str(tmp_path / "d"), "--dst", str(tmp_path / "pp2"), "--format", "torch_dist",
                 "--pp", "2", "--decoder-first-pipeline-num-layers", "1", "--no-progress"]) == 0
    reader = open_checkpoint(tmp_path / "pp2")
    assert reader.args.hybrid_layer_pattern == "*-|*-*-" and reader.args.num_layers == 6
    assert reader.layout.stages.layers_per_stage == (1, 2) and reader.config == cfg


@pytest.mark.parametrize("pattern, message", [
    ("M*-M*-", "Mamba layers ('M') are not supported"),
    ("*-*-/*-", "multi-token-prediction layers ('/') are not supported"),
    ("**--", "not alternating attention and MLP layers"),
    ("*-+-", "multi-latent attention layers ('+') are not supported"),
    ("*|-*-", "a pipeline stage ('|') splits a GPT layer's attention from its MLP"),
])
def test_hybrid_patterns_no_gpt_model_computes_are_refused_by_name(tmp_path, capsys, pattern, message):
    cfg = family_config("llama", num_layers=2)
    write(MemoryReader.of(random_model(cfg).state_dict(), cfg, iteration=5), Identity(cfg, cfg), tmp_path / "d",
          OutputOptions("torch_dist", torch_dist=TorchDistOptions(model="hybrid")), progress=False)
    common = tmp_path / "d/iter_0000005/common.pt"
    state = torch.load(common, weights_only=False)
    state["args"].hybrid_layer_pattern = pattern
    state["args"].pipeline_model_parallel_size = 2 if "|" in pattern else 1
    torch.save(state, common)
    assert main(["inspect", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert f"{common}: args: hybrid_layer_pattern {pattern!r}" in err and message in err


def test_legacy_checkpoint_of_a_hybrid_run_is_refused_by_name(tmp_path, capsys):
    cfg = family_config("llama", num_layers=2)
    write(MemoryReader.of(random_model(cfg).state_dict(), cfg, iteration=5), Identity(cfg, cfg), tmp_path / "d",
          OutputOptions("torch"), progress=False)
    rank = tmp_path / "d/iter_0000005/mp_rank_00/model_optim_rng.pt"
    state = torch.load(rank, weights_only=False)
    state["args"].hybrid_layer_pattern = "*-*-"
    torch.save(state, rank)
    assert main(["inspect", str(tmp_path / "d")]) == 2
    assert "a legacy checkpoint of a HybridModel run is not supported (save it as torch_dist)" in capsys.readouterr().err


def test_hybrid_layout_refuses_mixed_dense_and_moe_layers_by_name(tmp_path, capsys):
    cfg = family_config("llama", num_layers=2, num_moe_experts=4, moe_router_topk=2, moe_layer_freq=2)
    write(MemoryReader.of(random_model(cfg).state_dict(), cfg, iteration=5), Identity(cfg, cfg), tmp_path / "d",
          OutputOptions("torch_dist"), progress=False)
    assert main(["convert", "--src", str(tmp_path / "d"), "--dst", str(tmp_path / "h"), "--format", "torch_dist",
                 "--torch-dist-model", "hybrid", "--no-progress"]) == 2
    assert "--torch-dist-model hybrid: dense and MoE layers mixed (moe_layer_freq 2)" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
