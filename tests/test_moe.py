"""Mixture-of-Experts: upcycling a dense model keeps its function; MoE checkpoints at any TP/PP are
loaded strictly by megatron-core (4 gloo ranks) and compute what the dense source computed."""
from __future__ import annotations

import json

import pytest
import torch

from scalegrow import cli, commands
from scalegrow.core.model import GPT
from scalegrow.formats.options import LayoutOptions, OutputOptions
from scalegrow.formats.registry import open_checkpoint
from scalegrow.operators.upcycle import Upcycle
from scalegrow.write.executor import apply

from helpers import family_config, random_model, tokens, write_yaml

UPCYCLES = {  # name: (dense family, MoE settings)
    "llama-top2-of-4": ("llama", dict(num_moe_experts=4, moe_router_topk=2)),
    "llama-pre-softmax-top2-of-4": ("llama", dict(num_moe_experts=4, moe_router_topk=2, moe_router_pre_softmax=True)),
    "gpt2-mixed-layers-bias": ("gpt2", dict(num_moe_experts=3, moe_router_topk=2, moe_layer_freq=2)),
    "qwen3-top1-of-2": ("qwen3", dict(num_moe_experts=2, moe_router_topk=1, moe_router_pre_softmax=True)),
}


def logits(cfg, sd, x) -> torch.Tensor:
    model = GPT(cfg).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("case", sorted(UPCYCLES))
def test_upcycling_keeps_the_function(case):
    family, moe = UPCYCLES[case]
    src = family_config(family)
    dense = random_model(src, seed=3)
    op = Upcycle(src, src.replace(**moe), seed=1)
    sd = apply(op, dense.state_dict())
    x = tokens(src, seed=4)
    with torch.no_grad():
        want = dense(x)
    assert (logits(op.dst, sd, x) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    router = sd["decoder.layers.0.mlp.router.weight"]
    assert router.shape == (moe["num_moe_experts"], src.hidden_size)
    assert (router.abs().sum() > 0) != bool(moe.get("moe_router_pre_softmax"))  # random, or zero by the rule


@pytest.mark.parametrize("family, moe, g", [
    ("llama", dict(num_moe_experts=8, moe_router_topk=4), 2),
    ("gpt2", dict(num_moe_experts=6, moe_router_topk=3, moe_layer_freq=2), 3),
], ids=["llama-2x4-of-8", "gpt2-bias-mixed-3x3-of-6"])
def test_granular_upcycling_keeps_the_function(family, moe, g):
    """E·G experts of ffn/G neurons (NVIDIA's granular upcycling): each expert holds one segment of the
    dense FFN, and the G segments of a copy share a router row, so the layer still computes FFN(x)."""
    src = family_config(family)
    dense = random_model(src, seed=3)
    op = Upcycle(src, src.replace(**moe), seed=1, granularity=g)
    assert op.dst.moe.ffn_hidden_size == src.mlp.ffn_hidden_size // g
    sd = apply(op, dense.state_dict())
    x = tokens(src, seed=4)
    with torch.no_grad():
        want = dense(x)
    assert (logits(op.dst, sd, x) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    fc2 = sd["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"]
    assert fc2.shape == (src.hidden_size, src.mlp.ffn_hidden_size // g)
    seg = src.mlp.ffn_hidden_size // g  # expert 1 is segment 1 of copy 0: fc2 columns [seg, 2·seg), times G
    assert torch.equal(fc2, dense.state_dict()["decoder.layers.0.mlp.linear_fc2.weight"][:, seg:2 * seg] * g)


def test_granular_upcycling_refuses_what_it_cannot_keep(tmp_path, capsys):
    src = family_config("llama")
    commands.save_model(random_model(src).state_dict(), src, tmp_path / "dense")
    for moe, g, message in (
            (dict(num_moe_experts=6, moe_router_topk=3), 2, "moe_router_topk: 3 is not a multiple of granularity 2"),
            (dict(num_moe_experts=8, moe_router_topk=4, moe_router_pre_softmax=True), 2,
             "granularity 2 keeps the function only with the softmax after top-k"),
            (dict(num_moe_experts=8, moe_router_topk=4), 5, "granularity: 5 must be >= 1 and divide ffn_hidden_size")):
        args = ["grow", "--method", "upcycle", "--src", str(tmp_path / "dense"), "--dst", str(tmp_path / "x"),
                "--target", str(write_yaml(tmp_path / "t.yaml", **moe)), "--granularity", str(g)]
        assert cli.main(args) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_noise_breaks_the_symmetry_between_experts():
    src = family_config("llama")
    dense = random_model(src, seed=3)
    op = Upcycle(src, src.replace(num_moe_experts=4), seed=1, noise=0.01)
    sd = apply(op, dense.state_dict())
    fc1 = [sd[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight"] for e in range(4)]
    assert all(not torch.equal(fc1[0], other) for other in fc1[1:])
    x = tokens(src, seed=4)
    with torch.no_grad():
        want = dense(x)
    diff = (logits(op.dst, sd, x) - want).abs().max().item()
    assert 1e-6 < diff < 0.1 * want.abs().max().item()  # near the dense function, no longer exact
    assert torch.equal(apply(op, dense.state_dict())[next(iter(sd))], sd[next(iter(sd))])  # seeded


@pytest.mark.slow
def test_megatron_core_loads_an_upcycled_checkpoint_at_tp2_pp2(tmp_path):
    """`grow --method upcycle` into Megatron at TP2/PP2: megatron-core builds the MoE GPTModel on each
    of 4 ranks, loads its shard strictly, and computes the dense source's logits (granular: 8 experts
    of ffn/2, top-4, moe_ffn_hidden_size 48 split over TP2)."""
    import mcore

    jobs = []
    torch.save(tokens(family_config("llama"), seed=5), tmp_path / "tokens.pt")
    cases = {**UPCYCLES, "llama-granular-2x4-of-8": ("llama", dict(num_moe_experts=8, moe_router_topk=4))}
    for case in ("llama-top2-of-4", "qwen3-top1-of-2", "llama-granular-2x4-of-8"):
        family, moe = cases[case]
        src = family_config(family, num_layers=4)
        commands.save_model(random_model(src, seed=3).state_dict(), src, tmp_path / f"{case}-dense")
        target = write_yaml(tmp_path / f"{case}.yaml", **moe)
        assert cli.main(["grow", "--method", "upcycle", "--src", str(tmp_path / f"{case}-dense"), "--dst",
                         str(tmp_path / case), "--target", str(target), "--tp", "2", "--pp", "2", "--no-progress",
                         "--granularity", "2" if "granular" in case else "1"]) == 0
        jobs.append({"config": open_checkpoint(tmp_path / case).config.to_dict(), "path": str(tmp_path / case),
                     "format": "torch", "tokens": str(tmp_path / "tokens.pt")})
    results = mcore.run_megatron_check(2, 2, jobs, tmp_path)
    for case, got in zip(("llama-top2-of-4", "qwen3-top1-of-2", "llama-granular-2x4-of-8"), results):
        want = commands.load_model(tmp_path / f"{case}-dense")(torch.load(tmp_path / "tokens.pt")).detach()
        got, want = got[..., :100], want[..., :100]  # the true vocabulary (TP2 pads 128 rows to 256)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item(), case
    meta = json.loads((tmp_path / "llama-top2-of-4/scalegrow.json").read_text())
    assert meta["method"] == "upcycle" and meta["model"]["num_moe_experts"] == 4


def test_moe_checkpoints_round_trip_any_layout(tmp_path):
    src = family_config("llama", num_layers=4)
    moe = src.replace(num_moe_experts=4)
    sd = apply(Upcycle(src, moe, seed=1, noise=0.02), random_model(src, seed=3).state_dict())
    commands.save_model(sd, moe, tmp_path / "a", tp=2, pp=2)
    commands.convert(tmp_path / "a", tmp_path / "b", OutputOptions(layout=LayoutOptions(tp=1, pp=4)), progress=False)
    back = open_checkpoint(tmp_path / "b")
    assert back.config == moe.replace(vocab_size=moe.vocab_size) and back.pp == 4
    got = back.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_methods_without_moe_rules_refuse_moe(tmp_path, capsys):
    moe = family_config("llama").replace(num_moe_experts=4)
    commands.save_model(GPT(moe).state_dict(), moe, tmp_path / "moe")
    for method, message in (("stack", "num_moe_experts: stack has no rules for MoE layers yet"),
                            ("ligo", "num_moe_experts: ligo has no rules for MoE layers yet"),
                            ("upcycle", "num_moe_experts: the source is already an MoE (4 experts)")):
        assert cli.main(["grow", "--method", method, "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / "x"),
                         "--target", str(write_yaml(tmp_path / "t.yaml", num_layers=6))]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_shrinking_an_moe_keeps_its_experts_and_layer_pattern(tmp_path, capsys):
    cfg, sd = _trained_looking_moe("gpt2", num_moe_experts=4, moe_router_topk=2, moe_layer_freq=2)
    commands.save_model(sd, cfg, tmp_path / "moe")
    for method, target, message in (
            ("drop-layers", dict(num_moe_experts=2), "shrink prunes experts with --method prune-experts"),
            ("subclone", dict(moe_ffn_hidden_size=128), "moe_ffn_hidden_size: target 128 is larger")):
        assert cli.main(["shrink", "--method", method, "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / "x"),
                         "--target", str(write_yaml(tmp_path / "t.yaml", **target))]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "x").exists()
    target = dict(hidden_size=48, moe_ffn_hidden_size=64, ffn_hidden_size=64, num_attention_heads=2)
    assert cli.main(["shrink", "--method", "drop-layers", "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / "d"),
                     "--target", str(write_yaml(tmp_path / "t.yaml", **target)), "--no-progress"]) == 0
    got = commands.load_model(tmp_path / "d").state_dict()  # the first dims and neurons of every expert
    key = "decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight"
    assert torch.equal(got[key], sd[key][:48, :64])
    assert torch.equal(got["decoder.layers.2.mlp.router.weight"], sd["decoder.layers.2.mlp.router.weight"][:, :48])
    assert cli.main(["shrink", "--method", "drop-layers", "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / "h"),
                     "--target", str(write_yaml(tmp_path / "t.yaml", num_layers=2)), "--no-progress"]) == 0
    kept = commands.load_model(tmp_path / "h")  # layers 0 and 2, both MoE: each kept layer keeps its type
    assert kept.cfg.to_dict()["moe_layer_freq"] == 1 and kept.cfg.num_layers == 2


def test_shrinking_and_growing_a_shared_expert(tmp_path):
    """A shared expert (Qwen2-MoE's, gated) narrows with subcloning (its own neuron ranking) and
    drop-layers (its first neurons), and widens losslessly with LEMON."""
    from scalegrow.operators.lemon import LemonGrowth

    from hf_models import train_tokenizer

    cfg = family_config("llama", num_layers=3, num_moe_experts=4, moe_router_topk=2, padded_vocab_size=1024,
                        vocab_size=1000, moe_shared_expert_intermediate_size=80, moe_shared_expert_gate=True)
    sd = random_model(cfg, seed=3).state_dict()
    commands.save_model(sd, cfg, tmp_path / "moe")
    train_tokenizer(tmp_path / "moe")  # tokenizer.json beside the checkpoint, for calibration
    target = write_yaml(tmp_path / "t.yaml", hidden_size=48, moe_shared_expert_intermediate_size=40)
    for method in ("drop-layers", "subclone"):
        assert cli.main(["shrink", "--method", method, "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / method),
                         "--target", str(target), "--calib-tokens", "2048", "--no-progress"]) == 0
    got = commands.load_model(tmp_path / "drop-layers").state_dict()
    fc1 = sd["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"]  # [gate; up] rows, 80 each
    assert torch.equal(got["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"],
                       torch.cat([fc1[:40, :48], fc1[80:120, :48]]))
    assert commands.load_model(tmp_path / "subclone").cfg.moe.shared_size == 40
    op = LemonGrowth(cfg, cfg.replace(hidden_size=96, moe_shared_expert_intermediate_size=120, num_layers=5))
    x = tokens(cfg, seed=4)
    want = logits(cfg, sd, x)
    assert (logits(op.dst, apply(op, sd), x) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_moe_biases_are_refused_at_tensor_parallel_sizes_megatron_core_refuses(tmp_path, capsys):
    family, moe = UPCYCLES["gpt2-mixed-layers-bias"]
    src = family_config(family, num_layers=4)
    commands.save_model(GPT(src).state_dict(), src, tmp_path / "dense")
    args = ["grow", "--method", "upcycle", "--src", str(tmp_path / "dense"), "--target",
            str(write_yaml(tmp_path / "t.yaml", **moe))]
    assert cli.main(args + ["--dst", str(tmp_path / "x"), "--tp", "2"]) == 2
    assert "add_bias_linear: megatron-core supports MoE biases only without tensor parallel" in capsys.readouterr().err
    assert cli.main(args + ["--dst", str(tmp_path / "y"), "--pp", "2", "--no-progress"]) == 0


def test_upcycle_needs_experts_in_the_target(tmp_path, capsys):
    src = family_config("llama")
    commands.save_model(GPT(src).state_dict(), src, tmp_path / "dense")
    assert cli.main(["grow", "--method", "upcycle", "--src", str(tmp_path / "dense"), "--dst", str(tmp_path / "x"),
                     "--target", str(write_yaml(tmp_path / "t.yaml", hidden_size=128))]) == 2
    assert "num_moe_experts: the target must set it" in capsys.readouterr().err


@pytest.mark.slow
def test_megatron_core_loads_expert_parallel_files(tmp_path):
    """EP2 at PP2 (4 gloo ranks, TP1): files mp_rank_00_PPP_EEE each hold 2 of the 4 experts under
    local indices 0-1; megatron-core loads each strictly and computes the dense source's logits. The
    same model as torch_dist (experts stacked [L, E, ...]) is sharded to EP2 by megatron-core's loader."""
    import mcore

    family, moe = UPCYCLES["llama-top2-of-4"]
    src = family_config(family, num_layers=4)
    commands.save_model(random_model(src, seed=3).state_dict(), src, tmp_path / "dense")
    assert cli.main(["grow", "--method", "upcycle", "--src", str(tmp_path / "dense"), "--dst", str(tmp_path / "ep"),
                     "--target", str(write_yaml(tmp_path / "t.yaml", **moe)), "--pp", "2", "--ep", "2",
                     "--no-progress"]) == 0
    files = sorted(p.parent.name for p in (tmp_path / "ep").rglob("model_optim_rng.pt"))
    assert files == ["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"]
    ckpt = open_checkpoint(tmp_path / "ep")
    assert ckpt.layout.ep == 2 and ckpt.args.expert_model_parallel_size == 2
    torch.save(tokens(src, seed=5), tmp_path / "tokens.pt")
    job = {"config": ckpt.config.to_dict(), "path": str(tmp_path / "ep"), "format": "torch",
           "tokens": str(tmp_path / "tokens.pt")}
    assert cli.main(["convert", "--src", str(tmp_path / "ep"), "--dst", str(tmp_path / "dist"), "--format",
                     "torch_dist", "--no-progress"]) == 0  # resharded to EP2/PP2 by megatron-core on load
    jobs = [job, dict(job, path=str(tmp_path / "dist"), format="torch_dist")]
    want = commands.load_model(tmp_path / "dense")(torch.load(tmp_path / "tokens.pt")).detach()
    for got in mcore.run_megatron_check(1, 2, jobs, tmp_path, ep=2):
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_expert_parallel_round_trip_and_bad_sizes(tmp_path, capsys):
    src = family_config("llama", num_layers=4)
    moe = src.replace(num_moe_experts=4)
    sd = apply(Upcycle(src, moe, seed=1, noise=0.02), random_model(src, seed=3).state_dict())
    commands.save_model(sd, moe, tmp_path / "a")
    assert cli.main(["convert", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "b"), "--tp", "2",
                     "--ep", "4", "--no-progress"]) == 0
    assert cli.main(["convert", "--src", str(tmp_path / "b"), "--dst", str(tmp_path / "c"), "--ep", "1",
                     "--tp", "1", "--no-progress"]) == 0
    assert open_checkpoint(tmp_path / "b").layout.ep == 4
    got = open_checkpoint(tmp_path / "c").state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert cli.main(["convert", "--src", str(tmp_path / "a"), "--dst", str(tmp_path / "x"), "--ep", "3"]) == 2
    assert "--ep: num_moe_experts 4 is not divisible by expert parallel size 3" in capsys.readouterr().err
    commands.save_model(random_model(src).state_dict(), src, tmp_path / "dense")
    assert cli.main(["convert", "--src", str(tmp_path / "dense"), "--dst", str(tmp_path / "x"), "--ep", "2"]) == 2
    assert "this model is dense" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _trained_looking_moe(family: str, base: dict | None = None, **moe) -> tuple:
    """An upcycled model with every tensor moved off its init (distinct experts, a random router)."""
    src = family_config(family, num_layers=4, **(base or {}))
    cfg = src.replace(**moe)
    sd = apply(Upcycle(src, cfg, seed=1), random_model(src, seed=3).state_dict())
    gen = torch.Generator().manual_seed(7)
    return cfg, {k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in sd.items()}


@pytest.mark.parametrize("family, moe, m", [
    ("llama", dict(num_moe_experts=4, moe_router_topk=2), 2),
    ("llama", dict(num_moe_experts=2, moe_router_topk=1, moe_router_pre_softmax=True), 3),
    ("gpt2", dict(num_moe_experts=3, moe_router_topk=2, moe_layer_freq=2), 2),
], ids=["top2-of-4-x2", "pre-softmax-top1-of-2-x3", "gpt2-mixed-bias-x2"])
def test_more_experts_keeps_the_function(family, moe, m):
    from scalegrow.operators.experts import MoreExperts

    cfg, sd = _trained_looking_moe(family, **moe)
    op = MoreExperts(cfg, cfg.replace(num_moe_experts=m * cfg.moe.num_experts, moe_router_topk=m * cfg.moe.topk))
    x = tokens(cfg, seed=4)
    want = logits(cfg, sd, x)
    got = logits(op.dst, apply(op, sd), x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_more_experts_needs_a_multiple_and_a_matching_top_k(tmp_path, capsys):
    cfg, sd = _trained_looking_moe("llama", num_moe_experts=4, moe_router_topk=2)
    commands.save_model(sd, cfg, tmp_path / "moe")
    for target, message in ((dict(num_moe_experts=6, moe_router_topk=3), "must be a multiple (x2 or more)"),
                            (dict(num_moe_experts=8), "moe_router_topk: must be 4 (2 x the source's 2)")):
        assert cli.main(["grow", "--method", "more-experts", "--src", str(tmp_path / "moe"), "--dst",
                         str(tmp_path / "x"), "--target", str(write_yaml(tmp_path / "t.yaml", **target))]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["grow", "--method", "more-experts", "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / "y"),
                     "--target", str(write_yaml(tmp_path / "t.yaml", num_moe_experts=8, moe_router_topk=4)),
                     "--ep", "4", "--no-progress"]) == 0
    assert cli.main(["verify", "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / "y")]) == 0


def _with_dead_expert(dead: int = 2):
    """A GPT-2-like MoE (router biases) whose expert `dead` is never among any token's top-2."""
    cfg, sd = _trained_looking_moe("gpt2", dict(padded_vocab_size=1024, vocab_size=1000), num_moe_experts=4,
                                   moe_router_topk=2, moe_layer_freq=2)
    for key in sd:
        if key.endswith("mlp.router.bias"):
            sd[key][dead] = -1e4
    return cfg, sd


def test_pruning_experts_the_router_never_uses_is_exact():
    from scalegrow.formats.base import MemoryReader
    from scalegrow.methods.experts import routing_mass
    from scalegrow.operators.experts import PruneExperts

    cfg, sd = _with_dead_expert()
    x = tokens(cfg, batch=4, seed=4)
    mass = routing_mass(MemoryReader.of(sd, cfg), x)
    assert sorted(mass) == [0, 2] and all(m[2] == 0 and m.sum() == pytest.approx(x.numel()) for m in mass.values())
    op = PruneExperts(cfg, cfg.replace(num_moe_experts=3))
    op.select(mass)
    assert op.kept == {0: [0, 1, 3], 2: [0, 1, 3]}
    want = logits(cfg, sd, x)
    assert (logits(op.dst, apply(op, sd), x) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.slow
def test_shrink_prune_experts_end_to_end(tmp_path):
    """`shrink --method prune-experts` calibrates on real text (an HF tokenizer shipped with the
    checkpoint), drops the unused expert, records its choice, and the result is the same function."""
    from scalegrow.methods import registry as methods

    from hf_models import train_tokenizer

    cfg, sd = _with_dead_expert()
    commands.save_model(sd, cfg, tmp_path / "moe", pp=2)
    train_tokenizer(tmp_path / "moe")  # tokenizer.json beside the checkpoint
    commands.shrink(tmp_path / "moe", tmp_path / "pruned", "prune-experts",
                    write_yaml(tmp_path / "t.yaml", num_moe_experts=3), OutputOptions(layout=LayoutOptions(pp=1)),
                    methods.options_with("prune-experts", methods.SHRINK, tokens=2048),
                    commands.DataOptions(seq_length=64), progress=False)
    details = json.loads((tmp_path / "pruned/scalegrow.json").read_text())["details"]
    assert details["kept_experts"] == {"0": [0, 1, 3], "2": [0, 1, 3]} and details["routing_mass"]["0"][2] == 0
    assert (tmp_path / "pruned/tokenizer.json").is_file()
    result = commands.verify(tmp_path / "moe", tmp_path / "pruned")
    assert result["max_rel_diff"] <= 1e-5


@pytest.mark.parametrize("family, moe, growth", [
    ("llama", dict(num_moe_experts=4, moe_router_topk=2),
     dict(num_layers=8, hidden_size=96, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=144,
          moe_ffn_hidden_size=160)),
    ("llama", dict(num_moe_experts=2, moe_router_topk=1, moe_router_pre_softmax=True),
     dict(num_layers=6, hidden_size=128, num_attention_heads=8, num_query_groups=4, moe_ffn_hidden_size=192)),
    ("gpt2", dict(num_moe_experts=3, moe_router_topk=2, moe_layer_freq=2),
     dict(hidden_size=96, num_attention_heads=6, num_query_groups=6, ffn_hidden_size=384, moe_ffn_hidden_size=300)),
], ids=["top2-of-4-width-depth", "pre-softmax-top1-width-depth", "gpt2-mixed-bias-width"])
def test_lemon_grows_moe_models_losslessly(family, moe, growth):
    from scalegrow.operators.lemon import LemonGrowth

    cfg, sd = _trained_looking_moe(family, **moe)
    op = LemonGrowth(cfg, cfg.replace(**growth), seed=2)
    x = tokens(cfg, seed=4)
    want = logits(cfg, sd, x)
    grown = apply(op, sd)
    assert (logits(op.dst, grown, x) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    e1 = [k for k in grown if k.endswith("local_experts.1.linear_fc1.weight")][0]
    assert grown[e1].shape[0] == (2 if family == "llama" else 1) * op.dst.moe.ffn_hidden_size


def test_lemon_keeps_the_experts_and_each_layers_type(capsys, tmp_path):
    """Deeper with dense and MoE layers mixed: each new layer is of its source layer's type, so the
    pattern becomes a list where every-N-th no longer holds, and the function is kept."""
    from scalegrow.operators.lemon import LemonGrowth, depth_map

    cfg, sd = _trained_looking_moe("gpt2", num_moe_experts=3, moe_router_topk=2, moe_layer_freq=2)
    op = LemonGrowth(cfg, cfg.replace(num_layers=8), seed=2)
    want = [int(i % 2 == 0) for i, _ in depth_map(cfg.num_layers, 8)]
    assert op.dst.to_dict()["moe_layer_freq"] == want and want != [1, 0] * 4
    x = tokens(cfg, seed=4)
    ref = logits(cfg, sd, x)
    assert (logits(op.dst, apply(op, sd), x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    commands.save_model(sd, cfg, tmp_path / "moe")
    assert cli.main(["grow", "--src", str(tmp_path / "moe"), "--dst", str(tmp_path / "x"), "--target",
                     str(write_yaml(tmp_path / "t.yaml", num_moe_experts=6))]) == 2
    assert "num_moe_experts: target 6 differs from source 3" in capsys.readouterr().err
