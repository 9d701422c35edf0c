"""The Hugging Face families by `model_type` (the one place that dispatches on it), and which family
a model's structure implies."""
from __future__ import annotations

from scalegrow.core.config import ModelConfig
from scalegrow.formats.hf.families import (deepseek, deepseek_v2, gemma, gpt2, llama, mistral, mixtral, olmo2,
                                           phi3, qwen2, qwen2_moe, qwen3, qwen3_moe)
from scalegrow.formats.hf.family import HFFamily, Unsupported

# In the order a model's structure is matched against them (`infer`): the first that holds it wins.
FAMILIES: dict[str, HFFamily] = {f.model_type: f for f in (
    gpt2.FAMILY, llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mixtral.FAMILY, qwen3_moe.FAMILY, qwen2_moe.FAMILY,
    mistral.FAMILY, phi3.FAMILY, gemma.GEMMA2, gemma.GEMMA3, olmo2.FAMILY, deepseek.FAMILY, deepseek_v2.FAMILY,
)}


def get(model_type: str | None, where: str = "model_type") -> HFFamily:
    """A family by its `model_type` (an unknown one is `Unsupported`, naming the valid ones and, for
    the families users ask for most, what is missing)."""
    if model_type not in FAMILIES:
        why = f": {NOT_YET[model_type]}" if model_type in NOT_YET else ""
        raise Unsupported(f"{where}: {model_type!r} is not a family scalegrow reads{why} "
                          f"(valid: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


# Families asked for that are not read yet, and why (each a step of the open issues)
NOT_YET = {
    "gemma3": "Gemma 3's multimodal checkpoint holds its text model in text_config beside a vision tower; "
              "only the text model's own checkpoint (gemma3_text: Gemma 3 270M, 1B) is read",
    "gemma": "Gemma 1 is not read yet (Gemma 2 and 3 are)",
    "olmo3": "OLMo 3's sliding windows on OLMo 2's block are not read yet (OLMo 2 is)",
}


def infer(cfg: ModelConfig) -> HFFamily:
    """The family a model's structure implies: the first that can hold it, else (to name what does
    not fit) the first of those with the fewest mismatches and the model's kind, dense or MoE."""
    kind = [f for f in FAMILIES.values() if f.moe == (cfg.moe is not None)]
    return min(kind, key=lambda f: len(f.problems(cfg)))


def config_from_hf(hf: dict) -> ModelConfig:
    """The model a config.json describes (`Unsupported` naming the key megatron-core would not reproduce)."""
    return get(hf.get("model_type")).to_config(hf)
