"""scalegrow's own torch_dist writer against megatron-core's `dist_checkpointing.save` of the same model
(dense, and MoE with SequentialMLP experts): the same keys, global shapes, dtypes, chunks and byte
items, the same tensor values chunk by chunk, and the same `common.pt` and `metadata.json`; the
reader reads megatron-core's save back tensor for tensor."""
import io
import json
import warnings

import pytest
import torch

from scalegrow.formats.base import MemoryReader
from scalegrow.formats.dcp import read_metadata
from scalegrow.formats.io import safe_load
from scalegrow.formats.options import OutputOptions, TorchDistOptions
from scalegrow.formats.registry import open_checkpoint
from scalegrow.formats.torch_dist import read_common
from scalegrow.operators.identity import Identity
from scalegrow.write.session import write

from helpers import FAMILIES, family_config, random_model

CASES = sorted(FAMILIES) + ["swiglu-with-biases", "moe-qwen3", "moe-mixed-layers", "moe-gpt2-biases",
                            "moe-shared-expert"]
MOE = {"moe-qwen3": ("qwen3", dict(num_moe_experts=4, moe_router_topk=2)),  # every layer: stacked [L, E, ...]
       "moe-mixed-layers": ("llama", dict(num_moe_experts=4, moe_router_topk=2, moe_layer_freq=2)),  # per layer
       "moe-gpt2-biases": ("gpt2", dict(num_moe_experts=2, moe_router_topk=1, moe_router_pre_softmax=True)),
       "moe-shared-expert": ("llama", dict(num_moe_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=80,
                                           moe_shared_expert_gate=True))}


def case_config(case):
    if case == "swiglu-with-biases":  # SwiGLU's fc1 bias goes through megatron's factory too
        return family_config("gpt2", num_layers=2, swiglu=True)
    if case in MOE:
        family, moe = MOE[case]
        return family_config(family, num_layers=3, **moe)
    return family_config(case, num_layers=2)


def megatron_save(mcore, cfg, state_dict, out_dir, args):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    model = mcore.build_gpt(cfg)
    mcore.load_strict(model, state_dict, fill_extra_state=True)
    out_dir.mkdir(parents=True)
    state = {"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0, "iteration": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_checkpointing.save(state, str(out_dir),
                                sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1))


def common_state(iter_dir):
    """The common state (args, iteration) of a torch_dist directory, wherever its layout keeps it."""
    from scalegrow.formats.dcp import ChunkReader

    return read_common(iter_dir, ChunkReader(iter_dir))[0]


def chunks(iter_dir):
    """{(key, offsets): loaded chunk} and {key: (kind, size, dtype)} of a DCP directory."""
    meta = read_metadata(iter_dir / ".metadata")
    items = {k: (type(v).__name__, tuple(getattr(v, "size", ())), getattr(v, "properties", None) and v.properties.dtype)
             for k, v in meta.state_dict_metadata.items()}
    data = {}
    for index, info in meta.storage_data.items():
        with open(iter_dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        offsets = None if index.offset is None else tuple(index.offset)
        data[index.fqn, offsets] = torch.load(io.BytesIO(raw), weights_only=True)
    return items, data


@pytest.mark.parametrize("case", CASES)
def test_writer_matches_megatron_core_save(mcore, tmp_path, case):
    cfg = case_config(case)
    sd = random_model(cfg, seed=4).state_dict()
    ours = tmp_path / "ours"  # in the layout the installed megatron-core saves (common.pt, or inline from 0.19)
    write(MemoryReader.of(sd, cfg, iteration=5), Identity(cfg, cfg), ours,
          OutputOptions(format="torch_dist", torch_dist=TorchDistOptions(mcore.saves_common())), progress=False)
    ours_common = common_state(ours / "iter_0000005")
    theirs = tmp_path / "theirs" / "iter_0000005"
    megatron_save(mcore, cfg, sd, theirs, ours_common["args"])

    our_items, our_data = chunks(ours / "iter_0000005")
    their_items, their_data = chunks(theirs)
    assert our_items == their_items  # keys, kinds (tensor / bytes), global shapes, dtypes
    assert our_data.keys() == their_data.keys()  # every chunk at the same offsets
    for key, value in their_data.items():
        if torch.is_tensor(value):
            assert torch.equal(our_data[key], value), key
        else:
            assert our_data[key] == value, key
    theirs_common = common_state(theirs)
    assert ours_common.keys() == theirs_common.keys()
    assert (ours_common["iteration"], ours_common["checkpoint_version"]) == (5, 3.0)
    assert json.loads((ours / "iter_0000005/metadata.json").read_text()) == \
        json.loads((theirs / "metadata.json").read_text())
    (tmp_path / "theirs/latest_checkpointed_iteration.txt").write_text("5")  # as Megatron-LM's save_checkpoint
    back = open_checkpoint(tmp_path / "theirs").state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_metadata_unpickler_admits_enum_members_and_nothing_else(tmp_path):
    """Some Python versions pickle enum members as getattr(cls, name): DCP's own enums read back, but
    getattr on anything else (the classic way out of an allow-list) is refused."""
    import pickle

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from scalegrow.errors import InputError

    member = tmp_path / "member"  # getattr(_MEM_FORMAT_ENCODING, 'TORCH_CONTIGUOUS_FORMAT'), written by hand
    member.write_bytes(b"cbuiltins\ngetattr\n(ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n"
                       b"S'TORCH_CONTIGUOUS_FORMAT'\ntR.")
    assert read_metadata(member) is _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    escape = tmp_path / "escape"  # getattr(torch.Size, '__class__'): a step towards any class
    escape.write_bytes(b"cbuiltins\ngetattr\n(ctorch\nSize\nS'__class__'\ntR.")
    with pytest.raises(InputError, match="refused to unpickle GLOBAL builtins.getattr of Size.__class__"):
        read_metadata(escape)
    assert pickle.loads(member.read_bytes()) is _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT


def test_common_state_inside_the_distcp_files_as_megatron_core_0_19_saves_it(tmp_path, capsys):
    """megatron-core 0.19 saves no common.pt: the common state is the byte item
    `common_state/shard_0_1` (a one-element list) of the DCP files. scalegrow writes that layout on
    request, reads it, and says which layout a checkpoint has."""
    from scalegrow import cli
    from scalegrow.formats.options import TorchDistOptions

    cfg = family_config("llama", num_layers=2)
    sd = random_model(cfg).state_dict()
    write(MemoryReader.of(sd, cfg, iteration=5), Identity(cfg, cfg), tmp_path / "inline",
          OutputOptions("torch_dist", torch_dist=TorchDistOptions("inline")), progress=False)
    iter_dir = tmp_path / "inline/iter_0000005"
    assert not (iter_dir / "common.pt").exists()
    meta = read_metadata(iter_dir / ".metadata")
    item = next(info for index, info in meta.storage_data.items() if index.fqn == "common_state/shard_0_1")
    with open(iter_dir / item.relative_path, "rb") as f:
        f.seek(item.offset)
        saved = torch.load(io.BytesIO(f.read(item.length)), weights_only=False)
    assert isinstance(saved, list) and len(saved) == 1 and saved[0]["iteration"] == 5
    assert saved[0]["args"].hidden_size == cfg.hidden_size
    reader = open_checkpoint(tmp_path / "inline")
    assert reader.config == cfg and reader.iteration == 5 and reader.common == "inline"
    assert all(torch.equal(reader.state_dict()[k], v) for k, v in sd.items())
    assert cli.main(["inspect", str(tmp_path / "inline"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["common_state"] == "inline"
    assert cli.main(["convert", "--src", str(tmp_path / "inline"), "--dst", str(tmp_path / "file"), "--format",
                     "torch_dist", "--no-progress"]) == 0
    assert (tmp_path / "file/iter_0000005/common.pt").is_file()
    assert open_checkpoint(tmp_path / "file").common == "common.pt"


def test_no_common_state_at_all_is_refused_by_name(tmp_path, capsys):
    from scalegrow import cli

    cfg = family_config("llama", num_layers=2)
    write(MemoryReader.of(random_model(cfg).state_dict(), cfg, iteration=5), Identity(cfg, cfg), tmp_path / "d",
          OutputOptions("torch_dist"), progress=False)
    (tmp_path / "d/iter_0000005/common.pt").unlink()
    assert cli.main(["inspect", str(tmp_path / "d")]) == 2
    assert "no common state: neither common.pt nor a 'common_state/shard_0_1' item" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["torch_dist", "torch_dist-inline", "torch"])
def test_megatron_core_save_grows_into_what_megatron_core_loads_with_the_source_logits(mcore, tmp_path, out):
    """The installed megatron-core's own save (0.19: common state inside the .distcp files) of a model,
    grown by LEMON into torch_dist (either layout; two workers, two data files) and legacy files:
    megatron-core loads each strictly and computes the source's logits."""
    from megatron.core import dist_checkpointing

    from scalegrow.cli import main
    from scalegrow.formats.megatron_args import config_from_args, config_to_args

    from helpers import tokens, write_yaml

    cfg = family_config("llama", num_layers=2)
    small = random_model(cfg, seed=7)
    megatron_save(mcore, cfg, small.state_dict(), tmp_path / "src/iter_0000005", config_to_args(cfg))
    (tmp_path / "src/latest_checkpointed_iteration.txt").write_text("5")
    target = write_yaml(tmp_path / "t.yaml", hidden_size=96, num_attention_heads=6, ffn_hidden_size=150,
                        num_layers=3)
    fmt, *layout = out.split("-")
    if layout and mcore.version() < (0, 19):
        pytest.skip("megatron-core < 0.19 reads the common state from common.pt only")
    extra = ["--torch-dist-common", "inline"] if layout else []
    extra += ["--workers", "2"]  # torch_dist: two data files, each worker's layers
    assert main(["grow", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "big"), "--target", str(target),
                 "--format", fmt, *extra, "--no-progress"]) == 0
    grown = open_checkpoint(tmp_path / "big").config
    model = mcore.build_gpt(grown).eval()
    assert len(list((tmp_path / "big").glob("iter_*/*.distcp"))) == (2 if fmt == "torch_dist" else 0)
    if fmt == "torch":
        state = safe_load(tmp_path / "big/iter_0000005/mp_rank_00/model_optim_rng.pt", mmap=False)
    else:
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(tmp_path / "big/iter_0000005"))
    assert state["iteration"] == 5 and config_from_args(state["args"]) == grown
    mcore.load_strict(model, state["model"])
    x = tokens(cfg, seq=24)
    with torch.no_grad():
        assert (mcore.forward(model, x) - small(x)).abs().max().item() <= 1e-4
