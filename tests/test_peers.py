"""The peer growth methods, each tested for the property its paper claims."""
import pytest
import torch

from scalegrow.cli import main as cli
from scalegrow.commands import load_model, save_model
from scalegrow.core import arch
from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT
from scalegrow.errors import InputError
from scalegrow.methods import registry as methods
from scalegrow.write.executor import apply

from helpers import family_config, random_model, tokens, write_yaml


def grow(method, src_cfg, target, seed=0):
    small = random_model(src_cfg)
    op, _ = methods.build_operator(method, methods.GROW, src_cfg, ModelConfig.from_dict(target, base=src_cfg),
                                   seed=seed)
    big = GPT(op.dst).eval()
    big.load_state_dict(apply(op, small.state_dict()), strict=True)
    return small, big, op


def logits_diff(small, big, cfg):
    x = tokens(cfg)
    with torch.no_grad():
        return (big(x) - small(x)).abs().max().item()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stack_copies_layers_in_order(family):
    cfg = family_config(family)  # 3 layers
    small, big, _ = grow("stack", cfg, dict(num_layers=7))
    for j in range(7):
        for name, value in small.decoder.layers[j % 3].state_dict().items():
            assert torch.equal(big.decoder.layers[j].state_dict()[name], value)
    assert logits_diff(small, big, cfg) > 1e-2  # not lossless


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("layers", [4, 6, 8])
def test_llama_pro_block_expansion_is_exact(family, layers):
    cfg = family_config(family)
    small, big, op = grow("llama-pro", cfg, dict(num_layers=layers))
    assert logits_diff(small, big, cfg) == 0.0  # identity blocks add exact zeros
    new = [j for j, (_, is_new) in enumerate(op.depth_map) if is_new]
    assert len(new) == layers - 3
    for j in new:
        assert big.decoder.layers[j].mlp.linear_fc2.weight.abs().max() == 0
        assert big.decoder.layers[j].self_attention.linear_proj.weight.abs().max() == 0
    assert op.depth_map[-1] == (2, True)  # the last group ends with a new block


@pytest.mark.parametrize("family", ["gpt2", "llama", "ln-swiglu-gqa-rope-tied-qkvbias",
                                    "rms-gelu-mha-learned-untied-bias"])
def test_hypercloning_is_lossless_and_unties(family):
    cfg = family_config(family)
    groups = {"num_query_groups": 2 * cfg.attention.groups}
    small, big, op = grow("hypercloning", cfg, dict(hidden_size=128, num_attention_heads=8, ffn_hidden_size=192,
                                                    **groups))
    assert logits_diff(small, big, cfg) <= 1e-4
    assert not op.dst.embedding.tied and op.dst.norm.eps == cfg.norm.eps
    w = big.decoder.layers[0].mlp.linear_fc2.weight  # W.repeat(2, 2) / 2: the clones are identical
    assert torch.equal(w[:64, :96], w[64:, 96:]) and torch.equal(w[:64, :96], w[:64, 96:])


def test_hypercloning_needs_integer_multiples():
    cfg = family_config("llama")
    target = ModelConfig.from_dict(dict(hidden_size=96, num_attention_heads=6, num_query_groups=3,
                                        ffn_hidden_size=192), base=cfg)
    with pytest.raises(InputError, match="--target: hidden_size: target 96 is not an integer multiple of source 64"):
        methods.build_operator("hypercloning", methods.GROW, cfg, target)


def test_bert2bert_aki_takes_new_units_from_the_next_layer():
    cfg = family_config("gpt2")  # hidden 64, 4 heads, FFN 96, 3 layers
    small, big, _ = grow("bert2bert-aki", cfg, dict(ffn_hidden_size=160, num_attention_heads=8, kv_channels=16,
                                                    num_layers=6))
    for j in range(6):
        here, nxt = small.decoder.layers[j % 3], small.decoder.layers[min(j % 3 + 1, 2)]
        fc1 = big.decoder.layers[j].mlp.linear_fc1.weight  # hidden unchanged: rows are copied as they are
        assert torch.equal(fc1[:96], here.mlp.linear_fc1.weight)
        assert torch.equal(fc1[96:], nxt.mlp.linear_fc1.weight[:64])  # new neurons: the next layer's
        fc2 = big.decoder.layers[j].mlp.linear_fc2.weight  # fan-out divided equally among the copies
        assert torch.allclose(fc2[:, :64] + fc2[:, 96:], here.mlp.linear_fc2.weight[:, :64])
        assert torch.equal(fc2[:, 64:96], here.mlp.linear_fc2.weight[:, 64:])
    assert logits_diff(small, big, cfg) > 1e-3  # AKI breaks function preservation, by design


def test_peers_run_through_the_cli(tmp_path):
    cfg = family_config("llama")
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "small")
    target = write_yaml(tmp_path / "t.yaml", num_layers=6)
    for method in ("stack", "llama-pro", "bert2bert-aki"):
        assert cli(["grow", "--method", method, "--src", str(tmp_path / "small"), "--dst", str(tmp_path / method),
                    "--target", str(target), "--no-progress"]) == 0
        assert load_model(tmp_path / method).cfg.num_layers == 6
    wide = write_yaml(tmp_path / "w.yaml", hidden_size=128, num_attention_heads=8, num_query_groups=4,
                      ffn_hidden_size=192)
    assert cli(["grow", "--method", "hypercloning", "--src", str(tmp_path / "small"), "--dst", str(tmp_path / "hc"),
                "--target", str(wide), "--tp", "2", "--no-progress"]) == 0
    assert load_model(tmp_path / "hc").cfg.hidden_size == 128
    assert arch.OUTPUT_LAYER in load_model(tmp_path / "hc").state_dict()


def grow_with(options, src_cfg, target=None):
    small = random_model(src_cfg)
    dst = ModelConfig.from_dict(target or {}, base=src_cfg)
    op, details = methods.build_operator("stack", methods.GROW, src_cfg, dst, options=options)
    big = GPT(op.dst).eval()
    big.load_state_dict(apply(op, small.state_dict()), strict=True)
    return small, big, op


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stack_with_a_layer_map_copies_solar_style(family):
    """SOLAR's depth up-scaling on 3 layers: [0, 2) then [1, 3) -> 0, 1, 1, 2; the map sets the depth."""
    cfg = family_config(family)
    small, big, op = grow_with(methods.options_with("stack", methods.GROW, layers="0-1,1-2"), cfg)
    assert op.dst.num_layers == 4 and op.details() == {"layers": [0, 1, 1, 2], "identity_layers": []}
    for j, i in enumerate([0, 1, 1, 2]):
        for name, value in small.decoder.layers[i].state_dict().items():
            assert torch.equal(big.decoder.layers[j].state_dict()[name], value)
    assert logits_diff(small, big, cfg) > 1e-2  # a repeated block is applied twice: not lossless


@pytest.mark.parametrize("family", ["gpt2", "llama", "ln-swiglu-gqa-rope-tied-qkvbias"])
def test_stack_with_zero_copies_is_exact(family):
    cfg = family_config(family)
    options = methods.options_with("stack", methods.GROW, layers=["0-2", "1-2"], zero_copies=True)
    small, big, op = grow_with(options, cfg, dict(num_layers=5))
    assert op.details() == {"layers": [0, 1, 2, 1, 2], "identity_layers": [3, 4]}
    assert logits_diff(small, big, cfg) == 0.0
    for j in (3, 4):
        layer = big.decoder.layers[j]
        assert layer.mlp.linear_fc2.weight.abs().max() == 0 and layer.self_attention.linear_proj.weight.abs().max() == 0
        assert torch.equal(layer.mlp.linear_fc1.weight, small.decoder.layers[j - 2].mlp.linear_fc1.weight)


@pytest.mark.parametrize("layers, zero, target, words", [
    ("0-1,1-3", False, None, "--target: layers: 3 is not a layer of the source (0-2)"),
    ("0-2,1", True, dict(num_layers=6), "--target: num_layers: target 6, but the layer map lists 4 layers"),
    ("1-2,0-2", True, None, "first met in order 0-2 (first met here: 1-2,0)"),
    ("0,2,1,2", True, None, "first met here: 0,2,1"),
    ("0,2", False, None, "num_layers: target 2 is smaller than source 3"),
    ("2-0", False, None, "--layers: '2-0' runs backwards"),
    ("0-x", False, None, "--layers: '0-x' is not a layer or an inclusive range"),
    (None, True, dict(num_layers=6), "zero_copies: needs a layer map"),
])
def test_stack_layer_map_refusals_name_the_problem(layers, zero, target, words):
    cfg = family_config("llama")
    options = methods.options_with("stack", methods.GROW, layers=layers, zero_copies=zero)
    with pytest.raises(InputError) as err:
        methods.build_operator("stack", methods.GROW, cfg, ModelConfig.from_dict(target or {}, base=cfg),
                               options=options)
    assert words in str(err.value)


def test_stack_layer_map_through_the_cli_and_a_run_config(tmp_path):
    import json

    from scalegrow.commands import verify
    from scalegrow.train.config import load_run_config

    cfg = family_config("llama")
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "small")
    assert cli(["grow", "--method", "stack", "--layers", "0-2,1-2", "--zero-copies", "--src", str(tmp_path / "small"),
                "--dst", str(tmp_path / "up"), "--no-progress"]) == 0  # no --target: the map sets the depth
    record = json.loads((tmp_path / "up" / "scalegrow.json").read_text())
    assert record["model"]["num_layers"] == 5 and record["details"]["identity_layers"] == [3, 4]
    assert verify(tmp_path / "small", tmp_path / "up")["max_abs_diff"] == 0.0
    run = load_run_config(None, ["growth.method=stack", "growth.stack.layers=[0-2, 1-2]",
                                 "growth.stack.zero_copies=true"])
    assert run.growth.stack.layers == ["0-2", "1-2"] and run.growth.stack.zero_copies
