"""Multi-latent attention (DeepSeek-V2/V3) in Megatron checkpoints: the record through Megatron-LM's
args, every layout (TP splits the latents' down projections as megatron-core's local spec does),
megatron-core's MLA GPTModel computing the reference model's logits from them, and refusals by name."""
from __future__ import annotations

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.core.config import ModelConfig
from scalegrow.errors import InputError
from scalegrow.formats.megatron_args import config_from_args, config_to_args
from scalegrow.formats.registry import open_checkpoint

from helpers import random_model, tokens, write_yaml

MLA = dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, padded_vocab_size=128,
           vocab_size=100, max_position_embeddings=64, normalization="RMSNorm", swiglu=True,
           position_embedding_type="rope", add_bias_linear=False, untie_embeddings_and_output_weights=True,
           multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8,
           v_head_dim=12, qk_layernorm=True, norm_epsilon=1e-6)
YARN = dict(use_yarn=True, yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=16, yarn_mscale=1.0,
            yarn_mscale_all_dim=1.0)
DEEPSEEK_MOE = dict(num_moe_experts=8, moe_router_topk=4, moe_ffn_hidden_size=24, moe_router_score_function="sigmoid",
                    moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                    moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=48,
                    moe_layer_freq=[0, 1, 1, 1])


def config(**extra) -> ModelConfig:
    return ModelConfig.from_dict({**MLA, **extra})


def test_megatron_args_carry_mla_and_its_yarn():
    for cfg in (config(), config(**YARN, q_lora_rank=None), config(**YARN, **DEEPSEEK_MOE)):
        args = config_to_args(cfg, tp=2)
        assert args.multi_latent_attention and args.kv_lora_rank == 24 and args.v_head_dim == 12
        assert args.rope_type == ("yarn" if cfg.rope.yarn else "rope")
        assert config_from_args(args) == cfg
    args = config_to_args(config(**YARN))
    assert (args.rotary_scaling_factor, args.mscale_all_dim, args.original_max_position_embeddings) == (4.0, 1.0, 16)


def test_mla_round_trips_every_megatron_layout(tmp_path):
    cfg = config(**YARN, **DEEPSEEK_MOE)
    sd = random_model(cfg, seed=3).state_dict()
    commands.save_model(sd, cfg, tmp_path / "a", tp=2, pp=2)
    steps = (("a", "b", ["--tp", "1", "--pp", "4", "--ep", "2"]), ("b", "c", ["--format", "torch_dist"]),
             ("c", "d", ["--tp", "1", "--pp", "1", "--format", "torch"]))
    for src, dst, how in steps:
        assert cli.main(["convert", "--src", str(tmp_path / src), "--dst", str(tmp_path / dst), "--no-progress",
                         *how]) == 0
    back = open_checkpoint(tmp_path / "d")
    assert back.config == cfg and back.layout.pp == 1
    got = back.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    shard = torch.load(next((tmp_path / "a").rglob("mp_rank_01_000/model_optim_rng.pt")), weights_only=False)
    assert shard["model"]["decoder.layers.0.self_attention.linear_kv_down_proj.weight"].shape == (16, 64)  # 32 / TP2


def test_what_megatron_cannot_hold_is_refused_by_name(tmp_path, capsys):
    odd = config(**YARN, yarn_attention_factor=1.5)  # megatron-core derives cos/sin's factor from the mscales
    with pytest.raises(InputError, match="use_yarn: megatron-core's MLA YaRN scales cos and sin by"):
        commands.save_model(random_model(odd).state_dict(), odd, tmp_path / "odd")
    assert not (tmp_path / "odd").exists()
    cfg = config(qk_pos_emb_head_dim=6)
    commands.save_model(random_model(cfg).state_dict(), cfg, tmp_path / "src")
    assert cli.main(["convert", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "x"), "--tp", "4"]) == 2
    assert ("q_lora_rank: 32 and kv_lora_rank + qk_pos_emb_head_dim 30 must be divisible by tensor parallel size 4"
            in capsys.readouterr().err) and not (tmp_path / "x").exists()


def test_operators_without_mla_rules_refuse_it(tmp_path, capsys):  # LEMON has them (below)
    cfg = config()
    commands.save_model(random_model(cfg).state_dict(), cfg, tmp_path / "mla")
    assert cli.main(["grow", "--src", str(tmp_path / "mla"), "--dst", str(tmp_path / "x"), "--target",
                     str(write_yaml(tmp_path / "t.yaml", num_layers=8)), "--method", "stack"]) == 2
    assert "multi_latent_attention: stack has no rules for multi-latent attention yet" in capsys.readouterr().err


@pytest.mark.slow
def test_megatron_core_computes_mla_at_tp2_pp2_ep2(tmp_path):
    """megatron-core's MLA GPTModel (with DeepSeek-V3's routing, YaRN, a dense first layer) loads the
    legacy files at TP2/PP2/EP2 and the torch_dist checkpoint (resharded on load) strictly and
    computes the reference model's logits."""
    import mcore

    cfg = config(**YARN, **DEEPSEEK_MOE)
    sd = random_model(cfg, seed=3).state_dict()
    commands.save_model(sd, cfg, tmp_path / "s", tp=2, pp=2)
    for dst, how in (("legacy", ["--tp", "2", "--pp", "2", "--ep", "2"]), ("dist", ["--format", "torch_dist"])):
        assert cli.main(["convert", "--src", str(tmp_path / "s"), "--dst", str(tmp_path / dst), "--no-progress",
                         *how]) == 0
    x = tokens(cfg, seed=5)
    torch.save(x, tmp_path / "tokens.pt")
    job = {"config": open_checkpoint(tmp_path / "legacy").config.to_dict(), "path": str(tmp_path / "legacy"),
           "format": "torch", "tokens": str(tmp_path / "tokens.pt")}
    model = commands.load_model(tmp_path / "s")
    with torch.no_grad():
        want = model(x)[..., :100]
    for got in mcore.run_megatron_check(2, 2, [job, dict(job, path=str(tmp_path / "dist"), format="torch_dist")],
                                        tmp_path, ep=2):
        assert (got[..., :100] - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("growth", [
    dict(hidden_size=96, num_attention_heads=6, q_lora_rank=48, kv_lora_rank=40, ffn_hidden_size=128,
         moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=64, num_layers=6),
    dict(hidden_size=128, kv_lora_rank=48),
    dict(num_layers=8, num_attention_heads=8),
    dict(hidden_size=96, num_attention_heads=6, kv_lora_rank=72),  # s = 2/3 against s_c = 1: the √(s/s_c) rows
], ids=["heads-latents-width-depth", "stream-and-kv-latent-doubled", "depth-heads", "stream-not-latents"])
def test_lemon_grows_mla_losslessly(growth):
    """LEMON's MLA rules (operators/lemon.py): latents widened with their norms under the stream's
    eps* = s·eps, heads copied with their q/kv up rows, the shared rope key kept; DeepSeek routing.
    A large eps, so that a latent off by a factor would show (RMSNorm ignores scale but for eps)."""
    from scalegrow.operators.lemon import LemonGrowth
    from scalegrow.write.executor import apply

    cfg = config(**YARN, **DEEPSEEK_MOE, norm_epsilon=0.1)
    sd = random_model(cfg, seed=3).state_dict()
    op = LemonGrowth(cfg, ModelConfig.from_dict(growth, base=cfg), seed=2)
    grown = apply(op, sd)
    x = tokens(cfg, seed=4)
    from scalegrow.core.model import GPT

    def run(c, state):
        model = GPT(c).eval()
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            return model(x)

    want = run(cfg, sd)
    assert (run(op.dst, grown) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert grown["decoder.layers.1.self_attention.kv_layernorm.weight"].shape == (op.dst.mla.kv_lora_rank,)
