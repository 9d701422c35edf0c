"""ModelConfig's features as typed records, spelled in Megatron-LM's flat names at the boundary: what
each record holds, the flat round trip for every family, and what operators read from them."""
import pytest

from scalegrow.core.config import ModelConfig, flat_keys
from scalegrow.core.features import FEATURE, FREE, LAYERS, MLP, SIZE, Attention, MoE
from scalegrow.errors import InputError
from scalegrow.operators.lemon import LemonGrowth
from scalegrow.operators.subclone import DropLayers

from helpers import FAMILIES, family_config, write_yaml


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flat_names_round_trip_for_every_family(family):
    cfg = family_config(family)
    flat = cfg.to_dict()
    assert ModelConfig.from_dict(flat) == cfg
    assert set(flat) == set(flat_keys())  # one spelling per key, dense models spell MoE's defaults too
    assert flat["num_moe_experts"] is None and cfg.moe is None


def test_records_hold_what_the_flat_names_say():
    cfg = family_config("llama", num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48)
    assert cfg.attention == Attention(heads=4, groups=2, head_dim=16, qk_norm=False, qkv_bias=False)
    assert (cfg.attention.per_group, cfg.attention.qkv_rows, cfg.attention.proj_in) == (2, 2 * 4 * 16, 64)
    assert cfg.mlp == MLP(ffn_hidden_size=96, activation="silu", gated=True) and cfg.mlp.fc1_rows == 192
    assert (cfg.norm.kind, cfg.norm.eps, cfg.norm.has_bias) == ("RMSNorm", 1e-5, False)
    assert (cfg.embedding.position, cfg.embedding.tied, cfg.rope.base) == ("rope", False, 10000)
    assert cfg.moe == MoE(num_experts=4, topk=2, ffn_hidden_size=48)
    gpt2 = family_config("gpt2", openai_gelu=True)
    assert (gpt2.mlp.activation, gpt2.mlp.gated, gpt2.embedding.tied) == ("gelu_tanh", False, True)


def test_a_record_can_be_built_directly_and_derives_what_megatron_derives():
    cfg = ModelConfig(num_layers=2, hidden_size=64, padded_vocab_size=128, attention=Attention(heads=8))
    assert (cfg.attention.groups, cfg.attention.head_dim, cfg.mlp.ffn_hidden_size) == (8, 8, 256)
    assert cfg.to_dict()["num_query_groups"] == 8 and cfg.to_dict()["swiglu"] is False


def test_every_flat_key_has_a_role_and_features_are_what_operators_keep():
    roles = {key: role for key, (_, role) in flat_keys().items()}
    assert set(roles.values()) == {SIZE, FEATURE, FREE, LAYERS}
    assert roles["window_size"] == FEATURE
    assert [k for k, r in roles.items() if r == LAYERS] == ["window_attn_skip_freq", "moe_layer_freq"]
    assert {k for k, r in roles.items() if r == SIZE} >= {"num_layers", "hidden_size", "ffn_hidden_size",
                                                          "num_attention_heads", "num_query_groups", "kv_channels"}
    assert roles["norm_epsilon"] == FREE and roles["normalization"] == FEATURE and roles["swiglu"] == FEATURE
    features = family_config("llama").features()
    assert features["normalization"] == "RMSNorm" and "hidden_size" not in features and "norm_epsilon" not in features


@pytest.mark.parametrize("key, value", [("normalization", "LayerNorm"), ("swiglu", False), ("rotary_base", 500000),
                                        ("qk_layernorm", True), ("untie_embeddings_and_output_weights", False),
                                        ("window_size", [3, 0])])
def test_growth_and_shrinking_keep_every_feature(key, value):
    src = family_config("llama")
    with pytest.raises(ValueError, match=f"^{key}: target .* differs from source"):
        LemonGrowth(src, src.replace(hidden_size=128, **{key: value}))
    with pytest.raises(ValueError, match=f"^{key}: target .* differs from source"):
        DropLayers(src, src.replace(num_layers=2, **{key: value}))


def test_replace_takes_megatron_names_and_refuses_others():
    cfg = family_config("llama")
    assert cfg.replace(norm_epsilon=1e-6, swiglu=False).norm.eps == 1e-6
    assert cfg.replace(swiglu=False).mlp.activation == "gelu"
    with pytest.raises(ValueError, match="^hiden_size: unknown model config key"):
        cfg.replace(hiden_size=3)


def test_yaml_switches_are_validated_across_records(tmp_path):
    path = write_yaml(tmp_path / "t.yaml", swiglu=True, openai_gelu=True)
    with pytest.raises(InputError, match="openai_gelu: SwiGLU's activation is SiLU"):
        ModelConfig.from_yaml(path, base=family_config("gpt2"))
    path = write_yaml(tmp_path / "moe.yaml", num_moe_experts=0)
    with pytest.raises(InputError, match="num_moe_experts: must be a positive integer, got 0"):
        ModelConfig.from_yaml(path, base=family_config("llama"))


def test_a_sliding_window_pattern_is_spelled_as_megatron_core_does():
    from scalegrow.core.config import compact_pattern

    cfg = family_config("rms-swiglu-gqa-rope-window")  # window on layers 0 and 2 of 3
    assert cfg.attention.window == (5, 0) and cfg.window_pattern() == [True, False, True]
    assert cfg.to_dict()["window_size"] == [5, 0] and cfg.to_dict()["window_attn_skip_freq"] == [1, 0, 1]
    # megatron-core's window_attn_skip_freq N: every N-th layer (1-based) has full attention
    assert family_config("llama", window_size=[5, 0], window_attn_skip_freq=2).window_pattern() == [True, False, True]
    assert [compact_pattern(p) for p in ([1, 1, 1], [1, 0, 1, 0], [1] * 5 + [0] + [1] * 3, [0, 1, 1])] == \
        [None, 2, 6, [0, 1, 1]]
    deeper = ModelConfig.from_dict({"num_layers": 5}, base=cfg)  # a per-layer list repeats to a new depth
    assert deeper.window_pattern() == [True, False, True, True, False]
    four = ModelConfig.from_dict({"num_layers": 4}, base=cfg)  # an operator's target layer j from origins[j]
    assert four.with_layer_origins(cfg, [0, 1, 1, 2]).window_pattern() == [True, False, False, True]


@pytest.mark.parametrize("values, words", [
    (dict(window_size=[5, 2]), "window_size: a causal window is [left, 0]"),
    (dict(window_size=[5, 0], window_attn_skip_freq=[1, 0]), "one 1 (window) or 0 (full) per layer, 3 in all"),
    (dict(window_size=[5, 0], window_attn_skip_freq=0), "window_attn_skip_freq: must be a positive integer"),
])
def test_a_bad_window_is_refused_by_name(values, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        family_config("llama", **values)
