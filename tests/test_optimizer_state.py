"""Adam's state grown with the weights (issue 28, write/moments.py): the map is the grown model's own
gradient map (checked against autograd on the grown model), DeepSpeed's ZeRO 1-3 checkpoints give the
moments DeepSpeed itself reports, and `growth.optimizer_state: true` carries them into grow_pretrain
under ZeRO 1, 2 and 3 with the source's loss unchanged."""
import math
import subprocess

import pytest
import torch

from scalegrow.cli import main as cli
from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT, init_weights
from scalegrow.formats.deepspeed import DeepSpeedReader
from scalegrow.formats.registry import open_checkpoint
from scalegrow.methods import registry as methods
from scalegrow.write import moments
from scalegrow.formats import optimizer as optimizer_state
from scalegrow.write.executor import apply

from training import DEEPSPEED, ENV, ROOT, assert_no_shared_memory_left, free_port, scalars, train

FAMILY = dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
              padded_vocab_size=128, vocab_size=128, max_position_embeddings=64)
SMALL = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=1,
             kv_channels=16)
LARGE = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
             kv_channels=16)


def config(shape: dict, tied: bool = False, **extra) -> ModelConfig:
    return ModelConfig.from_dict(dict(**shape, **FAMILY, untie_embeddings_and_output_weights=not tied, **extra))


def gradients(model: GPT, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def growth(tied: bool):
    """A small GPT grown by LEMON to twice its width and depth without symmetry-breaking noise, and both
    models' gradients on the same batch."""
    small = GPT(config(SMALL, tied))
    init_weights(small, 0)
    op, _ = methods.build_operator("lemon", methods.GROW, small.cfg, config(LARGE, tied, init_method_std=0.0), seed=0)
    grown = GPT(op.dst)
    grown.load_state_dict(apply(op, {k: v.detach() for k, v in small.state_dict().items()}))
    tokens = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(0))
    return op, gradients(small, tokens), gradients(grown, tokens)


@pytest.fixture(scope="module")
def noise_free_growth():
    return growth(tied=False)


@pytest.mark.parametrize("tied", [False, True])
def test_the_moment_map_is_the_grown_models_gradient(tied):
    """G(g) = T(D⁻¹g) is, tensor for tensor, the gradient autograd finds on the grown model (the copies
    are exact without noise; a tied output layer is the embedding's one tensor). A new identity block
    gets no gradient but at its output projections, where G (no source) gives zero."""
    op, small, grown = growth(tied)
    mapped = moments.gradient_map(op, small)(small)
    new = tuple(f"decoder.layers.{j}." for j in op.identity_layers())
    assert new == ("decoder.layers.1.", "decoder.layers.3.")
    for name, truth in grown.items():
        if name.startswith(new):
            assert mapped[name].abs().max() == 0.0, name
            if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                assert truth.norm() > 0, name  # what a zero moment leaves for the first steps to find
            else:
                assert truth.abs().max() == 0.0, name
        else:
            assert relative(mapped[name], truth) < 1e-5, name


def test_the_weight_map_alone_would_misplace_the_gradient(noise_free_growth):
    """The map the issue first proposed, the weights' own T(g), is off wherever units are copied: the
    stream's producers (embeddings, norms) take 1/k of the source gradient, and its readers all of it."""
    op, small, grown = noise_free_growth
    offset = apply(op, {k: torch.zeros_like(v) for k, v in small.items()})
    plain = {k: v - offset[k] for k, v in apply(op, small).items()}
    assert relative(plain["embedding.word_embeddings.weight"], grown["embedding.word_embeddings.weight"]) == \
        pytest.approx(1.0, abs=1e-4)  # 2 copies of the gradient instead of halves
    assert relative(plain["output_layer.weight"], grown["output_layer.weight"]) == pytest.approx(0.5, abs=1e-4)


def test_grown_moments_carry_the_step_and_adams_update():
    """m' = G(m), v' = G(√v)²: every live entry of the grown model starts with its source entry's Adam
    update direction m/√v (the same sign and size), and the step count carries over."""
    small = GPT(config(SMALL))
    init_weights(small, 0)
    opt = torch.optim.AdamW(small.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        tokens = torch.randint(0, 128, (4, 17), generator=gen)
        opt.zero_grad()
        small(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
    source = optimizer_state.from_torch(opt, small)
    op, _ = methods.build_operator("lemon", methods.GROW, small.cfg, config(LARGE), seed=0)
    grown = moments.grow(op, source)
    assert grown.step == source.step == 3
    assert set(grown.exp_avg) == set(grown.exp_avg_sq) == {k for k, _ in GPT(op.dst).named_parameters()}
    # the embeddings' columns copy the stream twice: each copy's update is its source entry's
    def update(state: moments.AdamMoments) -> torch.Tensor:  # unseen tokens' rows: 0, not 0/0
        name = "embedding.word_embeddings.weight"
        return state.exp_avg[name] / (state.exp_avg_sq[name].sqrt() + 1e-30)

    src_update, grown_update = update(source), update(grown)
    assert src_update.abs().max() > 0.5
    torch.testing.assert_close(grown_update[:, :32], src_update, rtol=1e-5, atol=0)
    torch.testing.assert_close(grown_update[:, 32:], src_update, rtol=1e-5, atol=0)
    big = GPT(op.dst)
    opt2 = torch.optim.AdamW(big.parameters(), lr=1e-3)
    optimizer_state.into_torch(opt2, big, grown)
    assert optimizer_state.from_torch(opt2, big).step == 3


def test_ligos_mixing_operator_is_refused_by_name():
    small, large = config(SMALL), config(LARGE)
    ligo, _ = methods.build_operator("ligo", methods.GROW, small, large, seed=0)
    lemon, _ = methods.build_operator("lemon", methods.GROW, small, large, seed=0)
    assert (ligo.entrywise, lemon.entrywise) == (False, True)


@pytest.mark.slow
def test_deepspeed_checkpoints_give_the_moments_deepspeed_reports(tmp_path):
    """Two CPU ranks under ZeRO 1, 2 and 3 (tests/ds_adam.py): the moments merged from the saved
    partitions equal DeepSpeed's own `safe_get_full_optimizer_state`, bit for bit, for every parameter;
    moments loaded into a fresh engine then step exactly as torch's AdamW from the same state."""
    port = free_port()
    result = subprocess.run([str(DEEPSPEED), "--log_level", "error", "--num_gpus", "2", "--master_port",
                             str(port), str(ROOT / "tests" / "ds_adam.py"), str(tmp_path)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_shared_memory_left("ds_adam", port)
    for stage in (1, 2, 3):
        reported = torch.load(tmp_path / f"z{stage}.pt", weights_only=True)
        read = DeepSpeedReader.optimizer_state(DeepSpeedReader(tmp_path / f"z{stage}", 3, None, None, None, None, tag="t"))
        assert read.step == 3
        assert set(read.exp_avg) == set(reported["saved"]["exp_avg"]) and len(read.exp_avg) == 15
        for key in ("exp_avg", "exp_avg_sq"):
            for name, value in reported["saved"][key].items():
                assert torch.equal(getattr(read, key)[name], value), (stage, key, name)
        assert reported["loaded_step_diff"] <= 1e-7, stage


# ---- grow_pretrain -----------------------------------------------------------------------------------
SOURCE_STEPS = 12


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """tiny_scratch for 12 steps under ZeRO-2: its DeepSpeed checkpoint holds Adam's state."""
    out = tmp_path_factory.mktemp("adam") / "scratch"
    train("pretrain", "configs/runs/tiny_scratch.yaml", [f"output.dir={out}", f"train.steps={SOURCE_STEPS}",
                                                         "train.save_interval=12", "train.eval_interval=12",
                                                         "deepspeed.zero_stage=2"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_grow_pretrain_carries_adams_state(source_run, tmp_path, zero_stage):
    """growth.optimizer_state: true, no re-warmup. At step 0 the grown run's validation loss is the
    source's final one, and its checkpoint holds, for every parameter, the source's moments mapped by
    the growth (equal norms), at the source's step count; it then trains on under this ZeRO stage."""
    out = tmp_path / "grown"
    common = [f"output.dir={out}", f"init.from={source_run}/checkpoints", "growth.optimizer_state=true",
              "schedule.warmup_steps=0", f"deepspeed.zero_stage={zero_stage}",
              f"data.corpus={source_run}/data/corpus", f"data.tokenizer={source_run}/data/tokenizer.model"]
    result = train("grow_pretrain", "configs/runs/tiny_lemon.yaml", [*common, "train.steps=0"])
    assert "Adam's moments grown with the weights (" in result.stdout and f"step {SOURCE_STEPS} of" in result.stdout
    small, grown = scalars(source_run / "tensorboard"), scalars(out / "tensorboard")
    assert abs(grown["val/loss"][0] - small["val/loss"][SOURCE_STEPS]) <= 1e-4
    src = open_checkpoint(source_run / "checkpoints")
    op, _ = methods.build_operator("lemon", methods.GROW, src.config, open_checkpoint(out / "checkpoints").config)
    expected = moments.grow(op, src.optimizer_state())
    carried = open_checkpoint(out / "checkpoints").optimizer_state()
    assert carried.step == SOURCE_STEPS
    assert set(carried.exp_avg) == set(expected.exp_avg) and len(carried.exp_avg) > 20
    for key in ("exp_avg", "exp_avg_sq"):
        for name, value in getattr(expected, key).items():
            mine = getattr(carried, key)[name].norm().item()
            assert math.isclose(mine, value.norm().item(), rel_tol=1e-5, abs_tol=1e-12), (key, name)
    train("grow_pretrain", "configs/runs/tiny_lemon.yaml", [*common, "train.steps=4"])
    losses = scalars(out / "tensorboard")["train/loss"]
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert open_checkpoint(out / "checkpoints").optimizer_state().step == SOURCE_STEPS + 4  # not the set-up step


@pytest.mark.slow
def test_optimizer_state_from_a_checkpoint_without_one_is_refused(source_run, tmp_path):
    result = train("grow_pretrain", "configs/runs/tiny_lemon.yaml",
                   [f"output.dir={tmp_path}/grown", f"init.from={source_run}/export", "growth.optimizer_state=true",
                    "train.steps=0"], check=False)
    assert result.returncode == 2
    assert "growth.optimizer_state:" in result.stderr and "holds no optimizer state" in result.stderr


@pytest.mark.slow
def test_grow_cli_writes_the_grown_state_and_pretrain_starts_from_it(source_run, tmp_path, capsys):
    """`scalegrow grow --optimizer-state` writes the grown moments beside the weights (exactly what
    grow_pretrain would carry); `pretrain init.optimizer_state=true` from that output starts with
    them, at the source's loss and step count."""
    grown = tmp_path / "grown"
    assert cli(["grow", "--src", str(source_run / "checkpoints"), "--dst", str(grown), "--method", "lemon", "--target",
                str(ROOT / "configs/models/gpt-tiny-grown.yaml"), "--optimizer-state", "--no-progress"]) == 0
    src, out = open_checkpoint(source_run / "checkpoints"), open_checkpoint(grown)
    op, _ = methods.build_operator("lemon", methods.GROW, src.config, out.config)
    expected, held = moments.grow(op, src.optimizer_state()), out.optimizer_state()
    assert held.step == SOURCE_STEPS and set(held.exp_avg) == set(expected.exp_avg)
    for key in ("exp_avg", "exp_avg_sq"):
        for name, value in getattr(expected, key).items():
            torch.testing.assert_close(getattr(held, key)[name], value, rtol=1e-6, atol=1e-12)
    run = tmp_path / "run"
    train("pretrain", "configs/runs/tiny_scratch.yaml",
          [f"output.dir={run}", f"init.from={grown}", "init.optimizer_state=true", "train.steps=0",
           f"data.corpus={source_run}/data/corpus", f"data.tokenizer={source_run}/data/tokenizer.model"])
    assert abs(scalars(run / "tensorboard")["val/loss"][0] - scalars(source_run / "tensorboard")["val/loss"][
        SOURCE_STEPS]) <= 1e-4
    carried = open_checkpoint(run / "checkpoints").optimizer_state()
    assert carried.step == SOURCE_STEPS
    for name, value in held.exp_avg_sq.items():
        assert math.isclose(carried.exp_avg_sq[name].norm().item(), value.norm().item(), rel_tol=1e-6), name
    capsys.readouterr()
    assert cli(["grow", "--src", str(source_run / "export"), "--dst", str(tmp_path / "none"), "--optimizer-state"]) == 2
    assert "--optimizer-state:" in capsys.readouterr().err and not (tmp_path / "none").exists()
