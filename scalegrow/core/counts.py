"""Parameter and FLOP counts of a model, read off its tensor table (`core/arch.py`): what the model
holds is exactly what it counts."""
from __future__ import annotations

import math

from scalegrow.core import arch
from scalegrow.core.config import ModelConfig


def num_parameters(cfg: ModelConfig) -> int:
    """Every weight of the reference model (a tied output layer is the embedding, counted once)."""
    return sum(math.prod(arch.full_shape(cfg, spec)) for _, spec in arch.model_specs(cfg))


def _expert_parameters(cfg: ModelConfig) -> int:
    """One routed expert's weights (biases included)."""
    return sum(math.prod(arch.full_shape(cfg, spec)) for spec in arch.moe_layer_specs(cfg)
               if arch.expert_of(spec.name) is not None and arch.expert_of(spec.name)[0] == 0)


def num_active_parameters(cfg: ModelConfig) -> int:
    """Parameters a token passes through: in an MoE layer the router and only top-k experts."""
    if cfg.moe is None:
        return num_parameters(cfg)
    moe_layers = sum(map(cfg.is_moe_layer, range(cfg.num_layers)))
    return num_parameters(cfg) - moe_layers * (cfg.moe.num_experts - cfg.moe.topk) * _expert_parameters(cfg)


def flops_per_token(cfg: ModelConfig, seq_length: int, training: bool = True) -> float:
    """Matmul FLOPs per token (Kaplan 2020 §2.1): 2 per active weight and attention product; training 3x.
    Lookup tables are no matmuls: learned positions, and the word embeddings when the output layer
    is a matrix of its own."""
    lookups = cfg.hidden_size * ((not cfg.embedding.tied) * cfg.padded_vocab_size
                                 + cfg.embedding.learned_positions * cfg.max_position_embeddings)
    attention = cfg.num_layers * seq_length * cfg.attention.heads * _score_and_value_width(cfg)
    return (6.0 if training else 2.0) * (num_active_parameters(cfg) - lookups + attention)


def _score_and_value_width(cfg: ModelConfig) -> float:
    """Per head, the mean of the q·k and the weights·v widths (both head_dim; MLA's are qk + rope and v)."""
    if cfg.mla is None:
        return cfg.attention.head_dim
    return (cfg.mla.q_head_dim + cfg.mla.v_head_dim) / 2
