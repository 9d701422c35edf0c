"""megatron-core as the oracle, on CPU. Test code only: the CPU shims below never enter the library.

megatron-core's `GPTModel` builds on CPU with `use_cpu_initialization=True` (`build_gpt`, for a
`ModelConfig`); a forward pass needs a few shims: the global memory buffer allocates on CPU, the CUDA
RNG tracker's fork is a no-op, `torch.cuda.current_device` answers 'cpu', `torch.cuda.synchronize`
does nothing, `Tensor.cuda()` stays on CPU (tied embeddings with PP > 1), the sliding-window mask
is built on the CPU, and the caller passes an explicit causal attention mask.
"""
from __future__ import annotations

import contextlib
import os
import socket
import warnings

import torch
import torch.nn.functional as F

from scalegrow.core.config import ModelConfig

warnings.filterwarnings("ignore", module="megatron")


def version() -> tuple[int, int]:
    """The installed megatron-core's (major, minor)."""
    from importlib import metadata

    return tuple(int(part) for part in metadata.version("megatron-core").split(".")[:2])


def saves_common() -> str:
    """Where the installed megatron-core's own `dist_checkpointing.save` puts the common state: in
    `common.pt` up to 0.18, inside the `.distcp` files from 0.19 on (scalegrow's `inline`)."""
    return "inline" if version() >= (0, 19) else "common.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_cpu_shims() -> None:
    from megatron.core import tensor_parallel
    from megatron.core import utils as mcu

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tensor_shape, dtype=dtype)

    mcu.GlobalMemoryBuffer.get_tensor = get_tensor
    tensor_parallel.random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self  # tied embeddings with PP > 1 all-reduce `.cuda()` copies
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None  # without Transformer Engine the router references an undefined name
    from megatron.core.transformer import multi_latent_attention

    if not isinstance(multi_latent_attention.TELinear, type):  # a stub (a mock) without Transformer Engine
        multi_latent_attention.HAVE_TE = False
    from megatron.core.fusions import fused_softmax

    window_mask = fused_softmax.get_sliding_window_causal_mask  # builds its mask on "cuda": on the CPU here
    fused_softmax.get_sliding_window_causal_mask = lambda sq, skv, size: _on_cpu(window_mask, sq, skv, size)


def _on_cpu(fn, *args):
    """`fn` with torch.ones(device="cuda") allocating on the CPU."""
    ones = torch.ones
    torch.ones = lambda *a, device=None, **k: ones(*a, **k)
    try:
        return fn(*args)
    finally:
        torch.ones = ones


def init_parallel(tp: int = 1, pp: int = 1, rank: int = 0, world_size: int = 1, port: int | None = None, ep: int = 1):
    """Start gloo and megatron's model-parallel groups (idempotent for the single-process case)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    install_cpu_shims()
    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()  # as Megatron-LM does at start-up: its args may be in common.pt
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port or free_port())
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    with contextlib.suppress(Exception):
        model_parallel_cuda_manual_seed(1234)


def transformer_config(cfg: ModelConfig, tp: int = 1, pp: int = 1, first: int | None = None,
                       last: int | None = None, **extra):
    """megatron-core `TransformerConfig` for `cfg`, with CPU-safe fusion settings."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
    from megatron.core.transformer.utils import openai_gelu

    gelu = openai_gelu if cfg.mlp.activation == "gelu_tanh" else F.gelu
    config = TransformerConfig if cfg.mla is None else MLATransformerConfig
    extra = {**extra, **_mla(cfg)} if cfg.mla is not None else extra
    return config(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.mlp.ffn_hidden_size,
        num_attention_heads=cfg.attention.heads, num_query_groups=cfg.attention.groups,
        kv_channels=cfg.attention.head_dim, normalization=cfg.norm.kind, layernorm_epsilon=cfg.norm.eps,
        gated_linear_unit=cfg.mlp.gated, activation_func=F.silu if cfg.mlp.gated else gelu,
        qk_layernorm=cfg.attention.qk_norm, window_size=cfg.attention.window,
        window_attn_skip_freq=cfg.to_dict()["window_attn_skip_freq"],
        add_bias_linear=cfg.add_bias_linear, add_qkv_bias=cfg.attention.qkv_bias,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=torch.float32 if pp > 1 else None,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        **_moe(cfg), **extra,
    )


def _mla(cfg: ModelConfig) -> dict:
    """Multi-latent attention's settings: the ranks and head dims, and rope (YaRN as MLA spells it)."""
    flat = {key: value for key, value in cfg.mla.to_flat().items() if key != "multi_latent_attention"}
    flat["transformer_impl"] = "local"  # megatron-core 0.19 resolves MLA's norms by the backend this names
    yarn = cfg.rope.yarn
    if yarn is None:
        return {**flat, "rope_type": "rope", "rotary_base": cfg.rope.base, "mscale_all_dim": 0.0}
    return {**flat, "rope_type": "yarn", "rotary_base": cfg.rope.base, "rotary_scaling_factor": yarn.factor,
            "original_max_position_embeddings": yarn.original_max_position, "beta_fast": yarn.beta_fast,
            "beta_slow": yarn.beta_slow, "mscale": yarn.mscale or 1.0, "mscale_all_dim": yarn.mscale_all_dim or 0.0}


class CpuCoreAttention(torch.nn.Module):
    """Causal softmax attention for megatron-core's MLA on the CPU (its local DotProductAttention
    takes no separate key and value widths; Transformer Engine's does, on a GPU). Everything
    multi-latent (projections, latent norms, the rope's pairs, YaRN's scales) stays megatron-core's."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, **_):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).flatten(2)  # [s, b, n * dv]


def _cpu_mla(spec):
    """`spec` (a layer's, or a block's layers') with MLA's core attention on the CPU, and its
    torch_dist keys those of Megatron-LM's Transformer-Engine MLA spec (the latents' norms fused into
    the up projections, a dense layer's pre-MLP norm into linear_fc1), as the local spec's map does
    for the usual attention; the local MLA spec has no such map."""
    for layer in getattr(spec, "layer_specs", None) or [spec]:
        attention = layer.submodules.self_attention
        if "MLA" in attention.module.__name__:
            attention.submodules.core_attention = CpuCoreAttention
            keys = {"self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
                    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_"}
            mlp = layer.submodules.mlp  # a ModuleSpec, or (megatron-core 0.19's dense MLP) a partial
            mlp = getattr(mlp, "module", None) or getattr(mlp, "func", mlp)
            if "MoE" not in getattr(mlp, "__name__", ""):
                keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
            layer.submodules.sharded_state_dict_keys_map = keys
    return spec


def _moe(cfg: ModelConfig) -> dict:
    """MoE settings; the `allgather` dispatcher (alltoall needs a CUDA stream), no aux loss in forward."""
    if cfg.moe is None:
        return {}
    flat = {key: value for key, value in cfg.moe.to_flat().items() if key.startswith("moe_")}
    return {**flat, "num_moe_experts": cfg.moe.num_experts, "moe_token_dispatcher_type": "allgather",
            "moe_aux_loss_coeff": 0.0}


def build_gpt(cfg: ModelConfig, tp: int = 1, pp: int = 1, pre_process: bool = True, post_process: bool = True,
              first: int | None = None, last: int | None = None, parallel_output: bool = True, **extra):
    """megatron-core's `GPTModel` with the local (non-Transformer-Engine) layer spec."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

        config = transformer_config(cfg, tp, pp, first, last, **extra)
        spec = get_gpt_layer_local_spec(normalization=cfg.norm.kind, qk_layernorm=cfg.attention.qk_norm,
                                        num_experts=cfg.moe and cfg.moe.num_experts, moe_grouped_gemm=False,
                                        multi_latent_attention=cfg.mla is not None)
        if cfg.moe and not cfg.moe.every_layer:  # dense and MoE layers mixed: a block spec
            spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=cfg.norm.kind)
        spec = _cpu_mla(spec)
        return GPTModel(
            config=config, transformer_layer_spec=spec,
            vocab_size=cfg.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre_process, post_process=post_process, parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.embedding.tied,
            position_embedding_type=cfg.embedding.position,
            rotary_percent=cfg.rope.percent, rotary_base=cfg.rope.base, **rope_scaling(cfg),
        )


def rope_scaling(cfg: ModelConfig) -> dict:
    """GPTModel's rope scaling arguments, as Megatron-LM's model provider passes them."""
    scaling = cfg.rope.scaling
    return dict(rope_scaling=scaling is not None, rope_scaling_factor=scaling.factor if scaling else 8.0,
                seq_len_interpolation_factor=cfg.rope.interpolation)


def hybrid_spec(cfg: ModelConfig):
    """A CPU layer spec for megatron-core's HybridModel (0.19's `hybrid_stack_spec` is built of
    Transformer Engine modules): GPTModel's local layer spec, split into an attention-only layer ('*')
    and an MLP-only `MLPLayer` ('-'/'E'). Their checkpoint keys are the TE spec's (the local spec maps
    its norms to `linear_qkv.layer_norm_weight` and `linear_fc1.layer_norm_weight`)."""
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    hybrid_block.TENorm = WrappedTorchNorm  # the final norm is a TENorm by name; same keys, same function
    layer = get_gpt_layer_local_spec(normalization=cfg.norm.kind, qk_layernorm=cfg.attention.qk_norm,
                                     num_experts=cfg.moe and cfg.moe.num_experts, moe_grouped_gemm=False)
    attention, mlp = copy.deepcopy(layer), copy.deepcopy(layer)
    attention.submodules.mlp = attention.submodules.pre_mlp_layernorm = IdentityOp
    attention.submodules.mlp_bda = IdentityFuncOp
    mlp.module, mlp.submodules.self_attention, mlp.submodules.input_layernorm = MLPLayer, IdentityOp, IdentityOp
    mlp.submodules.self_attn_bda = IdentityFuncOp
    subs = HybridStackSubmodules(attention_layer=attention, **{"moe_layer" if cfg.moe else "mlp_layer": mlp})
    return ModuleSpec(module=HybridStack, submodules=subs)


def build_hybrid(cfg: ModelConfig, tp: int = 1, pp: int = 1, pre_process: bool = True,
                 post_process: bool = True, parallel_output: bool = True, pattern: str | None = None):
    """megatron-core's `HybridModel` of a GPT model: layer i is hybrid layers 2i ('*') and 2i+1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        config = transformer_config(cfg, tp, pp)
        config.num_layers = 2 * cfg.num_layers
        return HybridModel(
            config=config, hybrid_stack_spec=hybrid_spec(cfg), vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            hybrid_layer_pattern=pattern or ("*E" if cfg.moe else "*-") * cfg.num_layers,
            pre_process=pre_process, post_process=post_process, parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.embedding.tied, position_embedding_type=cfg.embedding.position,
            rotary_percent=cfg.rope.percent, rotary_base=cfg.rope.base,
        )


def causal_inputs(tokens: torch.Tensor):
    """Position ids and the explicit boolean causal mask (True = masked) megatron's local spec wants."""
    s = tokens.shape[1]
    position_ids = torch.arange(s).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    return position_ids, mask


def forward(model, tokens: torch.Tensor) -> torch.Tensor:
    position_ids, mask = causal_inputs(tokens)
    with torch.no_grad():
        return model(tokens, position_ids, mask)


def load_strict(model, state_dict: dict, fill_extra_state: bool = False) -> None:
    """Strict load. `fill_extra_state` supplies megatron's `_extra_state` keys for a plain state dict
    (the reference model's); a checkpoint we wrote must carry them itself."""
    sd = dict(state_dict)
    if fill_extra_state:
        sd.update({k: None for k in model.state_dict() if k.endswith("_extra_state") and k not in sd})
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result


# ---- multi-process: megatron-core at TP x PP on gloo ------------------------------------------------
def pipeline_forward(model, tokens: torch.Tensor, tp: int, pp: int, hidden_size: int) -> torch.Tensor | None:
    """Chain the stages by hand: each stage receives the previous stage's hidden states (same TP
    rank), runs its layers and sends them on. The last stage returns full (TP-gathered) logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    stage = ps.get_pipeline_model_parallel_rank()
    position_ids, mask = causal_inputs(tokens)
    if stage > 0:
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], hidden_size)  # [s, b, h]
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(tokens, position_ids, mask)
    if stage < pp - 1:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def check_worker(rank: int, world: int, port: int, tp: int, pp: int, first, last, jobs: list, out_dir: str,
                 ep: int = 1):
    """One rank: for each job build megatron-core's GPTModel at this rank's stage, load this rank's
    shard strictly (legacy) or through dist_checkpointing (torch_dist), run the pipelined forward;
    the last stage's TP rank 0 saves the logits as `{out_dir}/{job index}.pt`."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from scalegrow.formats.io import safe_load
    from scalegrow.formats.megatron import FILE_NAME, rank_dir_name, resolve_iteration_dir

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    init_parallel(tp, pp, rank=rank, world_size=world, port=port, ep=ep)
    stage, t = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    r = ps.get_expert_model_parallel_rank() if ep > 1 else 0  # data-parallel replicas double as EP ranks
    for n, job in enumerate(jobs):
        cfg = ModelConfig.from_dict(job["config"])
        model = build_gpt(cfg, tp, pp, pre_process=stage == 0, post_process=stage == pp - 1,
                          first=first, last=last, parallel_output=False).eval()
        _, iter_dir, _ = resolve_iteration_dir(__import__("pathlib").Path(job["path"]))
        if job["format"] == "torch":
            state = safe_load(iter_dir / rank_dir_name(t, stage, pp, r, ep) / FILE_NAME, mmap=False)
            load_strict(model, state["model"])
        else:
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iter_dir))
            load_strict(model, loaded["model"])
        logits = pipeline_forward(model, torch.load(job["tokens"]), tp, pp, cfg.hidden_size)
        if logits is not None and t == 0 and r == 0:
            torch.save(logits, f"{out_dir}/{n}.pt")
        dist.barrier()
    dist.destroy_process_group()


def hf_logits_at_tp2_pp2(sources: dict, tokens: torch.Tensor, tmp_path) -> dict:
    """name -> megatron-core's logits for each HF source converted to Megatron legacy at TP2/PP2 and
    loaded strictly, as Megatron-LM builds the model from the args written."""
    from scalegrow import commands
    from scalegrow.formats.options import LayoutOptions, OutputOptions
    from scalegrow.formats.registry import open_checkpoint

    torch.save(tokens, tmp_path / "tokens.pt")
    jobs = []
    for name, src in sources.items():
        commands.convert(src, tmp_path / name, OutputOptions(layout=LayoutOptions(tp=2, pp=2)), progress=False)
        jobs.append({"config": open_checkpoint(tmp_path / name).config.to_dict(), "path": str(tmp_path / name),
                     "format": "torch", "tokens": str(tmp_path / "tokens.pt")})
    return dict(zip(sources, run_megatron_check(2, 2, jobs, tmp_path)))


def run_megatron_check(tp: int, pp: int, jobs: list, out_dir, first=None, last=None,
                       ep: int = 1) -> list[torch.Tensor]:
    """Spawn tp*pp*ep gloo ranks running `check_worker` (EP ranks are data-parallel replicas that
    share their experts); return each job's logits."""
    import torch.multiprocessing as mp

    world = tp * pp * ep
    mp.spawn(check_worker, args=(world, free_port(), tp, pp, first, last, jobs, str(out_dir), ep),
             nprocs=world, join=True)
    return [torch.load(f"{out_dir}/{n}.pt") for n in range(len(jobs))]
