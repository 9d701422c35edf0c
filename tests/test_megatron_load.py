"""megatron-core's own GPTModel loads what scalegrow writes, strictly, and computes the same logits."""
import pytest
import torch

from scalegrow.cli import main
from scalegrow.commands import save_model
from scalegrow.formats.io import safe_load
from scalegrow.formats.megatron_args import config_from_args

from helpers import family_config, random_model, tokens, write_yaml


@pytest.mark.parametrize("family", ["gpt2", "llama", "ln-swiglu-gqa-rope-tied-qkvbias",
                                    "rms-gelu-mha-learned-untied-bias"])
def test_megatron_core_loads_grown_checkpoint(mcore, tmp_path, family):
    cfg = family_config(family, num_layers=2)
    small = random_model(cfg)
    save_model(small.state_dict(), cfg, tmp_path / "small")
    groups = {} if cfg.attention.groups == cfg.attention.heads else {"num_query_groups": 3}
    target = write_yaml(tmp_path / "t.yaml", hidden_size=96, num_attention_heads=6, ffn_hidden_size=150,
                        num_layers=3, **groups)
    assert main(["grow", "--src", str(tmp_path / "small"), "--dst", str(tmp_path / "big"),
                 "--target", str(target), "--no-progress"]) == 0
    state = safe_load(tmp_path / "big/release/mp_rank_00/model_optim_rng.pt", mmap=False)

    grown_cfg = config_from_args(state["args"])
    theirs = mcore.build_gpt(grown_cfg).eval()
    mcore.load_strict(theirs, state["model"])  # no missing or unexpected keys, `_extra_state` included
    x = tokens(cfg, seq=24)
    with torch.no_grad():
        expected = small(x)
    assert (mcore.forward(theirs, x) - expected).abs().max().item() <= 1e-4
