"""Any TP/PP in, any TP/PP out, one streaming pass; torch_dist; megatron-core loads every rank."""
import itertools

import pytest
import torch

from scalegrow.commands import convert, grow, load_model, save_model
from scalegrow.formats.io import safe_load
from scalegrow.formats.megatron import FILE_NAME
from scalegrow.formats.options import LayoutOptions, OutputOptions
from scalegrow.formats.registry import open_checkpoint
from scalegrow.write.session import Topology

from helpers import family_config, random_model, tokens, write_yaml

# (tp, pp, first, last): uneven splits included
SRC_LAYOUTS = [(1, 1, None, None), (2, 1, None, None), (2, 2, None, None), (1, 3, 2, None)]
DST_LAYOUTS = [(1, 1, None, None), (2, 1, None, None), (1, 2, None, None), (2, 2, None, None),
               (1, 3, 1, 3), (4, 1, None, None)]
FAMILIES = {
    "llama": dict(family="llama", num_layers=4),  # GQA + SwiGLU + RMSNorm + rope + untied
    "gpt2": dict(family="gpt2", num_layers=4, make_vocab_size_divisible_by=32),  # LN, GELU, tied, bias
}
TARGET = dict(hidden_size=128, num_attention_heads=8, ffn_hidden_size=192, num_layers=6)


def layout_id(layout):
    tp, pp, first, last = layout
    return f"tp{tp}pp{pp}" + (f"f{first}" if first else "") + (f"l{last}" if last else "")


def make_source(tmp_path, family, layout):
    spec = dict(FAMILIES[family])
    cfg = family_config(spec.pop("family"), **spec)
    model = random_model(cfg, seed=3)
    tp, pp, first, last = layout
    path = tmp_path / f"src-{family}-{layout_id(layout)}"
    save_model(model.state_dict(), cfg, path, tp=tp, pp=pp, first=first, last=last, iteration=300)
    return path, model


def make_target(tmp_path, family):
    groups = {"num_query_groups": 4} if family == "llama" else {}
    return write_yaml(tmp_path / f"target-{family}.yaml", **TARGET, **groups)


def rank_models(path):
    ckpt = open_checkpoint(path)
    return {f.relative_to(ckpt.root): safe_load(f)["model"] for f in ckpt.files()}


def assert_bit_identical(a, b):
    ma, mb = rank_models(a), rank_models(b)
    assert ma.keys() == mb.keys()
    for rank in ma:
        assert list(ma[rank]) == list(mb[rank]), rank
        for key, value in ma[rank].items():
            assert (value is None and mb[rank][key] is None) or torch.equal(value, mb[rank][key]), (rank, key)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("src_layout", SRC_LAYOUTS, ids=layout_id)
def test_grow_any_layout_to_any_layout(tmp_path, family, src_layout):
    """Grow from each source layout straight into each target layout; the merged result is lossless
    and identical whatever the layouts were."""
    src, small = make_source(tmp_path, family, src_layout)
    target = make_target(tmp_path, family)
    x = tokens(small.cfg, seq=24)
    with torch.no_grad():
        expected = small(x)
    reference = None
    for dst_layout in DST_LAYOUTS:
        tp, pp, first, last = dst_layout
        dst = tmp_path / f"dst-{layout_id(dst_layout)}"
        grow(src, dst, "lemon", target, OutputOptions(layout=LayoutOptions(tp, pp, first, last)), progress=False)
        ckpt = open_checkpoint(dst)
        assert (ckpt.tp, ckpt.pp) == (tp, pp)
        if first:
            assert ckpt.layout.stages.layers_per_stage[0] == first and ckpt.layout.stages.layers_per_stage[-1] == last
        big = load_model(dst)
        with torch.no_grad():
            got = big(x)[..., : small.cfg.padded_vocab_size]
        assert (got - expected).abs().max().item() <= 1e-4, dst_layout
        sd = {k: v for k, v in big.state_dict().items() if "word_embeddings" not in k and "output_layer" not in k}
        if reference is None:
            reference = sd
        else:  # the grown tensors do not depend on either layout
            assert all(torch.equal(sd[k], reference[k]) for k in reference)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("a,b", [(SRC_LAYOUTS[2], (1, 3, 1, 2)), (SRC_LAYOUTS[3], DST_LAYOUTS[1]),
                                 (SRC_LAYOUTS[0], DST_LAYOUTS[3])],
                         ids=lambda layout: layout_id(layout))
def test_round_trip_is_bit_identical(tmp_path, family, a, b):
    src, _ = make_source(tmp_path, family, a)
    tp, pp, first, last = b
    convert(src, tmp_path / "b", OutputOptions(layout=LayoutOptions(tp, pp, first, last)), progress=False)
    tp, pp, first, last = a
    convert(tmp_path / "b", tmp_path / "a", OutputOptions(layout=LayoutOptions(tp, pp, first, last)), progress=False)
    assert_bit_identical(src, tmp_path / "a")


def test_torch_dist_round_trip(tmp_path):
    src, small = make_source(tmp_path, "llama", SRC_LAYOUTS[2])
    convert(src, tmp_path / "dist", OutputOptions(format="torch_dist"), progress=False)
    ckpt = open_checkpoint(tmp_path / "dist")
    assert ckpt.format == "torch_dist" and (ckpt.tp, ckpt.pp, ckpt.iteration) == (2, 2, 300)
    assert (tmp_path / "dist/iter_0000300/common.pt").is_file()
    assert (tmp_path / "dist/iter_0000300/metadata.json").is_file()
    convert(tmp_path / "dist", tmp_path / "back", progress=False)
    assert_bit_identical(src, tmp_path / "back")


def test_torch_dist_grow_reads_and_writes(tmp_path):
    src, small = make_source(tmp_path, "gpt2", SRC_LAYOUTS[0])
    convert(src, tmp_path / "dist", OutputOptions(format="torch_dist"), progress=False)
    grow(tmp_path / "dist", tmp_path / "big", "lemon", make_target(tmp_path, "gpt2"),
         OutputOptions(format="torch_dist"), progress=False)
    x = tokens(small.cfg)
    with torch.no_grad():
        assert (load_model(tmp_path / "big")(x) - small(x)).abs().max() <= 1e-4


def test_te_spelling_is_read_as_alias(tmp_path):
    src, small = make_source(tmp_path, "llama", SRC_LAYOUTS[0])
    path = src / "iter_0000300/mp_rank_00" / FILE_NAME
    state = safe_load(path, mmap=False)
    renamed = {}
    for key, value in state["model"].items():
        key = key.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        renamed[key.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")] = value
    state["model"] = renamed
    torch.save(state, path)
    x = tokens(small.cfg)
    with torch.no_grad():
        assert torch.equal(load_model(src)(x), small(x))


def test_tied_pp_stores_output_copy(tmp_path):
    src, small = make_source(tmp_path, "gpt2", SRC_LAYOUTS[2])
    last = safe_load(src / "iter_0000300/mp_rank_01_001" / FILE_NAME)["model"]
    first = safe_load(src / "iter_0000300/mp_rank_01_000" / FILE_NAME)["model"]
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])


def test_release_directory(tmp_path):
    cfg = family_config("gpt2")
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "rel", tp=2)
    assert (tmp_path / "rel/latest_checkpointed_iteration.txt").read_text() == "release"
    ckpt = open_checkpoint(tmp_path / "rel")
    assert ckpt.iteration == "release" and ckpt.tp == 2
    assert open_checkpoint(tmp_path / "rel/release").tp == 2  # the iteration dir itself works too


@pytest.mark.slow
@pytest.mark.parametrize("dst_layout", [(2, 1, None, None), (1, 3, 1, 3), (2, 2, None, None)], ids=layout_id)
def test_megatron_core_loads_every_rank(mcore, tmp_path, dst_layout):
    """megatron-core's GPTModel at the target TP/PP (gloo ranks, pipeline chained by hand) loads every
    rank strictly, and its logits equal the small source model's."""
    tp, pp, first, last = dst_layout
    jobs, expected = [], []
    for family, src_layout in itertools.product(sorted(FAMILIES), [SRC_LAYOUTS[0], SRC_LAYOUTS[2]]):
        src, small = make_source(tmp_path, family, src_layout)
        dst = tmp_path / f"dst-{family}-{layout_id(src_layout)}"
        grow(src, dst, "lemon", make_target(tmp_path, family), OutputOptions(layout=LayoutOptions(tp, pp, first, last)), progress=False)
        x = tokens(small.cfg, seq=16, seed=len(jobs))
        torch.save(x, tmp_path / f"tokens{len(jobs)}.pt")
        jobs.append(dict(path=str(dst), format="torch", config=open_checkpoint(dst).config.to_dict(),
                         tokens=str(tmp_path / f"tokens{len(jobs)}.pt")))
        with torch.no_grad():
            expected.append(small(x))
    if dst_layout == (2, 2, None, None):  # torch_dist, resharded by megatron-core itself on load
        for workers in (1, 3):  # written by one process, and by three (each its layers, its own .distcp file)
            dist = tmp_path / f"dist{workers}"
            convert(jobs[-1]["path"], dist, OutputOptions(format="torch_dist"), progress=False,
                    topology=Topology(workers=workers))
            assert len(list(dist.glob("iter_*/*.distcp"))) == workers
            jobs.append(dict(jobs[-1], path=str(dist), format="torch_dist"))
            expected.append(expected[-1])
    results = mcore.run_megatron_check(tp, pp, jobs, tmp_path, first=first, last=last)
    for got, want in zip(results, expected):
        got = got[..., : want.shape[-1]]
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4


def test_megatron_core_loads_torch_dist_single_process(mcore, tmp_path):
    """`dist_checkpointing.load` in this process, into megatron-core's own sharded state dict."""
    from megatron.core import dist_checkpointing

    src, small = make_source(tmp_path, "llama", SRC_LAYOUTS[0])
    convert(src, tmp_path / "dist", OutputOptions(format="torch_dist"), progress=False)
    model = mcore.build_gpt(small.cfg).eval()
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(tmp_path / "dist/iter_0000300"))
    assert (loaded["iteration"], loaded["args"].hidden_size) == (300, small.cfg.hidden_size)
    mcore.load_strict(model, loaded["model"])
    x = tokens(small.cfg, seq=16)
    with torch.no_grad():
        assert (mcore.forward(model, x) - small(x)).abs().max().item() <= 1e-5
