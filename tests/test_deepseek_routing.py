"""DeepSeek-V3's routing (sigmoid scores chosen with an expert bias, group-limited, scaled; dense
first layers): every MoE operator keeps the function where it claims to, the bias travels through
every Megatron layout in fp32, and megatron-core computes the reference model's logits from it."""
from __future__ import annotations

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT
from scalegrow.formats.megatron_args import config_from_args, config_to_args
from scalegrow.formats.registry import open_checkpoint
from scalegrow.operators.experts import MoreExperts, PruneExperts
from scalegrow.operators.lemon import LemonGrowth
from scalegrow.operators.upcycle import Upcycle
from scalegrow.write.executor import apply

from helpers import family_config, random_model, tokens, write_yaml

DEEPSEEK = dict(num_moe_experts=8, moe_router_topk=4, moe_router_score_function="sigmoid",
                moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                moe_router_topk_scaling_factor=2.5, moe_layer_freq=[0, 1, 1, 1])


def logits(cfg, sd, x) -> torch.Tensor:
    model = GPT(cfg).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(x)


def close(got, want) -> bool:
    return (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def deepseek_moe(seed: int = 3, **extra) -> tuple[ModelConfig, dict]:
    """A DeepSeek-routed MoE (4 layers, the first dense) with distinct experts and a random routing bias."""
    cfg = family_config("llama", num_layers=4).replace(**{**DEEPSEEK, **extra})
    return cfg, random_model(cfg, seed=seed).state_dict()


def test_the_routing_bias_changes_the_choice_not_the_weights():
    cfg, sd = deepseek_moe()
    model = GPT(cfg).eval()
    model.load_state_dict(sd)
    router = model.decoder.layers[1].mlp.router
    flat = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_, weights, index = router(flat)
        scores = torch.sigmoid(logits_).gather(1, index)
        assert torch.allclose(weights, 2.5 * scores / scores.sum(-1, keepdim=True))  # normalised, scaled
        groups = index // 2  # 8 experts in 4 groups of 2: every token's 4 experts lie in its best 2 groups
        assert all(len(set(g.tolist())) <= 2 for g in groups)
        router.expert_bias.zero_()
        assert not torch.equal(router(flat)[2].sort(-1)[0], index.sort(-1)[0])


@pytest.mark.parametrize("moe, granularity", [
    (DEEPSEEK, 1),
    ({**DEEPSEEK, "moe_router_topk": 1, "moe_router_num_groups": None, "moe_router_group_topk": None}, 1),
    ({**DEEPSEEK, "moe_router_num_groups": 2, "moe_router_group_topk": 1}, 2),
], ids=["sigmoid-top4-groups-scaled", "sigmoid-top1", "granular-2-groups"])
def test_upcycling_into_deepseek_routing_keeps_the_function(moe, granularity):
    src = family_config("llama", num_layers=4)
    sd = random_model(src, seed=3).state_dict()
    op = Upcycle(src, src.replace(**moe), seed=1, granularity=granularity)
    grown = apply(op, sd)
    x = tokens(src, seed=4)
    assert close(logits(op.dst, grown, x), logits(src, sd, x))
    assert torch.equal(grown["decoder.layers.1.mlp.router.expert_bias"], torch.zeros(8))
    assert "decoder.layers.0.mlp.router.weight" not in grown  # the dense first layer stays dense


def test_upcycling_refuses_groups_that_split_a_copy(capsys):
    src = family_config("llama", num_layers=4)
    with pytest.raises(ValueError, match="moe_router_num_groups: 4 groups must divide the 2 copies"):
        Upcycle(src, src.replace(**DEEPSEEK), granularity=4)


@pytest.mark.parametrize("growth", [
    dict(hidden_size=96, num_attention_heads=6, num_query_groups=3, moe_ffn_hidden_size=160, num_layers=6),
    dict(num_layers=8),
], ids=["width-depth", "depth"])
def test_lemon_grows_deepseek_routing_losslessly(growth):
    cfg, sd = deepseek_moe()
    op = LemonGrowth(cfg, ModelConfig.from_dict(growth, base=cfg), seed=2)
    grown = apply(op, sd)
    x = tokens(cfg, seed=4)
    assert close(logits(op.dst, grown, x), logits(cfg, sd, x))
    pattern = op.dst.to_dict()["moe_layer_freq"]
    assert pattern[0] == 0 and pattern.count(0) == 1 + (growth["num_layers"] == 8)  # dense layers copied
    bias = [k for k in grown if k.endswith("expert_bias")]
    assert all(torch.equal(grown[k], sd[k.replace(k.split(".")[2], str(op.layer_sources(int(k.split(".")[2]))[0]),
                                                  1)]) for k in bias)


def test_more_experts_keeps_grouped_sigmoid_routing():
    cfg, sd = deepseek_moe()
    op = MoreExperts(cfg, cfg.replace(num_moe_experts=16, moe_router_topk=8), seed=0)
    grown = apply(op, sd)
    x = tokens(cfg, seed=4)
    assert close(logits(op.dst, grown, x), logits(cfg, sd, x))
    bias = sd["decoder.layers.2.mlp.router.expert_bias"]
    assert torch.equal(grown["decoder.layers.2.mlp.router.expert_bias"], bias.repeat_interleave(2))


def test_more_experts_refuses_what_copies_cannot_split():
    cfg, _ = deepseek_moe(moe_router_topk=1, moe_router_num_groups=None, moe_router_group_topk=None)
    with pytest.raises(ValueError, match="moe_router_topk: a sigmoid router choosing one expert"):
        MoreExperts(cfg, cfg.replace(num_moe_experts=16, moe_router_topk=2))
    cfg, _ = deepseek_moe(moe_router_topk=3, moe_router_group_topk=2)
    with pytest.raises(ValueError, match="moe_router_group_topk: a group's score sums"):
        MoreExperts(cfg, cfg.replace(num_moe_experts=16, moe_router_topk=6))


def test_pruning_keeps_the_kept_experts_biases():
    cfg, sd = deepseek_moe()
    op = PruneExperts(cfg, cfg.replace(num_moe_experts=4), seed=0)  # 4 groups of 1
    op.select({i: torch.arange(8.0) for i in (1, 2, 3)})  # the last four carry the most routing mass
    pruned = apply(op, sd)
    bias = sd["decoder.layers.3.mlp.router.expert_bias"]
    assert torch.equal(pruned["decoder.layers.3.mlp.router.expert_bias"], bias[4:])
    assert op.kept[3] == [4, 5, 6, 7]


def test_megatron_args_carry_the_routing():
    cfg, _ = deepseek_moe()
    args = config_to_args(cfg)
    assert args.moe_layer_freq == [0, 1, 1, 1] and args.moe_router_score_function == "sigmoid"
    assert args.num_experts == 8 and args.moe_router_topk_scaling_factor == 2.5
    assert config_from_args(args) == cfg


def test_bad_routing_is_refused_by_name(tmp_path, capsys):
    src = family_config("llama", num_layers=4)
    commands.save_model(random_model(src).state_dict(), src, tmp_path / "dense")
    for bad, message in ((dict(moe_router_num_groups=3), "moe_router_num_groups: 3 groups must divide "
                                                         "num_moe_experts 8"),
                         (dict(moe_router_score_function="softmax"), "moe_router_enable_expert_bias: "
                                                                     "megatron-core's expert bias needs"),
                         (dict(moe_layer_freq=[0, 1]), "moe_layer_freq: one 1 (MoE) or 0 (dense) per layer, 4")):
        target = write_yaml(tmp_path / "t.yaml", **{**DEEPSEEK, **bad})
        assert cli.main(["grow", "--method", "upcycle", "--src", str(tmp_path / "dense"), "--dst",
                         str(tmp_path / "x"), "--target", str(target)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_the_bias_round_trips_every_megatron_layout_in_fp32(tmp_path):
    cfg, sd = deepseek_moe()
    commands.save_model(sd, cfg, tmp_path / "s", tp=2, pp=2)
    assert cli.main(["convert", "--src", str(tmp_path / "s"), "--dst", str(tmp_path / "a"), "--tp", "2", "--pp", "2",
                     "--ep", "2", "--no-progress"]) == 0
    for fmt, name in (("torch_dist", "b"), ("torch", "c")):
        assert cli.main(["convert", "--src", str(tmp_path / ("a" if fmt == "torch_dist" else "b")), "--dst",
                         str(tmp_path / name), "--format", fmt, "--dtype", "bf16", "--no-progress"]) == 0
    back = open_checkpoint(tmp_path / "c").state_dict()
    for key in (k for k in sd if k.endswith("expert_bias")):
        assert back[key].dtype == torch.float32 and torch.equal(back[key], sd[key])


@pytest.mark.slow
def test_megatron_core_computes_deepseek_routing_at_tp2_ep2(tmp_path):
    """megatron-core's MoE GPTModel (sigmoid router with its expert_bias buffer, groups, a dense first
    layer) loads the legacy files at TP2/PP2/EP2 and the torch_dist checkpoint (resharded on load), and
    computes the reference model's logits."""
    import mcore

    cfg, sd = deepseek_moe(moe_shared_expert_intermediate_size=64)
    commands.save_model(sd, cfg, tmp_path / "s", tp=2, pp=2)
    assert cli.main(["convert", "--src", str(tmp_path / "s"), "--dst", str(tmp_path / "legacy"), "--tp", "2",
                     "--pp", "2", "--ep", "2", "--no-progress"]) == 0
    assert cli.main(["convert", "--src", str(tmp_path / "legacy"), "--dst", str(tmp_path / "dist"), "--format",
                     "torch_dist", "--no-progress"]) == 0
    x = tokens(cfg, seed=5)
    torch.save(x, tmp_path / "tokens.pt")
    job = {"config": open_checkpoint(tmp_path / "legacy").config.to_dict(), "path": str(tmp_path / "legacy"),
           "format": "torch", "tokens": str(tmp_path / "tokens.pt")}
    want = logits(cfg, sd, x)[..., :100]
    for got in mcore.run_megatron_check(2, 2, [job, dict(job, path=str(tmp_path / "dist"), format="torch_dist")],
                                        tmp_path, ep=2):
        assert close(got[..., :100], want)


def test_a_target_layer_has_its_source_layers_type():
    """The MoE pattern follows the depth map, whatever a target says: every layer of an all-MoE
    source stays MoE (a target's moe_layer_freq 2 would have left LEMON no expert to copy from)."""
    src = family_config("llama", num_layers=4).replace(num_moe_experts=4)
    op = LemonGrowth(src, src.replace(moe_layer_freq=2, num_layers=6), seed=0)
    assert op.dst.to_dict()["moe_layer_freq"] == 1
    sd = random_model(src, seed=3).state_dict()
    x = tokens(src, seed=4)
    assert close(logits(op.dst, apply(op, sd), x), logits(src, sd, x))
