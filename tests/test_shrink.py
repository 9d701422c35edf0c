"""`scalegrow shrink`: weight subcloning and the drop-layers baseline, from a trained sharded model."""
import json
import shutil

import pytest
import torch
import yaml

from scalegrow.cli import main as cli
from scalegrow.commands import DataOptions, evaluate, load_model, save_model, shrink
from scalegrow.core.config import ModelConfig
from scalegrow.core.counts import num_parameters
from scalegrow.core.model import GPT, init_weights
from scalegrow.data import (
    BatchOrder,
    TokenStream,
    batch,
    build_indexed,
    embedded_documents,
    load_tokenizer,
    train_tokenizer,
)
from scalegrow.formats.options import LayoutOptions, OutputOptions
from scalegrow.formats.registry import open_checkpoint
from scalegrow.methods.subclone import SubcloneOptions

from helpers import write_yaml

WIDTH_AND_DEPTH = dict(num_layers=2, hidden_size=64, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=176)
WIDTH = dict(hidden_size=64, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=176)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """gpt-tiny (4 layers, hidden 128, GQA 4/2, SwiGLU, RMSNorm, rope) trained for 250 steps on the
    embedded corpus, saved at TP2/PP2 with its tokenizer; the corpus's held-out split is for eval."""
    root = tmp_path_factory.mktemp("shrink")
    docs = list(embedded_documents(1_000_000))
    tok = train_tokenizer(docs, root / "tokenizer", vocab_size=512)
    build_indexed(docs, load_tokenizer(tok), root / "corpus", 0.05)
    cfg = ModelConfig.from_yaml("configs/models/gpt-tiny.yaml").replace(vocab_size=512, max_position_embeddings=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    init_weights(model, 0)
    stream = TokenStream(root / "corpus_train", 64)
    order = BatchOrder(stream.num_samples, 16, 1, 1, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(250):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 10)
        loss = model.loss(batch(stream, order.samples(step, 0, 0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model.state_dict(), cfg, root / "big", tp=2, pp=2)
    shutil.copy(tok, root / "big" / "tokenizer.model")
    return root


def shrunk(big, tmp_path, name, target, method="subclone", rescale=True, layout=OutputOptions(layout=LayoutOptions(tp=1, pp=1)), src=None):
    out, src = tmp_path / name, src or big / "big"
    options = SubcloneOptions(tokens=8192, rescale=rescale) if method == "subclone" else None
    shrink(src, out, method, write_yaml(tmp_path / f"{name}.yaml", **target), layout, options,
           DataOptions(data=str(big / "corpus")), progress=False)
    assert (out / "tokenizer.model").read_bytes() == (big / "big" / "tokenizer.model").read_bytes()  # it travels
    return out


def loss(big, path) -> float:
    return evaluate(path, str(big / "corpus"), tokens=16384)["loss"]


def random_init_loss(big, tmp_path, target) -> float:
    cfg = ModelConfig.from_dict(target, base=open_checkpoint(big / "big").config)
    model = GPT(cfg)
    init_weights(model, 1)
    save_model(model.state_dict(), cfg, tmp_path / "random")
    shutil.copy(big / "big" / "tokenizer.model", tmp_path / "random" / "tokenizer.model")
    return loss(big, tmp_path / "random")


def test_target_equal_to_source_is_exact(big, tmp_path):
    out = shrunk(big, tmp_path, "same", dict(num_layers=4))
    a, b = load_model(big / "big").state_dict(), load_model(out).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "scalegrow.json").read_text())["details"]["kept_layers"] == [0, 1, 2, 3]


def test_width_only_and_depth_only(big, tmp_path):
    width = shrunk(big, tmp_path, "width", WIDTH)
    assert load_model(width).cfg == ModelConfig.from_dict(WIDTH, base=open_checkpoint(big / "big").config)
    depth = shrunk(big, tmp_path, "depth", dict(num_layers=2))
    meta = json.loads((depth / "scalegrow.json").read_text())["details"]
    assert meta["kept_layers"][0] == 0 and meta["kept_layers"][-1] == 3  # the middle goes first
    assert meta["mlp_output_scales"] == {"0": 1.0, "1": 1.0}  # no neuron dropped: nothing to rescale
    random = random_init_loss(big, tmp_path, WIDTH)
    assert loss(big, width) < random - 1.0 and loss(big, depth) < random - 1.0


def test_subclone_beats_random_init_and_drop_layers(big, tmp_path):
    subclone = loss(big, shrunk(big, tmp_path, "sub", WIDTH_AND_DEPTH))
    drop = loss(big, shrunk(big, tmp_path, "drop", WIDTH_AND_DEPTH, method="drop-layers"))
    random = random_init_loss(big, tmp_path, WIDTH_AND_DEPTH)
    assert subclone < drop < random
    assert subclone < random - 1.5, (subclone, drop, random)


def test_rescale_helps(big, tmp_path):
    """The MLP-output rescale (least squares over the dropped neurons) lowers the loss."""
    with_rescale = loss(big, shrunk(big, tmp_path, "rescaled", WIDTH))
    without = loss(big, shrunk(big, tmp_path, "plain", WIDTH, rescale=False))
    assert with_rescale < without, (with_rescale, without)


def test_subclone_shrinks_an_upcycled_moe(big, tmp_path):
    """The trained model upcycled to 4 experts (top-2, noise so they differ), then subcloned: the
    same shape is exact; at half width (every expert's neurons 352 -> 176, ranked per expert over its
    routed tokens, the router's columns of the kept dimensions) it beats drop-layers, and the
    fitted rescale of every expert's fc2 lowers the loss further."""
    from scalegrow.commands import grow
    from scalegrow.methods import registry as methods

    moe = tmp_path / "moe"
    grow(big / "big", moe, "upcycle", write_yaml(tmp_path / "moe.yaml", num_moe_experts=4, moe_router_topk=2),
         OutputOptions(layout=LayoutOptions(tp=1, pp=1)), progress=False, options=methods.options_with("upcycle", methods.GROW, noise=0.02))
    same = shrunk(big, tmp_path, "same", dict(num_layers=4), src=moe)
    a, b = load_model(moe).state_dict(), load_model(same).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    target = dict(WIDTH, moe_ffn_hidden_size=176)
    sub = shrunk(big, tmp_path, "sub", target, src=moe)
    assert load_model(sub).cfg.moe.ffn_hidden_size == 176 and load_model(sub).cfg.moe.num_experts == 4
    plain = loss(big, shrunk(big, tmp_path, "plain", target, rescale=False, src=moe))
    drop = loss(big, shrunk(big, tmp_path, "drop", target, method="drop-layers", src=moe))
    print("moe subclone/plain/drop-layers held-out loss:", loss(big, sub), plain, drop)
    assert loss(big, sub) < plain < drop, (loss(big, sub), plain, drop)


@pytest.mark.slow
def test_megatron_core_loads_the_shrunk_model_at_tp2(big, tmp_path, mcore):
    two_groups = dict(WIDTH_AND_DEPTH, num_query_groups=2)  # whole KV groups per TP rank
    out = shrunk(big, tmp_path, "tp2", two_groups, layout=OutputOptions(layout=LayoutOptions(tp=2, pp=1)))
    ckpt = open_checkpoint(out)
    assert (ckpt.tp, ckpt.pp) == (2, 1)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "tokens.pt")
    job = dict(path=str(out), format="torch", config=ckpt.config.to_dict(), tokens=str(tmp_path / "tokens.pt"))
    (got,) = mcore.run_megatron_check(2, 1, [job], tmp_path)
    with torch.no_grad():
        want = load_model(out)(x)
    assert (got - want).abs().max().item() <= 1e-5


def test_cli_shrink_and_bad_targets(big, tmp_path, capsys):
    target = write_yaml(tmp_path / "t.yaml", **WIDTH_AND_DEPTH)
    base = ["shrink", "--src", str(big / "big"), "--calib-data", str(big / "corpus"), "--calib-tokens", "4096",
            "--device", "cpu", "--no-progress"]
    assert cli(base + ["--dst", str(tmp_path / "ok"), "--target", str(target), "--tp", "1", "--pp", "2"]) == 0
    assert open_checkpoint(tmp_path / "ok").pp == 2
    capsys.readouterr()
    cases = [
        (dict(hidden_size=256, num_attention_heads=8, num_query_groups=4), "hidden_size: target 256 is larger than "
                                                                          "source 128; shrink only shrinks"),
        (dict(hidden_size=64, num_attention_heads=3), "num_attention_heads: 3 does not divide hidden_size 64"),
        (dict(num_attention_heads=4, num_query_groups=1), "num_attention_heads: target has 4 q heads per group"),
    ]
    for i, (bad, message) in enumerate(cases):
        path = write_yaml(tmp_path / f"bad{i}.yaml", **bad)
        assert cli(base + ["--dst", str(tmp_path / f"bad{i}"), "--target", str(path), "--tp", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / f"bad{i}").exists()
    assert cli(base + ["--dst", str(tmp_path / "m"), "--target", str(target), "--method", "prune"]) == 2
    assert "unknown shrink method 'prune' (valid: drop-layers, prune-experts, subclone)" in capsys.readouterr().err
    (tmp_path / "notok").mkdir()
    save_model(load_model(big / "big").state_dict(), open_checkpoint(big / "big").config, tmp_path / "notok" / "ck")
    assert cli(["shrink", "--src", str(tmp_path / "notok" / "ck"), "--dst", str(tmp_path / "x"), "--target",
                str(target), "--no-progress"]) == 2
    assert "ships no tokenizer (tokenizer.model or tokenizer.json)" in capsys.readouterr().err


def test_shrink_to_a_parameter_budget(big, tmp_path, capsys):
    """--params 0.5: every layer kept, the width narrowed to fit; the choice printed and recorded."""
    assert cli(["shrink", "--src", str(big / "big"), "--dst", str(tmp_path / "half"), "--params", "0.5",
                "--calib-data", str(big / "corpus"), "--calib-tokens", "4096", "--tp", "1", "--pp", "1",
                "--no-progress"]) == 0
    out = capsys.readouterr().out
    got = load_model(tmp_path / "half").cfg
    source = open_checkpoint(big / "big").config
    assert got.num_layers == source.num_layers and num_parameters(got) <= num_parameters(source) // 2
    assert f"shrink --params 0.5: {num_parameters(got) / 1e6:.2f}M params, num_layers=4 " in out
    record = json.loads((tmp_path / "half" / "scalegrow.json").read_text())["details"]["budget"]
    assert record["chose"]["hidden_size"] == got.hidden_size and record["params"] == num_parameters(source) // 2
    assert loss(big, tmp_path / "half") < random_init_loss(big, tmp_path, record["chose"])


def test_cli_eval(big, capsys):
    assert cli(["eval", str(big / "big"), "--data", str(big / "corpus"), "--tokens", "2048", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 2048 and 2.0 < result["loss"] < 5.0  # 16 windows of 128 (max positions)
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    assert yaml.safe_load(open("configs/models/gpt-tiny.yaml"))["num_layers"] == 4
