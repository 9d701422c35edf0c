"""LiGO: identity init is exact, the operator is O(width² + depth²), materialised weights equal the
functional model, the LM loss falls, ZeRO-3 on 2 ranks trains the same operator as 1 rank, and
megatron-core loads what it writes."""
import json
import shutil

import pytest
import torch

from scalegrow.cli import main as cli
from scalegrow.commands import load_model, save_model
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
from scalegrow.formats.io import safe_load
from scalegrow.formats.megatron_args import config_from_args
from scalegrow.methods.ligo import LigoModel
from scalegrow.operators.ligo import LigoGrowth, LigoOperator, identity_like
from scalegrow.write.executor import apply

from helpers import family_config, random_model, tokens, write_yaml

TARGETS = {"llama": dict(hidden_size=96, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=144, num_layers=5),
           "gpt2": dict(hidden_size=128, num_attention_heads=8, ffn_hidden_size=200, num_layers=4),
           "qwen3": dict(hidden_size=96, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=144, num_layers=5)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_operator_reproduces_the_source(family):
    cfg = family_config(family)
    small = random_model(cfg)
    op = identity_like(cfg)
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(LigoModel(op, small.state_dict())(x), small(x))
        grown = apply(LigoGrowth(cfg, cfg, operator=op), small.state_dict())
    assert all(torch.equal(grown[k], v) for k, v in small.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_materialised_weights_equal_the_functional_model(family):
    src = family_config(family)
    dst = ModelConfig.from_dict(TARGETS[family], base=src)
    small = random_model(src)
    op = LigoOperator(src, dst, width_noise=0.05, depth_noise=0.1, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in op.parameters():  # a "trained" operator: far from its init
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        functional = LigoModel(op, small.state_dict())(tokens(src))
    big = GPT(dst).eval()
    big.load_state_dict(apply(LigoGrowth(src, dst, operator=op), small.state_dict()), strict=True)
    with torch.no_grad():  # fp32 rounding only: the same sums in another order (per layer vs batched);
        diff = (big(tokens(src)) - functional).abs().max()  # at most 3e-6 of the logit scale over 40 seeds
    assert diff <= 2e-5 * functional.abs().max()


def test_operator_is_width_squared_plus_depth_squared():
    src, dst = family_config("llama"), ModelConfig.from_dict(TARGETS["llama"], base=family_config("llama"))
    op = LigoOperator(src, dst)
    count = sum(p.numel() for p in op.parameters())
    # B_emb, group map, within-group head map, FFN map, 6 depth matrices
    assert count == 96 * 64 + 3 * 2 + 2 * 2 + 144 * 96 + 6 * 5 * 3 == LigoOperator.expected_parameters(src, dst)
    assert count < num_parameters(dst) / 10
    # at real sizes, on the meta device: 8B-shaped -> 70B-shaped
    from test_plan import DST_70B, SRC_8B

    with torch.device("meta"):
        big = LigoOperator(SRC_8B, DST_70B)
    n = sum(p.numel() for p in big.parameters())
    assert n == 8192 * 4096 + 8 * 8 + 8 * 4 + 28672 * 14336 + 6 * 80 * 32
    assert n < num_parameters(DST_70B) / 100


@pytest.fixture(scope="module")
def trained_small(tmp_path_factory):
    """A tiny LLaMA-style model trained for a few steps on the embedded corpus, with its tokenizer."""
    root = tmp_path_factory.mktemp("ligo")
    docs = list(embedded_documents(400_000))
    tok = train_tokenizer(docs, root / "tokenizer", vocab_size=512)
    build_indexed(docs, load_tokenizer(tok), root / "corpus", 0.05)
    cfg = family_config("llama", num_layers=2, padded_vocab_size=512, vocab_size=512, max_position_embeddings=128)
    model = GPT(cfg)
    init_weights(model, 0)
    stream = TokenStream(root / "corpus_train", 64)
    order = BatchOrder(stream.num_samples, 16, 1, 1, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        loss = model.loss(batch(stream, order.samples(step, 0, 0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model.state_dict(), cfg, root / "small", iteration=60)
    shutil.copy(tok, root / "small" / "tokenizer.model")
    return root


def test_cli_ligo_loss_falls_and_megatron_core_loads_it(trained_small, tmp_path, mcore, capsys):
    target = write_yaml(tmp_path / "t.yaml", **TARGETS["llama"])
    assert cli(["grow", "--method", "ligo", "--src", str(trained_small / "small"), "--dst", str(tmp_path / "big"),
                "--target", str(target), "--steps", "25", "--lr", "3e-3", "--data", str(trained_small / "corpus"),
                "--device", "cpu", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "big/scalegrow.json").read_text())
    ligo = meta["details"]["ligo"]
    assert meta["method"] == "ligo" and ligo["steps"] == 25
    assert ligo["loss_last"] < ligo["loss_first"] - 0.3, ligo
    state = safe_load(tmp_path / "big/iter_0000060/mp_rank_00/model_optim_rng.pt", mmap=False)
    cfg = config_from_args(state["args"])
    theirs = mcore.build_gpt(cfg).eval()
    mcore.load_strict(theirs, state["model"])
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (mcore.forward(theirs, x) - load_model(tmp_path / "big")(x)).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_zero3_on_two_ranks_trains_the_same_operator_as_one_rank(trained_small, tmp_path):
    """The same global batch (1 rank × 2 accumulation steps vs 2 ranks under ZeRO-3, whose operator
    parameters are partitioned) gives the same operator after 4 steps."""
    from training import scalars, train

    common = [f"init.from={trained_small}/small", f"data.corpus={trained_small}/corpus",
              f"data.tokenizer={trained_small}/small/tokenizer.model", "data.seq_length=64", "train.steps=0",
              "train.micro_batch_size=4", "growth.ligo.steps=4", "growth.ligo.lr=3e-3",
              "growth.target={hidden_size: 96, num_attention_heads: 6, num_query_groups: 3, "
              "ffn_hidden_size: 144, num_layers: 3}"]
    train("grow_pretrain", "configs/runs/tiny_ligo.yaml", [f"output.dir={tmp_path}/one", "deepspeed.zero_stage=1",
                                                           "train.gradient_accumulation_steps=2", *common], ranks=1)
    train("grow_pretrain", "configs/runs/tiny_ligo.yaml", [f"output.dir={tmp_path}/two", "deepspeed.zero_stage=3",
                                                           *common], ranks=2)
    one = torch.load(tmp_path / "one/ligo/operator.pt")
    two = torch.load(tmp_path / "two/ligo/operator.pt")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key
    s1, s2 = scalars(tmp_path / "one/tensorboard"), scalars(tmp_path / "two/tensorboard")
    assert sorted(s2["ligo/loss"]) == [1, 2, 3, 4] and sorted(s2["ligo/lr"]) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert s1["ligo/loss"][step] == pytest.approx(s2["ligo/loss"][step], abs=1e-4)
    assert s2["val/loss"][0] > 0  # the materialised model was evaluated at step 0, then exported
    assert load_model(tmp_path / "two/export").cfg.hidden_size == 96
