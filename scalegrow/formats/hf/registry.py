"""The Hugging Face families by `model_type` (the one place that dispatches on it), and which family
a model's structure implies."""
from __future__ import annotations

from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import (gemma, gpt2, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen2_moe,
                                           qwen3, qwen3_moe)
from scalegrow.formats.hf.family import HFFamily, Unsupported

# In the order a model's structure is matched against them (`infer`): the first that holds it wins.
FAMILIES: dict[str, HFFamily] = {f.model_type: f for f in (
    gpt2.FAMILY, llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mixtral.FAMILY, qwen3_moe.FAMILY, qwen2_moe.FAMILY,
    mistral.FAMILY, phi3.FAMILY, gemma.GEMMA2, gemma.GEMMA3, olmo2.FAMILY,
)}


def get(model_type: str | None, where: str = "model_type") -> HFFamily:
    """A family by its `model_type` (an unknown one is `Unsupported`, naming the valid ones)."""
    if model_type not in FAMILIES:
        raise Unsupported(f"{where}: {model_type!r} is not a family scalegrow reads (valid: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def infer(cfg: ModelConfig) -> HFFamily:
    """The family a model's structure implies: the first that can hold it, else (to name what does
    not fit) the first of those with the fewest mismatches and the model's kind, dense or MoE."""
    kind = [f for f in FAMILIES.values() if f.moe == (cfg.moe is not None)]
    return min(kind, key=lambda f: len(f.problems(cfg)))


def config_from_hf(hf: dict) -> ModelConfig:
    """The model a config.json describes (`Unsupported` naming the key megatron-core would not reproduce)."""
    return get(hf.get("model_type")).to_config(hf)
