"""The families with norms after each block: Gemma 2, Gemma 3 (text) and OLMo 2, with transformers as the
oracle: tiny random models built and saved by transformers itself, every feature switched on
(tests/hf_models.py: soft-capping, a query_pre_attn_scalar that is not the head dimension, windows,
Gemma 3's local rope and q/k norms; OLMo 2's q/k norms over all heads). megatron-core has no post-norms,
so these families go HF -> HF, and a Megatron output is refused by name."""
from __future__ import annotations

import json

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.methods import registry as methods

from helpers import tree_sha256, write_yaml
from hf_models import VOCAB, build, logits, train_tokenizer
from test_hf import HF, TOKENIZER_FILES, close, safetensors_state, shrink_and_ligo_evaluate

GEMMAS = ("gemma2", "gemma3_text")
FAMILIES = (*GEMMAS, "olmo2")
TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))  # past the 8-token window


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    tokenizer = train_tokenizer(root / "tokenizer")
    return {f: build(f, root / f, tokenizer) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_reader_computes_what_transformers_computes(hf, family):
    model = commands.load_model(hf[family])
    with torch.no_grad():
        assert close(logits(hf[family], TOKENS), model(TOKENS))


@pytest.mark.parametrize("family", GEMMAS)
def test_gemma_features_are_read(hf, family):
    cfg = commands.load_model(hf[family]).cfg
    assert cfg.norm.zero_centered and cfg.norm.post and cfg.embedding.scaled and cfg.mlp.activation == "gelu_tanh"
    assert cfg.attention.scale == 24 ** -0.5 and cfg.final_softcap == 5.0
    assert cfg.window_pattern() == ([True, False] * 2 if family == "gemma2" else [True] * 5 + [False])
    assert (cfg.attention.softcap, cfg.rope.local_base) == ((2.0, None) if family == "gemma2" else (None, 10000))


def test_olmo2_q_and_k_norms_reach_across_heads(hf):
    model = commands.load_model(hf["olmo2"])
    a = model.cfg.attention
    assert a.qk_norm_across_heads and not model.cfg.norm.pre and model.cfg.norm.post
    assert model.decoder.layers[0].self_attention.q_layernorm.weight.shape == (a.heads * a.head_dim,)
    assert model.decoder.layers[0].self_attention.k_layernorm.weight.shape == (a.groups * a.head_dim,)


def test_each_gemma_feature_changes_the_logits(hf):
    """The reference model really uses each feature: switching one off moves the logits."""
    model = commands.load_model(hf["gemma2"])
    with torch.no_grad():
        base = model(TOKENS)
        for change in (dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
                       dict(softmax_scale=16 ** -0.5), dict(scale_embeddings=False), dict(apply_layernorm_1p=False)):
            other = type(model)(model.cfg.replace(**change))
            other.load_state_dict(model.state_dict())
            assert (other(TOKENS) - base).abs().max() > 1e-3 * base.abs().max(), change


@pytest.mark.parametrize("family, hidden, layers", [("gemma2", 128, 6), ("gemma3_text", 96, 9), ("olmo2", 96, 6)])
def test_lemon_growth_hf_to_hf_is_lossless_in_transformers(hf, tmp_path, family, hidden, layers):
    """Wider (heads, groups, FFN; 96 leaves a residue for the zero-centred norms' mean fill) and
    deeper: new blocks are identities through their zero post-norm gains."""
    target = write_yaml(tmp_path / "t.yaml", num_layers=layers, hidden_size=hidden, ffn_hidden_size=192,
                        num_attention_heads=8, num_query_groups=4)
    commands.grow(hf[family], tmp_path / "big", "lemon", target, HF, progress=False)
    config = json.loads((tmp_path / "big" / "config.json").read_text())
    assert config["model_type"] == family and config["num_hidden_layers"] == layers
    if family != "olmo2":
        assert config["query_pre_attn_scalar"] == 24 and config["final_logit_softcapping"] == 5.0
    if family == "gemma3_text":  # 6 -> 9 layers: layers 3, 4, 5 each followed by its copy
        assert config["layer_types"] == ["sliding_attention"] * 7 + ["full_attention"] * 2
        assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert TOKENIZER_FILES <= {p.name for p in (tmp_path / "big").iterdir()}
    assert close(logits(hf[family], TOKENS), logits(tmp_path / "big", TOKENS))


@pytest.mark.parametrize("family, method, options", [
    ("gemma3_text", "llama-pro", {}), ("gemma3_text", "stack", dict(layers="0-5,3-5", zero_copies=True)),
    ("olmo2", "stack", dict(layers="0-3,1-3", zero_copies=True))])
def test_identity_blocks_keep_the_function_through_post_norm_gains(hf, tmp_path, family, method, options):
    layers = 9 if family == "gemma3_text" else 7
    target = write_yaml(tmp_path / "t.yaml", num_layers=layers)
    commands.grow(hf[family], tmp_path / "deep", method, target, HF, progress=False,
                  options=methods.options_with(method, methods.GROW, **options))
    zero_gain = safetensors_state(tmp_path / "deep")[f"model.layers.{layers - 1}.post_feedforward_layernorm.weight"]
    stored = -1.0 if family == "gemma3_text" else 0.0  # Gemma stores w of a gain 1 + w
    assert torch.equal(zero_gain, torch.full_like(zero_gain, stored))
    assert close(logits(hf[family], TOKENS), logits(tmp_path / "deep", TOKENS))


def test_olmo2_growth_that_would_copy_heads_unequally_is_refused(hf, tmp_path, capsys):
    target = write_yaml(tmp_path / "t.yaml", hidden_size=96, num_attention_heads=6, num_query_groups=3)  # groups 2 -> 3
    code = cli.main(["grow", "--src", str(hf["olmo2"]), "--dst", str(tmp_path / "out"), "--target", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "qk_layernorm_across_heads" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_hf_conversion_is_tensor_for_tensor_identical(hf, tmp_path, family):
    commands.convert(hf[family], tmp_path / "back", HF, progress=False)
    a, b = safetensors_state(hf[family]), safetensors_state(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    src, out = (json.loads((p / "config.json").read_text()) for p in (hf[family], tmp_path / "back"))
    assert {k: v for k, v in out.items() if k in src} == src


@pytest.mark.parametrize("family, output, named", [("gemma3_text", "torch", "apply_layernorm_1p"),
                                                   ("olmo2", "torch_dist", "pre_layernorms")])
def test_megatron_output_is_refused_by_name_and_nothing_is_written(hf, tmp_path, capsys, family, output, named):
    before = tree_sha256(hf[family])
    code = cli.main(["convert", "--src", str(hf[family]), "--dst", str(tmp_path / "meg"), "--format", output])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "--format hf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "meg").exists() and tree_sha256(hf[family]) == before


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_shrink_and_ligo_outputs_load_in_transformers_and_evaluate(hf, tmp_path, family, capsys):
    """LiGO keeps the depth: it cannot grow a mixed window pattern's (refused by name)."""
    shrink_and_ligo_evaluate(hf[family], tmp_path, capsys)
