"""Legacy Megatron checkpoint I/O: round trips, file format, safe loading, atomic output."""
import argparse
import os
import zipfile

import pytest
import torch

from scalegrow.commands import save_model
from scalegrow.errors import InputError
from scalegrow.formats.io import atomic_output_dir, safe_load
from scalegrow.formats.megatron import FILE_NAME
from scalegrow.formats.registry import open_checkpoint

from helpers import family_config, random_model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_round_trip_is_bit_identical(tmp_path, family):
    cfg = family_config(family)
    sd = random_model(cfg).state_dict()
    save_model(sd, cfg, tmp_path / "ck", iteration=1200)
    ckpt = open_checkpoint(tmp_path / "ck")
    assert (ckpt.iteration, ckpt.tp, ckpt.pp, ckpt.config) == (1200, 1, 1, cfg)
    assert (tmp_path / "ck/latest_checkpointed_iteration.txt").read_text() == "1200"
    back = ckpt.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_file_is_a_valid_megatron_file(tmp_path):
    cfg = family_config("llama")
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "ck", dtype=torch.bfloat16)
    path = tmp_path / "ck/release/mp_rank_00" / FILE_NAME
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every record's CRC is right (zlib's, patched in after writing)
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "tp2", tp=2)  # shards written from views
    for rank in ("mp_rank_00", "mp_rank_01"):
        with zipfile.ZipFile(tmp_path / "tp2/release" / rank / FILE_NAME) as zf:
            assert zf.testzip() is None
    state = safe_load(path, mmap=False)
    assert state["checkpoint_version"] == 3.0 and "optimizer" not in state
    assert isinstance(state["args"], argparse.Namespace) and state["args"].hidden_size == 64
    assert state["model"]["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    assert state["model"]["decoder.layers.0.mlp.linear_fc1._extra_state"] is None
    assert "output_layer.weight" in state["model"] and "output_layer._extra_state" in state["model"]


def test_tied_pp1_has_no_output_weight(tmp_path):
    cfg = family_config("gpt2")
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "ck")
    model = safe_load(tmp_path / "ck/release/mp_rank_00" / FILE_NAME)["model"]
    assert "output_layer.weight" not in model and "output_layer._extra_state" in model


class Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_object_outside_allow_list_is_refused(tmp_path):
    Boom.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"args": argparse.Namespace(evil=Boom()), "model": {}}, path)
    with pytest.raises(InputError, match="refused to unpickle (posix|os).system: not in the allow-list"):
        safe_load(path)
    assert not Boom.marker.exists()


def test_truncated_file(tmp_path):
    cfg = family_config("gpt2")
    save_model(random_model(cfg).state_dict(), cfg, tmp_path / "ck")
    path = tmp_path / "ck/release/mp_rank_00" / FILE_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"{path}: unreadable or truncated"):
        open_checkpoint(tmp_path / "ck")


def test_atomic_output_dir(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dst) as partial:
            (partial / "half").write_text("x")
            assert partial.name.startswith("out.partial-")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(dst) as partial:
        (partial / "done").write_text("x")
    assert (dst / "done").exists() and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(InputError, match="destination exists"):
        with atomic_output_dir(dst):
            pass
    with atomic_output_dir(dst, overwrite=True) as partial:
        (partial / "new").write_text("y")
    assert sorted(p.name for p in dst.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
