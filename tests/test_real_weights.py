"""Real pretrained weights (tests/real_weights.py): Gemma 3 270M from the package registry,
dequantised by transformers. scalegrow does not read the Gemma family yet (issue 25 continues):
until it does, it refuses the model by name and changes nothing."""
from __future__ import annotations

import pytest
import torch

from scalegrow import cli

from helpers import tree_sha256
from real_weights import gemma3_270m, gpl3_text

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


def test_scalegrow_refuses_gemma3_by_name_and_changes_nothing(gemma3, tmp_path, capsys):
    before = tree_sha256(gemma3)
    assert cli.main(["convert", "--src", str(gemma3), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_type: 'gemma3_text' is not a family scalegrow reads" in err and len(err.strip().splitlines()) == 1
    assert tree_sha256(gemma3) == before and not (tmp_path / "out").exists()
