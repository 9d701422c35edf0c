"""megatron-core's HybridModel layout of a GPT model (megatron-core >= 0.19 deprecates GPTModel for it).

HybridModel gives every sub-block its own layer, named by a `--hybrid-layer-pattern` of symbols:
'*' attention, '-' dense MLP, 'E' MoE MLP, 'M' Mamba, 'G' gated delta net, '+' MLA, 'D' DS-attention,
'|' a pipeline-stage boundary, '/' multi-token-prediction depths after the main pattern. A GPT layer
i, `x + attn(norm(x))` then `x + mlp(norm(x))`, is the hybrid layers 2i ('*') and 2i+1 ('-' or 'E'):
the same function, so a pattern of `*-` (or `*E`) pairs is exactly a GPT model, and only such a
pattern is read here. What moves (megatron-core's `gpt_checkpoint_interop` maps the same way):
- a GPT layer's input norm and attention, `decoder.layers.{i}.self_attention.*` (the norm fused as
  `linear_qkv.layer_norm_weight`), are hybrid layer 2i's; its MLP or MoE (and `pre_mlp_layernorm`),
  hybrid layer 2i+1's;
- `decoder.final_layernorm.*` is `decoder.final_norm.*`;
- torch_dist keys are per hybrid layer (`HybridStack.sharded_state_dict`), never stacked over layers.
"""
from __future__ import annotations

import argparse
import re

from scalegrow.core.layout import Stages
from scalegrow.errors import InputError

ATTENTION, MLP, MOE, PIPE, MTP = "*", "-", "E", "|", "/"
OTHER_SYMBOLS = {"M": "Mamba", "G": "gated delta net", "+": "multi-latent attention", "D": "DS-attention"}
GPT_FINAL_NORM, HYBRID_FINAL_NORM = "decoder.final_layernorm.", "decoder.final_norm."
ATTENTION_PART = ("input_layernorm.", "self_attention.")  # a GPT layer's tensors before its MLP


def pattern_of(args: argparse.Namespace) -> str | None:
    """The hybrid layer pattern Megatron-LM's args carry (`hybrid_override_pattern` before 0.19)."""
    return getattr(args, "hybrid_layer_pattern", None) or getattr(args, "hybrid_override_pattern", None) or None


def gpt_layers(pattern: str) -> int:
    """How many GPT layers a hybrid pattern is; anything but `*-` or `*E` pairs is refused by name
    (ValueError), since no GPT model computes it."""
    if MTP in pattern:
        raise ValueError(f"hybrid_layer_pattern {pattern!r}: multi-token-prediction layers ('/') are not "
                         f"supported")
    main = pattern.replace(PIPE, "")
    for symbol, name in OTHER_SYMBOLS.items():
        if symbol in main:
            raise ValueError(f"hybrid_layer_pattern {pattern!r}: {name} layers ({symbol!r}) are not supported "
                             f"(only attention '*' and MLP '-'/'E' pairs, a GPT model)")
    if not re.fullmatch(r"(\*-)+|(\*E)+", main):
        raise ValueError(f"hybrid_layer_pattern {pattern!r}: not alternating attention and MLP layers "
                         f"('*-' or '*E' pairs), so not a GPT model")
    return len(main) // 2


def stages_of(pattern: str, pp: int) -> Stages:
    """The pipeline split of a hybrid run in GPT layers: by its '|' segments, else even over `pp`."""
    segments = pattern.split(MTP)[0].split(PIPE)
    if len(segments) == 1:
        return Stages.build(gpt_layers(pattern), pp)
    if any(len(s) % 2 for s in segments):
        raise ValueError(f"hybrid_layer_pattern {pattern!r}: a pipeline stage ('|') splits a GPT layer's "
                         f"attention from its MLP")
    return Stages(tuple(len(s) // 2 for s in segments))


def pattern_for(stages: Stages, moe: bool) -> str:
    """The pattern of a GPT model split into `stages`: `*-` per layer, '|' between pipeline stages."""
    pair = ATTENTION + (MOE if moe else MLP)
    return PIPE.join(pair * len(stages.layers(s)) for s in range(stages.pp))


def layer_index(index: int, name: str) -> int:
    """The hybrid layer that holds GPT layer `index`'s tensor `name`."""
    return 2 * index + (0 if name.startswith(ATTENTION_PART) else 1)


def final_norm_key(key: str) -> str:
    """`decoder.final_layernorm.weight` -> `decoder.final_norm.weight`; any other key unchanged."""
    return HYBRID_FINAL_NORM + key[len(GPT_FINAL_NORM):] if key.startswith(GPT_FINAL_NORM) else key


def hybrid_args(args: argparse.Namespace, stages: Stages, moe: bool) -> argparse.Namespace:
    """Megatron-LM args of a HybridModel run of this GPT model: the pattern, and twice the layers."""
    if getattr(args, "window_size", None) is not None and getattr(args, "window_attn_skip_freq", None) is not None:
        raise InputError("window_attn_skip_freq: a sliding window on some layers only is not written in the "
                         "HybridModel layout, whose layer numbers count attention and MLP layers apart; write it "
                         "with --torch-dist-model gpt")
    out = gpt_args(args)
    out.hybrid_layer_pattern = pattern_for(stages, moe)
    out.num_layers = 2 * stages.num_layers
    if stages.pp > 1:  # the '|' segments are the split
        out.decoder_first_pipeline_num_layers = out.decoder_last_pipeline_num_layers = None
    return out


def gpt_args(args: argparse.Namespace) -> argparse.Namespace:
    """The same args without a hybrid pattern (a GPTModel run's)."""
    out = argparse.Namespace(**vars(args))
    for key in ("hybrid_layer_pattern", "hybrid_override_pattern"):
        if hasattr(out, key):
            setattr(out, key, None)
    return out
