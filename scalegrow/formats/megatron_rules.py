"""The rules Megatron-LM checkpoints follow, shared by the legacy `torch` format and `torch_dist`:
directory names, which tensors a pipeline stage stores, the vocabulary padding, the args a written
checkpoint carries, and which bytes it needs."""
from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

import torch

from scalegrow.core import arch, sharding
from scalegrow.core.arch import TensorSpec
from scalegrow.core.config import ModelConfig
from scalegrow.core.layout import Layout, Stages
from scalegrow.core.rope_config import yarn_mscale
from scalegrow.errors import InputError
from scalegrow.formats import hybrid
from scalegrow.formats.base import nbytes
from scalegrow.formats.megatron_args import config_to_args

TRACKER = "latest_checkpointed_iteration.txt"
FILE_NAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """`mp_rank_TT`, `_PPP` when PP > 1, `_EEE` when EP > 1 (Megatron-LM's get_checkpoint_name)."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name + (f"_{ep_rank:03d}" if ep > 1 else "")


def expert_owner(cfg: ModelConfig, ep: int, key: str) -> tuple[int, int] | None:
    """(EP rank, its local expert index) that stores an expert tensor; None for every other tensor."""
    parsed = arch.split_layer_key(key)
    expert = arch.expert_of(parsed[1]) if parsed else None
    if expert is None:
        return None
    return divmod(expert[0], cfg.moe.num_experts // ep)


def file_specs(cfg: ModelConfig, layout: Layout, stage: int, ep_rank: int) -> list[tuple[str, TensorSpec]]:
    """(global key, spec) of what the files of `stage` on EP rank `ep_rank` store: everything but
    experts (replicated over EP ranks), and that rank's share of the experts."""
    return [(k, s) for k, s in stage_specs(cfg, layout.stages, stage)
            if (owner := expert_owner(cfg, layout.ep, k)) is None or owner[0] == ep_rank]


def stage_specs(cfg: ModelConfig, stages: Stages, stage: int) -> list[tuple[str, TensorSpec]]:
    """(global key, spec) of every tensor a stage stores, in megatron-core's state-dict order."""
    out = [(s.name, s) for s in arch.embedding_specs(cfg)] if stage == 0 else []
    for i in stages.layers(stage):
        out += [(arch.layer_key(i, s.name), s) for s in arch.layer_specs(cfg, i)]
    if stage == stages.pp - 1:
        out += [(s.name, s) for s in arch.final_norm_specs(cfg)]
        if not cfg.embedding.tied or stages.pp > 1:  # tied at PP > 1: the last stage keeps its own copy
            out.append((arch.OUTPUT_LAYER, arch.OUTPUT_SPEC))
    return out


def local_key(key: str, stages: Stages, experts_per_rank: int | None = None) -> str:
    """Global layer index -> the stage-local index Megatron stores; with expert parallelism, a
    global expert index -> the EP rank's local one."""
    parsed = arch.split_layer_key(key)
    if parsed is None:
        return key
    name, expert = parsed[1], arch.expert_of(parsed[1])
    if expert is not None and experts_per_rank:
        name = f"{arch.EXPERTS}{expert[0] % experts_per_rank}.{expert[1]}"
    return arch.layer_key(stages.locate(parsed[0])[1], name)


def experts_per_rank(cfg: ModelConfig, layout: Layout) -> int | None:
    return cfg.moe.num_experts // layout.ep if cfg.moe else None


def target_config(cfg: ModelConfig, tp: int, vocab_size: int | None) -> ModelConfig:
    """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by × TP, so a new TP
    can need other padding. The true size comes from --vocab-size or args.vocab_size; without
    either, the padded rows are kept as the vocabulary (as Megatron's own converter does)."""
    refuse_unrepresentable(cfg)
    true_size = vocab_size or cfg.vocab_size
    if true_size is not None and true_size > cfg.padded_vocab_size:
        raise InputError(f"--vocab-size: {true_size} exceeds the checkpoint's {cfg.padded_vocab_size} "
                         f"vocabulary rows")
    padded = sharding.padded_vocab_size(true_size or cfg.padded_vocab_size, cfg.make_vocab_size_divisible_by, tp)
    return cfg.replace(padded_vocab_size=padded, vocab_size=true_size)


# flat key -> why megatron-core's GPTModel (local spec) cannot hold any value but the default
NOT_IN_MEGATRON_CORE = {
    "apply_layernorm_1p": "its local spec's torch norms have no zero-centred gain",
    "pre_layernorms": "its TransformerLayer always normalises a block's input",
    "qk_layernorm_across_heads": "its q/k norms are over one head's dimension",
    "post_layernorms": "its TransformerLayer has no norm after attention or after the MLP",
    "scale_embeddings": "its embedding is not scaled by the square root of the hidden size",
    "attn_logit_softcapping": "its attention has no soft-capping",
    "final_logit_softcapping": "its output layer has no soft-capping",
    "rotary_base_local": "it has one rope for every layer",
}


def refuse_unrepresentable(cfg: ModelConfig) -> None:
    """Refuse, by name, a feature megatron-core cannot reproduce (a Hugging Face output keeps it)."""
    flat, default = cfg.to_dict(), ModelConfig.from_dict(dict(num_layers=1, hidden_size=8, num_attention_heads=1,
                                                              padded_vocab_size=8)).to_dict()
    for key, why in NOT_IN_MEGATRON_CORE.items():
        if flat[key] != default[key]:
            raise InputError(f"{key}: {flat[key]!r} cannot be written as a Megatron checkpoint: megatron-core's "
                             f"GPTModel would not compute this model ({why}); write it with --format hf")
    if cfg.mlp.gated and cfg.mlp.activation != "silu":
        raise InputError(f"gated_linear_unit: a gated {cfg.mlp.activation} FFN (GeGLU) has no Megatron-LM argument "
                         f"(--swiglu gates SiLU only); write it with --format hf")
    head_dim = cfg.mla.q_head_dim if cfg.mla else cfg.attention.head_dim
    if cfg.attention.softmax_scale is not None and cfg.attention.softmax_scale != head_dim ** -0.5:
        raise InputError(f"softmax_scale: {cfg.attention.softmax_scale!r} is not 1/sqrt(kv_channels), and "
                         f"Megatron-LM's arguments have no other attention scale; write it with --format hf")
    _refuse_yarn(cfg)
    scaling = cfg.rope.scaling
    if scaling is not None and not scaling.megatron_core_constants:
        raise InputError(
            f"rope_scaling: megatron-core's llama3 rope scaling fixes low_freq_factor 1, high_freq_factor 4 and "
            f"original_max_position_embeddings 8192; this model has {scaling.low_freq_factor:g}, "
            f"{scaling.high_freq_factor:g} and {scaling.original_max_position} (write it with --format hf)")


def _refuse_yarn(cfg: ModelConfig) -> None:
    """megatron-core reads YaRN only from an MLA config, and computes its cos/sin factor always as
    mscale(factor, mscale) / mscale(factor, mscale_all_dim), rounding the ramp's ends."""
    yarn = cfg.rope.yarn
    if yarn is None:
        return
    if cfg.mla is None:
        raise InputError("use_yarn: megatron-core's GPTModel takes YaRN's settings only from an MLA config "
                         "(its plain TransformerConfig has no yarn_* fields), so a Megatron checkpoint of this "
                         "model would not load as it computes; write it with --format hf")
    theirs = yarn_mscale(yarn.factor, yarn.mscale or 1.0) / yarn_mscale(yarn.factor, yarn.mscale_all_dim or 0.0)
    if not yarn.truncate or abs(yarn.scale() - theirs) > 1e-12 * yarn.scale():
        raise InputError(f"use_yarn: megatron-core's MLA YaRN scales cos and sin by mscale(factor, mscale) / "
                         f"mscale(factor, mscale_all_dim) = {theirs:.6g} and rounds the ramp's ends; "
                         f"this model's are {yarn.scale():.6g} (yarn_correction_range_round_to_int {yarn.truncate}); "
                         f"write it with --format hf")


def megatron_args(cfg: ModelConfig, base: argparse.Namespace | None, layout: Layout,
                  iteration: int | str) -> argparse.Namespace:
    """The args a written checkpoint carries: `base`'s, with this model, layout and iteration (a
    GPTModel run's: a HybridModel source's pattern is dropped)."""
    args = hybrid.gpt_args(config_to_args(cfg, base, tp=layout.tp, pp=layout.pp))
    for key, value in layout.stages.megatron_args().items():
        setattr(args, key, value)
    args.expert_model_parallel_size = layout.ep
    if iteration != "release":
        args.iteration = int(iteration)
    return args


def stored_tensor(cfg: ModelConfig, specs: dict[str, TensorSpec], key: str,
                  full: torch.Tensor) -> tuple[TensorSpec, torch.Tensor] | None:
    """What is stored under `key` (`specs`: what this file or checkpoint stores): its spec and the
    tensor with vocabulary rows padded to `cfg`'s, the shape checked; None for a tied output layer
    that is not stored (the word embeddings are it)."""
    spec = specs.get(key)
    if spec is None:
        assert key == arch.OUTPUT_LAYER and cfg.embedding.tied, f"{key}: not a tensor stored here"
        return None
    if spec.packing == arch.VOCAB:
        full = sharding.pad_vocab(spec, full, cfg.padded_vocab_size)
    want = arch.full_shape(cfg, spec)
    assert tuple(full.shape) == want, f"{key}: operator produced {tuple(full.shape)}, expected {want}"
    return spec, full


def file_bytes(cfg: ModelConfig, layout: Layout, dtype: torch.dtype) -> dict[tuple[int, int, int], int]:
    """(stage, EP rank, TP rank) -> tensor bytes of that rank's file (every TP rank's file is alike)."""
    out = {}
    for stage, r in itertools.product(range(layout.pp), range(layout.ep)):
        size = sum(nbytes(sharding.shard_shape(spec, arch.full_shape(cfg, spec), layout.tp), dtype)
                   for _, spec in file_specs(cfg, layout, stage, r))
        out.update({(stage, r, t): size for t in range(layout.tp)})
    return out


def checkpoint_bytes(cfg: ModelConfig, layout: Layout, dtype: torch.dtype) -> int:
    """Tensor bytes of every rank file of `cfg` at `layout` (a replicated tensor is in each file)."""
    return sum(file_bytes(cfg, layout, dtype).values())


def canonical(model: dict) -> dict:
    """Read Transformer-Engine spellings as the local spec's names; drop `_extra_state`."""
    out = {}
    for key, value in model.items():
        if key.endswith("_extra_state"):
            continue
        parsed = arch.split_layer_key(key)
        if parsed is not None:
            key = arch.layer_key(parsed[0], arch.canonical_layer_name(parsed[1]))
        out[key] = value
    return out


def resolve_iteration_dir(path: Path) -> tuple[Path, Path, int | str]:
    """(root, iteration dir, iteration) for a checkpoint root or an `iter_*`/`release` directory."""
    if not path.is_dir():
        raise InputError(f"{path}: no such checkpoint directory")
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise InputError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
        iteration: int | str = text if text == "release" else int(text)
        iter_dir = path / iteration_dir_name(iteration)
        if not iter_dir.is_dir():
            raise InputError(f"{iter_dir}: iteration directory named by {TRACKER} is missing")
        return path, iter_dir, iteration
    match = re.fullmatch(r"iter_(\d{7})", path.name)
    if match or path.name == "release":
        return path.parent, path, "release" if path.name == "release" else int(match.group(1))
    raise InputError(f"{path}: not a Megatron checkpoint (no {TRACKER} and not an iter_*/release directory)")


def stages_from_args(args: argparse.Namespace, config: ModelConfig) -> Stages:
    """The pipeline split Megatron-LM derives from its args (even, or an uneven first/last stage; a
    HybridModel run's by its pattern's '|' segments)."""
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    if (pattern := hybrid.pattern_of(args)) is not None:
        return hybrid.stages_of(pattern, pp)
    return Stages.build(config.num_layers, int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
                        getattr(args, "decoder_first_pipeline_num_layers", None),
                        getattr(args, "decoder_last_pipeline_num_layers", None))
