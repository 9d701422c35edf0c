"""Shared test helpers: tiny configs, trained-looking weights, hashing."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from scalegrow.core.config import ModelConfig
from scalegrow.core.model import GPT, init_weights

FAMILIES = {
    # GPT-2-like: LayerNorm, GELU, MHA, learned positions, tied, biases
    "gpt2": dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute",
                 untie_embeddings_and_output_weights=False, add_bias_linear=True),
    # LLaMA-like: RMSNorm, SwiGLU, GQA, rope, untied, no biases
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                  untie_embeddings_and_output_weights=True, add_bias_linear=False, num_query_groups=2),
    # the other corners of the product
    "ln-swiglu-gqa-rope-tied-qkvbias": dict(normalization="LayerNorm", swiglu=True, position_embedding_type="rope",
                                           untie_embeddings_and_output_weights=False, add_bias_linear=False,
                                           add_qkv_bias=True, num_query_groups=2),
    "rms-gelu-mha-learned-untied-bias": dict(normalization="RMSNorm", swiglu=False,
                                            position_embedding_type="learned_absolute",
                                            untie_embeddings_and_output_weights=True, add_bias_linear=True),
    # Qwen3-like: a norm over each head's queries and keys (qk_layernorm), tied
    "qwen3": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                  untie_embeddings_and_output_weights=False, add_bias_linear=False, num_query_groups=2,
                  qk_layernorm=True),
    # Qwen2/Gemma-like sliding window (6 keys) on layers 0 and 2 of 3, full attention on layer 1
    "rms-swiglu-gqa-rope-window": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                                       untie_embeddings_and_output_weights=True, add_bias_linear=False,
                                       num_query_groups=2, window_size=[5, 0], window_attn_skip_freq=[1, 0, 1]),
}


# scalegrow.json: one schema for every checkpoint written (grow, shrink, convert, init, training exports)
METADATA_KEYS = {"scalegrow_version", "format", "method", "model", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "layers_per_stage", "iteration", "source", "details", "training"}


def family_config(family: str, **overrides) -> ModelConfig:
    base = dict(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                padded_vocab_size=128, vocab_size=100, max_position_embeddings=64, norm_epsilon=1e-5)
    base.update(FAMILIES[family])
    cfg = ModelConfig.from_dict(base)
    return ModelConfig.from_dict(overrides, base=cfg) if overrides else cfg  # a window list follows num_layers


def random_model(cfg: ModelConfig, seed: int = 0, noise: float = 0.05) -> GPT:
    """Megatron init plus noise on every parameter, so norms and biases are not trivial (and on
    DeepSeek's routing bias, a buffer, enough to change which experts are chosen)."""
    model = GPT(cfg)
    init_weights(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.add_(torch.randn(b.shape, generator=gen) * 0.1)
    return model.eval()


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.padded_vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def tree_sha256(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_yaml(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


def llama_source(root: Path) -> Path:
    """A 4-layer llama-like checkpoint at TP2/PP2 in root/src, and root/t.yaml, a grown target for it
    (6 layers, 2x width): the source of the workers' and ranks' tests."""
    from scalegrow import commands

    cfg = family_config("llama", num_layers=4)
    commands.save_model(random_model(cfg, seed=2).state_dict(), cfg, root / "src", tp=2, pp=2)
    write_yaml(root / "t.yaml", num_layers=6, hidden_size=128, ffn_hidden_size=160, num_attention_heads=8,
               num_query_groups=4)
    return root / "src"


def checkpoint_files(path: Path) -> dict[str, str]:
    """sha256 of every file but scalegrow.json (which records how it was made)."""
    return {k: v for k, v in tree_sha256(path).items() if k != "scalegrow.json"}


def grow_argv(src: Path, dst: Path, *extra: str) -> list[str]:
    """`scalegrow grow` of a `llama_source` to its target, without progress bars."""
    return ["grow", "--src", str(src), "--dst", str(dst), "--target", str(src.parent / "t.yaml"), "--no-progress",
            *extra]
