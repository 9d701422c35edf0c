import argparse

import pytest

from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import num_parameters
from scalegrow.core.model import GPT
from scalegrow.errors import InputError
from scalegrow.formats.megatron_args import config_from_args, config_to_args

from helpers import family_config, write_yaml


def test_yaml_keys_left_out_keep_source_values(tmp_path):
    src = family_config("llama")
    dst = ModelConfig.from_yaml(write_yaml(tmp_path / "t.yaml", hidden_size=128, num_layers=6), base=src)
    assert (dst.hidden_size, dst.num_layers) == (128, 6)
    assert (dst.attention.head_dim, dst.mlp.ffn_hidden_size, dst.attention.groups) == (16, 96, 2)
    assert dst.norm.kind == "RMSNorm" and dst.mlp.gated


def test_mha_stays_mha_when_heads_grow(tmp_path):
    src = family_config("gpt2")
    dst = ModelConfig.from_yaml(write_yaml(tmp_path / "t.yaml", hidden_size=128, num_attention_heads=8), base=src)
    assert dst.attention.groups == 8


@pytest.mark.parametrize("values,key", [
    (dict(num_attention_heads=5), "num_attention_heads"),  # 5 does not divide 64
    (dict(num_query_groups=3), "num_query_groups"),  # 3 does not divide 4 heads
    (dict(hidden_sizee=128), "hidden_sizee"),  # unknown key
    (dict(normalization="BatchNorm"), "normalization"),
    (dict(hidden_size="big"), "hidden_size"),
    (dict(swiglu="yes"), "swiglu"),
])
def test_invalid_yaml_names_the_key(tmp_path, values, key):
    path = write_yaml(tmp_path / "t.yaml", **values)
    with pytest.raises(InputError) as err:
        ModelConfig.from_yaml(path, base=family_config("llama"))
    message = str(err.value)
    assert message.startswith(f"{path}: {key}:") and "\n" not in message


def test_invalid_combination_is_value_error():
    with pytest.raises(ValueError, match="^num_attention_heads: 3 does not divide hidden_size 64"):
        family_config("gpt2", num_attention_heads=3)
    with pytest.raises(ValueError, match="^num_query_groups: 4 does not divide num_attention_heads 6"):
        family_config("gpt2", hidden_size=96, num_attention_heads=6, num_query_groups=4)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: [128\nnum_layers: 4\n")
    with pytest.raises(InputError, match=r"bad.yaml: malformed YAML at line \d"):
        ModelConfig.from_yaml(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="expected a mapping"):
        ModelConfig.from_yaml(path)


def test_megatron_args_round_trip():
    for family in ("gpt2", "llama"):
        cfg = family_config(family, vocab_size=100)
        args = config_to_args(cfg, tp=2, pp=3)
        assert args.tensor_model_parallel_size == 2 and args.pipeline_model_parallel_size == 3
        assert args.group_query_attention == (family == "llama")
        assert config_from_args(args) == cfg


def test_megatron_args_update_keeps_everything_else():
    base = config_to_args(family_config("llama"))
    base.lr, base.seq_length, base.micro_batch_size = 3e-4, 64, 4
    grown = family_config("llama", hidden_size=128, num_attention_heads=8, num_query_groups=4)
    args = config_to_args(grown, base)
    assert (args.hidden_size, args.num_attention_heads, args.num_query_groups) == (128, 8, 4)
    assert (args.lr, args.seq_length, args.micro_batch_size) == (3e-4, 64, 4)
    assert base.hidden_size == 64  # the source args are not modified


def test_megatron_args_without_gqa_flag_mean_mha():
    args = argparse.Namespace(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128,
                              ffn_hidden_size=None, num_query_groups=1, group_query_attention=False,
                              kv_channels=None, max_position_embeddings=32)
    cfg = config_from_args(args)
    assert (cfg.attention.groups, cfg.attention.head_dim, cfg.mlp.ffn_hidden_size) == (4, 16, 256)


@pytest.mark.parametrize("family", ["gpt2", "llama", "ln-swiglu-gqa-rope-tied-qkvbias",
                                    "rms-gelu-mha-learned-untied-bias"])
def test_parameter_count_matches_model(family):
    cfg = family_config(family)
    assert num_parameters(cfg) == sum(p.numel() for p in GPT(cfg).parameters())
