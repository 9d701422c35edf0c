"""Real pretrained weights (tests/real_weights.py): Gemma 3 270M from the package registry,
dequantised by transformers: scalegrow reads it exactly as transformers does, grows it losslessly and
shrinks it to half width better than the unranked baseline."""
from __future__ import annotations

import json

import pytest
import torch

from scalegrow import commands
from scalegrow.formats.options import OutputOptions
from scalegrow.write.session import Topology

from helpers import write_yaml
from hf_models import logits
from real_weights import gemma3_270m, gpl3_text, license_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    return gemma3_270m()


def test_gemma3_270m_scores_what_it_should_on_english_text(gemma3):
    """transformers on the dequantised weights: 2.56 nats a token over the first 512 tokens of the GPL."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32).eval()
    ids = transformers.AutoTokenizer.from_pretrained(gemma3)(gpl3_text(), return_tensors="pt").input_ids[:, :512]
    assert ids.shape == (1, 512) and model.config.num_hidden_layers == 18 and model.config.vocab_size == 262144
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss == pytest.approx(2.560, abs=0.01)


def test_scalegrow_reads_gemma3_270m_as_transformers_does(gemma3):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32).eval()
    ids = english_windows(gemma3, gpl3_text(), 1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, commands.load_model(gemma3)(ids))


def test_lemon_grows_gemma3_270m_wider_and_deeper_losslessly(gemma3, tmp_path):
    """640 -> 768 wide (a residue for the zero-centred norms), 4 -> 8 heads in 2 groups, FFN 2048 -> 2560,
    18 -> 24 layers, written by two workers (each its own layers, into the same safetensors shards):
    transformers computes the source's logits to 1e-5 of their scale (BENCHMARKS)."""
    target = write_yaml(tmp_path / "t.yaml", num_layers=24, hidden_size=768, ffn_hidden_size=2560,
                        num_attention_heads=8, num_query_groups=2)
    commands.grow(gemma3, tmp_path / "big", "lemon", target, OutputOptions(format="hf"), progress=False,
                  topology=Topology(workers=2))
    ids = english_windows(gemma3, gpl3_text(), 1)
    small, big = logits(gemma3, ids), logits(tmp_path / "big", ids)
    assert (small - big).abs().max() <= 1e-5 * small.abs().max()
    layer_types = json.loads((tmp_path / "big" / "config.json").read_text())["layer_types"]
    assert layer_types.count("full_attention") == 4  # each global layer and the copies of those


def test_subclone_to_half_width_beats_drop_layers_on_held_out_english(gemma3, tmp_path):
    """Calibrated on four licence texts, scored on four others: subcloning's selection keeps far more
    of the model than the first dimensions, heads and neurons do (8.76 against 14.30 nats; BENCHMARKS)."""
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n\n".join(license_text(n) for n in ("GPL-3", "GFDL-1.3", "MPL-2.0", "LGPL-2.1")))
    held_out = english_windows(gemma3, "\n\n".join(license_text(n) for n in ("Apache-2.0", "Artistic", "CC0-1.0",
                                                                              "BSD")), 4)
    half = write_yaml(tmp_path / "half.yaml", hidden_size=320, ffn_hidden_size=1024, num_attention_heads=2,
                      num_query_groups=1)
    data = commands.DataOptions(data=str(calibration), seq_length=512)
    losses = {}
    for method in ("subclone", "drop-layers"):
        commands.shrink(gemma3, tmp_path / method, method, half, OutputOptions(format="hf"), data=data,
                        progress=False)
        losses[method] = lm_loss(tmp_path / method, held_out)
    assert losses["subclone"] < 9.5 and losses["drop-layers"] > 13.0, losses


def english_windows(model_dir, text: str, windows: int) -> torch.Tensor:
    """The first `windows` windows of 512 tokens of `text` under the model's tokenizer, [windows, 512]."""
    import transformers

    ids = transformers.AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt").input_ids
    assert ids.shape[1] >= 512 * windows
    return ids[:, :512 * windows].reshape(windows, 512)


def lm_loss(model_dir, ids: torch.Tensor) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()
