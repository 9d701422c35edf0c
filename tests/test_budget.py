"""`scalegrow shrink --params N`: the shape rule (Minitron: width before depth) at real sizes, the
budget's spellings, and the dry run that shows the choice without reading a weight."""
import json

import pytest

from scalegrow import cli, commands
from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import num_parameters
from scalegrow.errors import InputError
from scalegrow.methods import budget

from helpers import family_config, random_model

LLAMA_70B = ModelConfig.from_dict(dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                        num_query_groups=8, kv_channels=128, padded_vocab_size=128256, vocab_size=128256,
                        max_position_embeddings=8192, normalization="RMSNorm", swiglu=True,
                        position_embedding_type="rope", untie_embeddings_and_output_weights=True,
                        add_bias_linear=False))


@pytest.mark.parametrize("params", [35e9, 8e9])
def test_the_rule_keeps_depth_and_narrows_width_to_fit(params):
    cfg = budget.shape_for(LLAMA_70B, int(params))
    assert cfg.num_layers == 80 and cfg.attention.head_dim == 128 and cfg.attention.per_group == 8
    assert 0.97 * params <= num_parameters(cfg) <= params  # the widest that fits: within 3%
    assert cfg.hidden_size % cfg.attention.heads == 0 and cfg.mlp.ffn_hidden_size % 8 == 0
    wider = budget.narrowed(LLAMA_70B, cfg.hidden_size / 8192 + 0.01)
    assert num_parameters(wider) > params


def test_budgets_are_counts_or_fractions():
    assert budget.parse("1.5B", 70 * 10**9) == 1_500_000_000
    assert budget.parse("350m", 10**9) == 350_000_000
    assert budget.parse("0.5", 1000) == 500
    assert budget.parse("120000", 10**6) == 120000
    with pytest.raises(InputError, match="--params: 2B is 2,000,000,000 parameters; the source has 1,000,000,000"):
        budget.parse("2B", 10**9)
    with pytest.raises(InputError, match="--params: not a parameter count: 'half'"):
        budget.parse("half", 10**9)


@pytest.fixture
def src(tmp_path):
    cfg = family_config("llama", num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=4,
                        ffn_hidden_size=256)
    commands.save_model(random_model(cfg).state_dict(), cfg, tmp_path / "src", tp=2)
    return tmp_path / "src"


def test_dry_run_shows_the_choice_and_reads_no_weights(src, tmp_path, capsys):
    for f in src.rglob("*.pt"):  # only the args of rank 0's file are read: the rest may be anything
        if "mp_rank_01" in str(f):
            f.write_bytes(b"not a checkpoint")
    argv = ["shrink", "--src", str(src), "--dst", str(tmp_path / "out"), "--params", "0.5", "--dry-run"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    cfg = commands.open_checkpoint(src, validate=False).config
    chose = budget.shape_for(cfg, num_parameters(cfg) // 2, tp=2)
    assert (f"shrink --params 0.5: {num_parameters(chose) / 1e6:.2f}M params, num_layers=2 "
            f"hidden_size={chose.hidden_size} ffn_hidden_size={chose.mlp.ffn_hidden_size}") in err
    shown = json.loads(out)
    assert shown["target"]["hidden_size"] == chose.hidden_size and shown["target"]["num_layers"] == 2
    assert shown["budget"]["params_chosen"] == num_parameters(chose) <= shown["budget"]["params"]
    assert not (tmp_path / "out").exists()


def test_target_or_params_exactly_one(src, tmp_path, capsys):
    assert cli.main(["shrink", "--src", str(src), "--dst", str(tmp_path / "o")]) == 2
    assert "shrink: give the target shape, --target T.yaml, or a budget, --params N (one of them)" \
        in capsys.readouterr().err
