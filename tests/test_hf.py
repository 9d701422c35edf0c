"""Hugging Face directories in and out, with transformers as the oracle: each family is a tiny random
model built and saved by transformers itself (tests/hf_models.py)."""
from __future__ import annotations

import json

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.formats.options import HFOptions, LayoutOptions, OutputOptions
from scalegrow.formats.registry import open_checkpoint
from scalegrow.methods import registry as methods

from helpers import tree_sha256, write_yaml
from hf_models import FAMILIES, VOCAB, build, logits, train_tokenizer

HF = OutputOptions(format="hf", hf=HFOptions(max_shard_size=200_000))
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """family -> a saved HF model directory with its tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = train_tokenizer(root / "tokenizer")
    return {family: build(family, root / family, tokenizer) for family in FAMILIES}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to fp32 reordering: max |Δ| relative to the logit scale."""
    return (a - b).abs().max().item() <= rel * a.abs().max().item()


def safetensors_state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_reader_computes_what_transformers_computes(hf, family):
    model = commands.load_model(hf[family])
    with torch.no_grad():
        assert close(logits(hf[family], TOKENS), model(TOKENS))


@pytest.mark.slow
def test_megatron_core_at_tp2_pp2_equals_transformers(hf, tmp_path):
    """(a) HF -> Megatron TP2/PP2: megatron-core loads every rank strictly; logits equal transformers'."""
    import mcore

    torch.save(TOKENS, tmp_path / "tokens.pt")
    jobs = []
    for family in FAMILIES:
        commands.convert(hf[family], tmp_path / family, OutputOptions(layout=LayoutOptions(tp=2, pp=2)), progress=False)
        jobs.append({"config": open_checkpoint(tmp_path / family).config.to_dict(), "path": str(tmp_path / family),
                     "format": "torch", "tokens": str(tmp_path / "tokens.pt")})
    for family, got in zip(FAMILIES, mcore.run_megatron_check(2, 2, jobs, tmp_path)):
        assert got.shape[-1] == 1024  # padded by Megatron's rule: 128 x TP2
        assert close(logits(hf[family], TOKENS), got[..., :VOCAB], rel=1e-4), family


@pytest.mark.parametrize("family", FAMILIES)
def test_lemon_growth_hf_to_hf_is_lossless_in_transformers(hf, tmp_path, family):
    """(b) HF -> grow --method lemon -> HF: AutoModelForCausalLM loads it and computes the same logits."""
    groups, ffn = (8, 512) if family == "gpt2" else (4, 192)
    experts = dict(moe_ffn_hidden_size=ffn) if family in ("mixtral", "qwen3_moe", "qwen2_moe") else {}
    if family == "qwen2_moe":
        experts["moe_shared_expert_intermediate_size"] = 160
    target = write_yaml(tmp_path / "t.yaml", num_layers=6, hidden_size=128, ffn_hidden_size=ffn,
                        num_attention_heads=8, num_query_groups=groups, **experts)
    commands.grow(hf[family], tmp_path / "big", "lemon", target, HF, progress=False)
    config = json.loads((tmp_path / "big" / "config.json").read_text())
    source = json.loads((hf[family] / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == source["architectures"]
    assert (config.get("num_hidden_layers") or config["n_layer"]) == 6
    assert config.get("bos_token_id") == source.get("bos_token_id")  # the rest of config.json kept
    assert TOKENIZER_FILES <= {p.name for p in (tmp_path / "big").iterdir()}
    assert json.loads((tmp_path / "big" / "generation_config.json").read_text())["max_new_tokens"] == 17
    assert close(logits(hf[family], TOKENS), logits(tmp_path / "big", TOKENS))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_megatron_to_hf_is_tensor_for_tensor_identical(hf, tmp_path, family):
    """(c) HF -> Megatron (TP2/PP2, vocabulary padded) -> HF: the same tensors, the same config."""
    commands.convert(hf[family], tmp_path / "meg", OutputOptions(layout=LayoutOptions(tp=2, pp=2)), progress=False)
    commands.convert(tmp_path / "meg", tmp_path / "back", HF, progress=False)
    a, b = safetensors_state(hf[family]), safetensors_state(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    src, out = (json.loads((p / "config.json").read_text()) for p in (hf[family], tmp_path / "back"))
    assert {k: v for k, v in out.items() if k in src} == src
    assert len(list((tmp_path / "back").glob("*.safetensors"))) > 1 and (tmp_path / "back" /
                                                                       "model.safetensors.index.json").is_file()
    assert TOKENIZER_FILES <= {p.name for p in (tmp_path / "back").iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_shrink_and_ligo_outputs_load_in_transformers_and_evaluate(hf, tmp_path, family, capsys):
    """(d) subclone and LiGO written as HF: transformers loads them, its logits are scalegrow's, and
    `scalegrow eval` runs with the HF tokenizer that travelled with them."""
    shrink_and_ligo_evaluate(hf[family], tmp_path, capsys, num_layers=5)


def shrink_and_ligo_evaluate(src, tmp_path, capsys, **big_layers):
    """Subclone (to 48 wide, 3 layers) and LiGO (to 96 wide, and `big_layers`) written as HF; both
    load in transformers with scalegrow's logits, and `scalegrow eval` scores them below 2 ln V."""
    small = write_yaml(tmp_path / "small.yaml", hidden_size=48, ffn_hidden_size=64, num_layers=3,
                       num_attention_heads=2, num_query_groups=1)
    big = write_yaml(tmp_path / "big.yaml", hidden_size=96, ffn_hidden_size=128, num_attention_heads=6,
                     num_query_groups=3, **big_layers)
    data = commands.DataOptions(seq_length=64)
    commands.shrink(src, tmp_path / "shrunk", "subclone", small, HF,
                    methods.options_with("subclone", methods.SHRINK, tokens=4096), data, progress=False)
    commands.grow(src, tmp_path / "ligo", "ligo", big, HF, progress=False, data=data,
                  options=methods.options_with("ligo", methods.GROW, steps=3))
    for name in ("shrunk", "ligo"):
        with torch.no_grad():
            assert close(logits(tmp_path / name, TOKENS), commands.load_model(tmp_path / name)(TOKENS))
        assert cli.main(["eval", str(tmp_path / name), "--tokens", "2048", "--seq-length", "64"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert 0 < result["loss"] < 2 * torch.log(torch.tensor(float(VOCAB))).item()


@pytest.mark.parametrize("family, sibling, granularity", [("llama", "mixtral", 2), ("qwen3", "qwen3_moe", 1)])
def test_upcycled_hf_model_is_written_as_its_moe_family(hf, tmp_path, family, sibling, granularity):
    """A dense HF model upcycled (granular for llama) and written as HF becomes its MoE family, which
    transformers loads strictly and which computes the dense model's logits."""
    target = write_yaml(tmp_path / "t.yaml", num_moe_experts=4 * granularity, moe_router_topk=2 * granularity)
    commands.grow(hf[family], tmp_path / "moe", "upcycle", target, HF, progress=False,
                  options=methods.options_with("upcycle", methods.GROW, granularity=granularity))
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == sibling and config["num_experts_per_tok"] == 2 * granularity
    assert config["bos_token_id"] == json.loads((hf[family] / "config.json").read_text())["bos_token_id"]
    assert close(logits(hf[family], TOKENS), logits(tmp_path / "moe", TOKENS))


def test_more_experts_on_mixtral_hf_to_hf_keeps_the_function(hf, tmp_path):
    target = write_yaml(tmp_path / "t.yaml", num_moe_experts=8, moe_router_topk=4)
    commands.grow(hf["mixtral"], tmp_path / "more", "more-experts", target, HF, progress=False)
    assert json.loads((tmp_path / "more" / "config.json").read_text())["num_local_experts"] == 8
    assert close(logits(hf["mixtral"], TOKENS), logits(tmp_path / "more", TOKENS))


def test_qwen3_moe_hub_spelling_and_softmax_before_top_k(tmp_path):
    """The Hub's config.json says `num_experts`; norm_topk_prob false is megatron-core's softmax
    before top-k (weights not renormalised). Both read as transformers computes them."""
    import transformers

    from hf_models import COMMON

    cfg = transformers.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                      norm_topk_prob=False)
    build_from = build("qwen3_moe", tmp_path / "q", config=cfg)
    config = json.loads((build_from / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts", None) or config["num_experts"]
    (build_from / "config.json").write_text(json.dumps(config))
    reader = open_checkpoint(build_from)
    assert reader.config.moe.num_experts == 4 and reader.config.moe.pre_softmax
    with torch.no_grad():
        assert close(logits(build_from, TOKENS), commands.load_model(build_from)(TOKENS))


def test_megatron_without_hf_origin_converts_by_its_structure(tmp_path, capsys):
    """A Megatron model that never was HF: the family comes from its structure, or --hf-model-type;
    vocabulary padding is removed."""
    from helpers import family_config

    cfg = family_config("llama", num_layers=2)  # padded 128, true vocab 100
    commands.init_checkpoint(cfg, tmp_path / "meg", OutputOptions(layout=LayoutOptions(tp=2)))
    for family in ("llama", "mistral"):
        assert cli.main(["convert", "--src", str(tmp_path / "meg"), "--dst", str(tmp_path / family), "--format",
                         "hf", "--hf-model-type", family, "--no-progress"]) == 0
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["model_type"] == family and config["vocab_size"] == 100
        tokens = TOKENS % 100
        with torch.no_grad():
            assert close(logits(tmp_path / family, tokens), commands.load_model(tmp_path / "meg")(tokens)[..., :100])
    assert cli.main(["convert", "--src", str(tmp_path / "meg"), "--dst", str(tmp_path / "x"), "--format", "hf",
                     "--hf-model-type", "gpt2"]) == 2
    assert "cannot be written as gpt2" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_dry_run_plans_the_hf_files(hf, tmp_path, capsys):
    target = write_yaml(tmp_path / "t.yaml", num_layers=6)
    assert cli.main(["grow", "--src", str(hf["qwen2"]), "--dst", str(tmp_path / "x"), "--target", str(target),
                     "--format", "hf", "--max-shard-size", "100kB", "--dry-run"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert len(files) > 1 and all(name.startswith("model-") for name in files)
    shapes = {k: v for f in files.values() for k, v in f["shapes"].items()}
    assert shapes["model.layers.5.self_attn.k_proj.bias"] == [32] and "lm_head.weight" not in shapes  # tied
    assert shapes["model.embed_tokens.weight"] == [VOCAB, 64] and not (tmp_path / "x").exists()


def test_every_tokenizer_file_travels_into_every_output(hf, tmp_path, capsys):
    """chat_template.jinja (transformers 5), a chat_template in tokenizer_config.json, named templates,
    special_tokens_map.json, added_tokens.json, vocab.json/merges.txt and tokenizer.model go from an HF
    source into an HF output, a Megatron one and HF again, byte for byte; the chat template renders
    the same. With no --format, each output is the source's format."""
    import shutil

    import transformers

    src = tmp_path / "src"
    shutil.copytree(hf["llama"], src)
    extra = {"special_tokens_map.json": '{"eos_token": "<|endoftext|>"}', "added_tokens.json": "{}",
             "vocab.json": "{}", "merges.txt": "#version: 0.2\n", "tokenizer.model": "sentencepiece bytes",
             "additional_chat_templates/tool_use.jinja": "{{ messages[0]['content'] }}"}
    (src / "additional_chat_templates").mkdir()
    for name, text in extra.items():
        (src / name).write_text(text)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'inline' }}"}))
    target = write_yaml(tmp_path / "t.yaml", num_layers=6)
    assert cli.main(["grow", "--src", str(src), "--dst", str(tmp_path / "hf"), "--target", str(target)]) == 0
    assert cli.main(["convert", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "meg"), "--format", "torch"]) == 0
    assert cli.main(["convert", "--src", str(tmp_path / "meg"), "--dst", str(tmp_path / "back"), "--format", "hf"]) == 0
    assert cli.main(["convert", "--src", str(tmp_path / "meg"), "--dst", str(tmp_path / "meg2")]) == 0
    capsys.readouterr()
    assert open_checkpoint(tmp_path / "hf").format == "hf" and open_checkpoint(tmp_path / "meg2").format == "torch"
    wanted = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()
              if not p.name.startswith("model") and p.name != "config.json"}
    for out in ("hf", "meg", "back", "meg2"):
        assert all((tmp_path / out / name).read_bytes() == (src / name).read_bytes() for name in wanted), out
    chat = [{"role": "user", "content": "hello"}]
    render = [transformers.AutoTokenizer.from_pretrained(p).apply_chat_template(chat, tokenize=False)
              for p in (src, tmp_path / "back")]
    assert render[0] == render[1] and render[0] in ("<|user|>hello<|endoftext|>", "inline")


def test_inspect_describes_an_hf_source(hf, capsys):
    assert cli.main(["inspect", str(hf["qwen3"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "hf" and info["model"]["qk_layernorm"] and info["model"]["kv_channels"] == 24
    assert info["model"]["padded_vocab_size"] == VOCAB and len(info["shards"]) > 1


# ---- bad input: one line naming what is wrong, exit 2, the source untouched -------------------------------
def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, words", [
    ({"model_type": "gemma3"}, "model_type: 'gemma3' is not a family scalegrow reads: Gemma 3's multimodal"),
    ({"layer_types": ["chunked_attention"] * 4}, "layer_types: ['chunked_attention'] is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 8.0}}, "rope_type: 'dynamic'"),
    ({"hidden_act": "gelu"}, "hidden_act: 'gelu' is not supported"),
    ({"intermediate_size": 80}, "mlp.gate_proj.weight: shape (96, 64) does not match (80, 64)"),
])
def test_unsupported_or_inconsistent_config_is_refused(hf, tmp_path, capsys, changes, words):
    src = _edit_config(hf["mistral"], tmp_path / "src", **changes)
    before = tree_sha256(src)
    assert cli.main(["convert", "--src", str(src), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and str(src) in err and len(err.strip().splitlines()) == 1
    assert tree_sha256(src) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, changes, words", [
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step: 2 is not supported"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers: [1] is not supported"),
    ("mixtral", {"num_experts_per_tok": 1}, "num_experts_per_tok: 1 is not supported"),
    ("mixtral", {"num_local_experts": 8}, "gate.weight: shape (4, 64) does not match (8, 64)"),
    ("mixtral", {"sliding_window": 32}, "sliding_window: 32 is not supported"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                  "long_factor": [2.0] * 4}}, "rope_type: 'longrope' is not supported"),
])
def test_unsupported_family_config_is_refused(hf, tmp_path, capsys, family, changes, words):
    src = _edit_config(hf[family], tmp_path / "src", **changes)
    assert cli.main(["convert", "--src", str(src), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_missing_tensor_is_named(hf, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = _edit_config(hf["llama"], tmp_path / "src")
    shard = next(f for f in sorted(src.glob("*.safetensors")) if "model.norm.weight" in load_file(f))
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, shard)
    assert cli.main(["convert", "--src", str(src), "--dst", str(tmp_path / "out")]) == 2
    assert "model.norm.weight: missing tensor (expected shape (64,)" in capsys.readouterr().err


def test_hf_output_has_no_model_parallelism(hf, tmp_path, capsys):
    assert cli.main(["convert", "--src", str(hf["llama"]), "--dst", str(tmp_path / "o"), "--format", "hf",
                     "--tp", "2"]) == 2
    assert "--tp: the hf format has no model parallelism" in capsys.readouterr().err


def test_dtype_chooses_what_the_weights_are_stored_in(hf, tmp_path, capsys):
    """A bf16 model grown with LEMON: stored in bf16 each weight is rounded (verify: different, by
    bf16's resolution), with --dtype fp32 the grown model computes the source's function."""
    from safetensors import safe_open

    target = write_yaml(tmp_path / "t.yaml", num_layers=6, hidden_size=128, ffn_hidden_size=192,
                        num_attention_heads=8, num_query_groups=4)
    src = tmp_path / "bf16"
    assert cli.main(["convert", "--src", str(hf["llama"]), "--dst", str(src), "--dtype", "bf16"]) == 0
    for dtype, verdict in ((None, 1), ("fp32", 0)):
        out = tmp_path / f"grown-{dtype}"
        assert cli.main(["grow", "--src", str(src), "--dst", str(out), "--target", str(target),
                         *(["--dtype", dtype] if dtype else [])]) == 0
        shard = next(out.glob("*.safetensors"))
        with safe_open(str(shard), "pt") as f:
            stored = f.get_tensor(next(iter(f.keys()))).dtype
        assert stored == (torch.float32 if dtype else torch.bfloat16)
        assert json.loads((out / "config.json").read_text())["dtype"] == ("float32" if dtype else "bfloat16")
        capsys.readouterr()
        assert cli.main(["verify", "--src", str(src), "--dst", str(out)]) == verdict
        report = json.loads(capsys.readouterr().out)
        assert report["max_rel_diff"] < (1e-5 if dtype else 2e-2)
