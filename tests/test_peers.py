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
