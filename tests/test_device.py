"""`--device` on grow, shrink, eval and verify: one code path, tested here on the CPU. The calibration
runs each layer over micro-batches of the calibration set; what it measures must not depend on how
the tokens were split."""
import pytest
import torch

from scalegrow.cli import main
from scalegrow.commands import save_model
from scalegrow.core.device import resolve
from scalegrow.errors import InputError
from scalegrow.formats.registry import open_checkpoint
from scalegrow.methods import calibration
from scalegrow.methods.experts import routing_mass
from scalegrow.methods.subclone import calibrate, mlp_output_scales
from scalegrow.operators.subclone import Subclone

from helpers import family_config, random_model

CPU = torch.device("cpu")


def test_the_default_is_a_gpu_when_there_is_one():
    assert resolve(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve("cpu") == CPU


@pytest.mark.parametrize("name, words", [("tpu", "'tpu' is not one of cpu, cuda, cuda:N"), ("cuda:", "not one of")])
def test_an_unknown_device_is_refused_by_name(name, words):
    with pytest.raises(InputError, match=f"^--device: .*{words}"):
        resolve(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["eval", "verify"])
def test_a_gpu_this_machine_lacks_is_refused_with_exit_2(tmp_path, capsys, command):
    cfg = family_config("llama", num_layers=2)
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "m")
    argv = [command, str(tmp_path / "m")] if command == "eval" else [command, "--src", str(tmp_path / "m"),
                                                                      "--dst", str(tmp_path / "m")]
    assert main([*argv, "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert "--device: cuda:1: no CUDA GPU is available here" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 3-layer llama-like MoE checkpoint (every other layer MoE, a shared expert) and 12 windows of 16 tokens."""
    cfg = family_config("llama", num_layers=3, add_bias_linear=False, num_moe_experts=4, moe_router_topk=2,
                        moe_ffn_hidden_size=48, moe_layer_freq=2, moe_shared_expert_intermediate_size=32)
    root = tmp_path_factory.mktemp("device")
    save_model(random_model(cfg, seed=3).state_dict(), cfg, root / "src", tp=1, pp=1)
    tokens = torch.randint(0, cfg.vocab_size, (12, 16), generator=torch.Generator().manual_seed(5))
    return open_checkpoint(root / "src"), tokens


def test_calibration_does_not_depend_on_the_micro_batches(source, monkeypatch):
    reader, tokens = source
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 10**6)  # every window at once
    whole = calibrate(reader, tokens, CPU), routing_mass(reader, tokens, CPU)
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 40)  # two windows at a time
    parts = calibrate(reader, tokens, CPU), routing_mass(reader, tokens, CPU)
    a, b = whole[0], parts[0]
    for x, y in zip(a.input_norms + a.mlp_norms + [a.final_norm], b.input_norms + b.mlp_norms + [b.final_norm]):
        assert torch.allclose(x.mean_abs, y.mean_abs, rtol=1e-5, atol=1e-9)
        assert torch.allclose(x.mean_sq, y.mean_sq, rtol=1e-5, atol=1e-9)
    for x, y in zip(a.heads + a.neurons + list(a.shared.values()), b.heads + b.neurons + list(b.shared.values())):
        assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-9)
    assert a.block_change == pytest.approx(b.block_change, rel=1e-5)
    assert a.neurons[0].shape == (4, 48) and a.neurons[1].shape == (96,) and set(a.shared) == {0, 2}
    assert all(torch.allclose(whole[1][i], parts[1][i], rtol=1e-5) for i in (0, 2))
    assert float(whole[1][0].sum()) == pytest.approx(tokens.numel())  # softmax after top-k: weights sum to 1


def test_rescale_does_not_depend_on_the_micro_batches(source, monkeypatch):
    reader, tokens = source
    target = reader.config.replace(hidden_size=48, ffn_hidden_size=64, moe_ffn_hidden_size=32,
                                   moe_shared_expert_intermediate_size=16, num_attention_heads=2, num_query_groups=1)
    op = Subclone(reader.config, target)
    op.select(calibrate(reader, tokens, CPU))
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 10**6)
    whole = mlp_output_scales(reader, tokens, op.sel, CPU)
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 16)  # one window at a time
    assert mlp_output_scales(reader, tokens, op.sel, CPU) == pytest.approx(whole, rel=1e-5)
    assert all(0.5 < s < 3 and s != 1.0 for s in whole.values())  # neurons were dropped in every layer


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_grow_refuses_a_missing_gpu_before_it_reads_anything(tmp_path, capsys):
    """Even a method with no prepare step: --device names where the command computes, and is checked first."""
    assert main(["grow", "--src", str(tmp_path / "absent"), "--dst", str(tmp_path / "out"), "--target", "t.yaml",
                 "--device", "cuda"]) == 2
    assert "--device: cuda: no CUDA GPU is available here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
