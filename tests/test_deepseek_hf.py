"""Hugging Face DeepSeek-V3 (`DeepseekV3ForCausalLM`) in and out: transformers is the oracle for the
reference model (multi-latent attention, YaRN, the sigmoid router with its fp32 bias and groups,
shared experts, dense first layers), for every output, and for an FP8-block source; megatron-core's
MLA GPTModel computes transformers' logits from the Megatron conversion."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.formats.registry import open_checkpoint

from hf_models import build, deepseek_config, deepseek_v2_config, logits, train_tokenizer
from test_fp8 import quantise, transformers_state
from test_hf import safetensors_state

X = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
VARIANTS = {  # V3's shape; V2-Lite's attention (no q latent) with plain rope and one group, top-1 unnormalised
    "v3": {},
    "no-q-latent-top1": dict(q_lora_rank=None, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                             n_group=1, topk_group=1, num_experts_per_tok=1, norm_topk_prob=False,
                             routed_scaling_factor=1.0, first_k_dense_replace=2),
}


def close(got, want) -> bool:
    return (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    tokenizer = train_tokenizer(root / "tokenizer")  # prune-experts calibrates on text
    return {name: build("deepseek_v3", root / name, tokenizer, config=deepseek_config(**changes))
            for name, changes in VARIANTS.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_reference_model_computes_what_transformers_computes(models, variant):
    cfg = open_checkpoint(models[variant]).config
    assert cfg.mla.qk_pos_emb_head_dim == 8 and cfg.moe.expert_bias
    with torch.no_grad():
        assert close(commands.load_model(models[variant])(X), logits(models[variant], X))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_to_megatron_and_back_is_identical(models, variant, tmp_path):
    src = models[variant]
    for dst, how in (("m", ["--tp", "2", "--pp", "2", "--ep", "2", "--format", "torch"]), ("hf", ["--format", "hf"])):
        assert cli.main(["convert", "--src", str(src if dst == "m" else tmp_path / "m"), "--dst", str(tmp_path / dst),
                         "--no-progress", *how]) == 0
    ours, theirs = safetensors_state(tmp_path / "hf"), safetensors_state(src)
    assert ours.keys() == theirs.keys() and [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert {ours[k].dtype for k in ours if k.endswith("e_score_correction_bias")} == {torch.float32}
    config, source = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "hf", src))
    assert {k: v for k, v in config.items() if k != "head_dim"} == {k: v for k, v in source.items() if k != "head_dim"}
    assert close(logits(tmp_path / "hf", X), logits(src, X))


def test_a_bf16_release_keeps_its_routing_bias_in_fp32(models, tmp_path):
    assert cli.main(["convert", "--src", str(models["v3"]), "--dst", str(tmp_path / "bf16"), "--format", "hf",
                     "--dtype", "bf16", "--no-progress"]) == 0
    assert cli.main(["convert", "--src", str(tmp_path / "bf16"), "--dst", str(tmp_path / "m"), "--format", "torch",
                     "--no-progress"]) == 0
    state = safetensors_state(tmp_path / "bf16")
    assert {v.dtype for k, v in state.items() if not k.endswith("e_score_correction_bias")} == {torch.bfloat16}
    assert torch.equal(state["model.layers.2.mlp.gate.e_score_correction_bias"],
                       safetensors_state(models["v3"])["model.layers.2.mlp.gate.e_score_correction_bias"])
    assert open_checkpoint(tmp_path / "m").dtype == torch.bfloat16


def test_an_fp8_block_release_is_read_as_transformers_dequantises_it(models, tmp_path):
    quantised = quantise(models["v3"], tmp_path / "fp8", block=(8, 8))
    assert cli.main(["convert", "--src", str(quantised), "--dst", str(tmp_path / "out"), "--format", "hf",
                     "--hf-expert-layout", "fused", "--no-progress"]) == 0  # as transformers holds them
    ours, theirs = safetensors_state(tmp_path / "out"), transformers_state(quantised)
    assert any(k.endswith("q_b_proj.weight") for k in ours)
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k].to(ours[k].dtype))]
    assert ours.keys() <= theirs.keys() and differ == []


def test_lemon_grows_deepseek_losslessly_in_transformers(models, tmp_path):
    """LEMON HF -> HF: wider stream, more heads, wider q and KV latents, FFNs and experts, deeper;
    transformers computes the source's logits from the grown model."""
    target = tmp_path / "t.yaml"
    target.write_text("hidden_size: 96\nnum_attention_heads: 6\nq_lora_rank: 48\nkv_lora_rank: 40\n"
                      "ffn_hidden_size: 128\nmoe_ffn_hidden_size: 32\nmoe_shared_expert_intermediate_size: 64\n"
                      "num_layers: 6\n")
    assert cli.main(["grow", "--method", "lemon", "--src", str(models["v3"]), "--dst", str(tmp_path / "grown"),
                     "--target", str(target), "--no-progress"]) == 0
    config = json.loads((tmp_path / "grown/config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["kv_lora_rank"], config["n_shared_experts"],
            config["num_hidden_layers"], config["first_k_dense_replace"]) == ("deepseek_v3", 96, 40, 2, 6, 1)
    assert close(logits(tmp_path / "grown", X), logits(models["v3"], X))


def test_subclone_shrinks_deepseek_for_transformers(models, tmp_path):
    """Subclone on MLA with DeepSeek's experts: at the source's own size it keeps every dimension, head
    and neuron in order, so transformers computes the source's logits; at half width the output loads
    strictly in transformers and evaluates."""
    target = tmp_path / "t.yaml"
    shrink = ["shrink", "--method", "subclone", "--src", str(models["v3"]), "--target", str(target), "--no-progress",
              "--calib-tokens", "2048"]
    target.write_text("num_layers: 4\n")
    assert cli.main([*shrink, "--dst", str(tmp_path / "same")]) == 0
    assert close(logits(tmp_path / "same", X), logits(models["v3"], X))
    target.write_text("hidden_size: 32\nnum_attention_heads: 2\nffn_hidden_size: 48\nmoe_ffn_hidden_size: 12\n"
                      "moe_shared_expert_intermediate_size: 24\nnum_layers: 3\n")
    assert cli.main([*shrink, "--dst", str(tmp_path / "half")]) == 0
    config = json.loads((tmp_path / "half/config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["kv_lora_rank"]) == (32, 2, 24)
    half = logits(tmp_path / "half", X)
    assert half.shape == (2, 40, 1000) and torch.isfinite(half).all()


def test_expert_operators_on_deepseek(models, tmp_path, capsys):
    """more-experts keeps the function (copies land in their source's group; megatron-core's group
    score over the 8 // 2 best) but that group score is not transformers' (its 2 best): HF refuses it
    by name, Megatron holds it; prune-experts' output loads strictly in transformers and evaluates."""
    src = models["v3"]
    target = tmp_path / "t.yaml"
    target.write_text("num_moe_experts: 16\nmoe_router_topk: 8\n")
    grow = ["grow", "--method", "more-experts", "--src", str(src), "--target", str(target), "--no-progress"]
    assert cli.main([*grow, "--dst", str(tmp_path / "more-hf"), "--format", "hf"]) == 2
    assert "cannot be written as deepseek_v3 (moe_router_group_topk=2)" in capsys.readouterr().err
    assert cli.main([*grow, "--dst", str(tmp_path / "more"), "--format", "torch"]) == 0
    with torch.no_grad():
        assert close(commands.load_model(tmp_path / "more")(X)[..., :1000], logits(src, X))
    target.write_text("num_moe_experts: 4\nmoe_router_topk: 4\nmoe_router_num_groups: 2\nmoe_router_group_topk: 2\n")
    assert cli.main(["shrink", "--method", "prune-experts", "--src", str(src), "--dst", str(tmp_path / "pruned"),
                     "--target", str(target), "--format", "hf", "--no-progress"]) == 0
    assert json.loads((tmp_path / "pruned/config.json").read_text())["n_routed_experts"] == 4
    pruned = logits(tmp_path / "pruned", X)
    assert pruned.shape == (2, 40, 1000) and torch.isfinite(pruned).all()


def test_what_megatron_core_cannot_reproduce_is_refused_by_name(models, tmp_path, capsys):
    for change, message in ((dict(rope_interleave=False), "rope_interleave: False is not supported"),
                            (dict(num_experts_per_tok=6), "topk_group: 2 is not supported"),
                            (dict(scoring_func="softmax"), "scoring_func: 'softmax' is not supported")):
        bad = tmp_path / "bad"
        shutil.copytree(models["v3"], bad, dirs_exist_ok=True)
        config = {**json.loads((models["v3"] / "config.json").read_text()), **change}
        (bad / "config.json").write_text(json.dumps(config))
        assert cli.main(["convert", "--src", str(bad), "--dst", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err


def test_multi_token_prediction_layers_are_refused_by_name_or_dropped(models, tmp_path, capsys):
    """The release's MTP layer (model.layers.{L}.*, num_nextn_predict_layers 1) goes into no output:
    refused by name, or left out with --drop-mtp, the model otherwise the same."""
    from safetensors.torch import save_file

    src = tmp_path / "mtp"
    shutil.copytree(models["v3"], src)
    last = {k.replace("model.layers.3.", "model.layers.4."): v.clone()
            for k, v in safetensors_state(src).items() if k.startswith("model.layers.3.")}
    last.update({"model.layers.4.enorm.weight": torch.ones(64), "model.layers.4.eh_proj.weight": torch.zeros(64, 128)})
    save_file(last, src / "model-mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in last})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    convert = ["convert", "--src", str(src), "--format", "torch", "--no-progress"]
    assert cli.main([*convert, "--dst", str(tmp_path / "x")]) == 2
    assert "model.layers.4.*: 1 multi-token-prediction layer(s) (" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main([*convert, "--dst", str(tmp_path / "m"), "--drop-mtp"]) == 0
    with torch.no_grad():
        assert close(commands.load_model(tmp_path / "m")(X)[..., :1000], logits(models["v3"], X))


V2_VARIANTS = {"v2-groups-yarn": {}, "v2-lite": dict(q_lora_rank=None, topk_method="greedy", n_group=None,
                                                   topk_group=None, rope_parameters={"rope_theta": 10000.0,
                                                                                     "rope_type": "default"})}


@pytest.mark.parametrize("variant", sorted(V2_VARIANTS))
def test_deepseek_v2_in_and_out(variant, tmp_path):
    """DeepSeek-V2 (and V2-Lite, no q latent): transformers' logits reproduced; HF -> Megatron -> HF
    tensor for tensor, config.json as it was."""
    src = build("deepseek_v2", tmp_path / variant, config=deepseek_v2_config(**V2_VARIANTS[variant]))
    cfg = open_checkpoint(src).config
    assert cfg.moe.pre_softmax and cfg.moe.scaling_factor == 2.0 and not cfg.moe.expert_bias
    with torch.no_grad():
        assert close(commands.load_model(src)(X), logits(src, X))
    for dst, how in (("m", ["--tp", "2", "--ep", "2", "--format", "torch"]), ("hf", ["--format", "hf"])):
        assert cli.main(["convert", "--src", str(src if dst == "m" else tmp_path / "m"), "--dst", str(tmp_path / dst),
                         "--no-progress", *how]) == 0
    ours, theirs = safetensors_state(tmp_path / "hf"), safetensors_state(src)
    assert ours.keys() == theirs.keys() and [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    config, source = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "hf", src))
    assert {k: v for k, v in config.items() if k != "head_dim"} == {k: v for k, v in source.items() if k != "head_dim"}
    if variant == "v2-groups-yarn":  # a group's best expert is megatron-core's group score only at topk // topk_group 1
        (src / "config.json").write_text(json.dumps({**source, "topk_group": 2}))
        assert cli.main(["convert", "--src", str(src), "--dst", str(tmp_path / "x"), "--format", "torch"]) == 2


@pytest.mark.slow
def test_megatron_core_computes_transformers_logits(models, tmp_path):
    """The done criterion: a sharded tiny DeepseekV3ForCausalLM saved by transformers, converted to
    Megatron TP2/PP2/EP2 (legacy) and torch_dist; megatron-core's MLA GPTModel computes its logits."""
    import mcore

    src = models["v3"]
    for dst, how in (("legacy", ["--tp", "2", "--pp", "2", "--ep", "2", "--format", "torch"]),
                     ("dist", ["--format", "torch_dist"])):
        assert cli.main(["convert", "--src", str(src), "--dst", str(tmp_path / dst), "--no-progress", *how]) == 0
    torch.save(X, tmp_path / "tokens.pt")
    job = {"config": open_checkpoint(tmp_path / "legacy").config.to_dict(), "path": str(tmp_path / "legacy"),
           "format": "torch", "tokens": str(tmp_path / "tokens.pt")}
    want = logits(src, X)
    for got in mcore.run_megatron_check(2, 2, [job, dict(job, path=str(tmp_path / "dist"), format="torch_dist")],
                                        tmp_path, ep=2):
        assert close(got[..., :1000], want)
