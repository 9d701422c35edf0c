"""LEMON is lossless (max |Δlogits| <= 1e-4 in fp32) and still breaks symmetry."""

import pytest
import torch
from test_parity import PRODUCT, tiny_config

from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT
from scalegrow.errors import InputError
from scalegrow.methods import registry as methods
from scalegrow.operators.lemon import LemonGrowth, depth_map
from scalegrow.write.executor import apply

from helpers import FAMILIES, family_config, random_model, tokens

ATOL = 1e-4

TARGETS = {  # source: 3 layers, hidden 64, 4 heads (MHA, or GQA in 2 groups), ffn 96
    "width-2x": dict(hidden_size=128, num_attention_heads=8, ffn_hidden_size=192),
    "width-1.5x": dict(hidden_size=96, num_attention_heads=6, ffn_hidden_size=150),
    "width-1.25x-heads-kept": dict(hidden_size=80, ffn_hidden_size=100),
    "depth-5": dict(num_layers=5),
    "depth-6": dict(num_layers=6),
    "depth-7": dict(num_layers=7),  # > 2x: LEMON's 2x step applied twice
    "both-1.5x": dict(hidden_size=96, num_attention_heads=6, ffn_hidden_size=144, num_layers=5),
    "both-2x": dict(hidden_size=128, num_attention_heads=8, ffn_hidden_size=200, num_layers=6),
    "ffn-and-heads-only": dict(num_attention_heads=8, ffn_hidden_size=130, kv_channels=16),
}


def _groups(src, target):
    """Keep GQA sources GQA: scale groups with heads (2 heads per group)."""
    if src.attention.groups == src.attention.heads:
        return {}
    heads = target.get("num_attention_heads", src.attention.heads)
    return {"num_query_groups": heads // 2}


def grown_diff(src_cfg, target, seed=0):
    dst_cfg = ModelConfig.from_dict({**_groups(src_cfg, target), **target}, base=src_cfg)
    small = random_model(src_cfg, seed)
    op = LemonGrowth(src_cfg, dst_cfg, seed=seed)
    big = GPT(op.dst).eval()
    big.load_state_dict(apply(op, small.state_dict()), strict=True)
    x = tokens(src_cfg)
    with torch.no_grad():
        return (big(x) - small(x)).abs().max().item(), small, big, op


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_lossless_families(family, target):
    diff, *_ = grown_diff(family_config(family), TARGETS[target])
    assert diff <= ATOL


@pytest.mark.parametrize("combo", PRODUCT, ids=["-".join(map(str, p)) for p in PRODUCT])
def test_lossless_whole_product(combo):
    """Every config combination, with a non-integer width ratio and non-2x depth at once."""
    src = tiny_config(*combo)
    diff, *_ = grown_diff(src.replace(num_layers=3), TARGETS["both-1.5x"])
    assert diff <= ATOL


def test_more_query_heads_per_group():
    src = family_config("llama")  # 4 heads in 2 groups
    diff, _, _, op = grown_diff(src, dict(num_attention_heads=8, num_query_groups=2, hidden_size=128))
    assert op.dst.attention.per_group == 4 and diff <= ATOL


def test_depth_map():
    assert depth_map(4, 4) == [(i, False) for i in range(4)]
    # 4 -> 6: the first 2 map 1:1, then each of the upper two is followed by a new block
    assert depth_map(4, 6) == [(0, False), (1, False), (2, False), (2, True), (3, False), (3, True)]
    assert [n for _, n in depth_map(4, 8)] == [False, True] * 4
    plan = depth_map(3, 10)  # 3 -> 6 -> 10
    assert len(plan) == 10 and sum(not n for _, n in plan) == 3
    assert [s for s, n in plan if not n] == [0, 1, 2]


def test_new_blocks_are_identities():
    cfg = family_config("llama")
    _, small, big, op = grown_diff(cfg, dict(num_layers=6))
    for j, (src, new) in enumerate(op.depth_map):
        layer = big.decoder.layers[j]
        if new:
            assert layer.self_attention.linear_proj.weight.abs().max() == 0
            assert layer.mlp.linear_fc2.weight.abs().max() == 0
        else:
            assert torch.equal(layer.mlp.linear_fc1.weight, small.decoder.layers[src].mlp.linear_fc1.weight)


def test_width_noise_cancels_but_is_not_zero():
    """New blocks of a wider model get non-zero, zero-sum ("cancelling") output projections."""
    _, _, big, op = grown_diff(family_config("gpt2"), TARGETS["both-2x"])
    new = [j for j, (_, n) in enumerate(op.depth_map) if n]
    fc2 = big.decoder.layers[new[0]].mlp.linear_fc2.weight  # [128, 200], neurons copy j mod 96
    assert fc2.abs().max() > 1e-3
    pair_sum = fc2[:, :96] + fc2[:, 96:192]  # neurons 0..7 have a third copy at 192..199
    pair_sum[:, :8] += fc2[:, 192:]
    assert pair_sum.abs().max() < 1e-6


def test_symmetry_broken_after_one_step():
    """Replicated FFN neurons and heads start equal and move apart after one optimizer step."""
    cfg = family_config("gpt2", num_layers=2)
    _, _, big, _ = grown_diff(cfg, dict(num_attention_heads=8, kv_channels=16, ffn_hidden_size=192))
    fc1 = lambda: big.decoder.layers[0].mlp.linear_fc1.weight.detach().clone()
    qkv = lambda: big.decoder.layers[0].self_attention.linear_qkv.weight.detach().clone().view(8, 3, 16, 64)
    # MHA rows are [np, 3, hn]... per group of one head: group g copies g mod 4
    w1, q1 = fc1(), qkv()
    assert torch.equal(w1[:96], w1[96:]) and torch.equal(q1[:4], q1[4:])
    big.train()
    opt = torch.optim.AdamW(big.parameters(), lr=1e-3)
    big.loss(tokens(cfg, batch=4, seq=33, seed=3)).backward()
    opt.step()
    w2, q2 = fc1(), qkv()
    assert (w2[:96] - w2[96:]).abs().max() > 1e-4
    assert (q2[:4] - q2[4:]).abs().max() > 1e-4


@pytest.mark.parametrize("target,key", [
    (dict(hidden_size=32, num_attention_heads=2), "hidden_size"),
    (dict(num_layers=2), "num_layers"),
    (dict(ffn_hidden_size=64), "ffn_hidden_size"),
    (dict(kv_channels=32, num_attention_heads=2), "kv_channels"),
    (dict(num_attention_heads=8, num_query_groups=8, kv_channels=16), "num_query_groups"),  # 2 -> 1 per group
    (dict(normalization="LayerNorm"), "normalization"),
    (dict(untie_embeddings_and_output_weights=False), "untie_embeddings_and_output_weights"),
])
def test_invalid_targets_name_the_key(target, key):
    src = family_config("llama")
    with pytest.raises(ValueError, match=f"^{key}:"):
        LemonGrowth(src, ModelConfig.from_dict(target, base=src))


def test_registry_lists_valid_names():
    assert methods.get("lemon", methods.GROW).operator is LemonGrowth
    with pytest.raises(InputError, match="unknown growth method 'lemmon' \\(valid: .*lemon"):
        methods.get("lemmon", methods.GROW)
    with pytest.raises(InputError, match="unknown shrink method 'lemon' \\(valid: drop-layers, prune-experts, subclone\\)"):
        methods.get("lemon", methods.SHRINK)
    assert "lemon" in methods.names(methods.GROW)
