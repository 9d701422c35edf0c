"""DeepSeek-V3 at real size: the conversion and growth plans of the 671B model, and the memory of a
scaled-down real conversion, against the streaming bound.

    python tools/bench/deepseek.py [--workdir DIR] [--keep] [--skip-real]

1. plan: the release's config.json (DeepSeek-V3, as published: 61 layers, 256 experts, FP8 blocks of
   128 x 128) and safetensors headers of its layout (each FP8 projection beside its weight_scale_inv,
   bf16 norms/embeddings/router, the fp32 e_score_correction_bias, the MTP layer 61) in 163 shards;
   their data regions are sparse (holes on disk: nothing is read by a plan). `scalegrow convert
   --dry-run` to Megatron TP8/PP16/EP64 and to torch_dist, and `grow --method lemon --dry-run` to 72
   layers, each a child process: wall time and peak RSS.
2. real: a scaled-down DeepSeek (MLA, 8 layers, 32 experts, ~0.5 B params, bf16) written by scalegrow
   as HF, converted to Megatron TP2/PP2/EP4 and to torch_dist: peak RSS against 1.5 x the largest
   output file + 0.5 GiB, and time against a copy of the output (`convert.py`'s measurement).
Prints one JSON line per case.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import subprocess

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from convert import bench_setup, measure, run_measured  # noqa: E402

V3_CONFIG = {  # DeepSeek-V3's config.json as released (deepseek-ai/DeepSeek-V3), its keys as published
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
    "use_cache": True, "bos_token_id": 0, "eos_token_id": 1, "pretraining_tp": 1, "tie_word_embeddings": False,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
SHARDS = 163  # the release's
BYTES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def v3_tensors(c: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor of the release, in order: FP8 projections with their
    scale_inv, bf16 norms, router and embeddings, the fp32 routing bias, the MTP layer 61."""
    h, heads, qk = c["hidden_size"], c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h), "BF16")]
    for i in range(c["num_hidden_layers"] + c["num_nextn_predict_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "BF16"), (p + "post_attention_layernorm.weight", (h,), "BF16"),
                (p + "self_attn.q_a_layernorm.weight", (c["q_lora_rank"],), "BF16"),
                (p + "self_attn.kv_a_layernorm.weight", (c["kv_lora_rank"],), "BF16")]
        out += fp8(p + "self_attn.q_a_proj.weight", (c["q_lora_rank"], h))
        out += fp8(p + "self_attn.q_b_proj.weight", (heads * qk, c["q_lora_rank"]))
        out += fp8(p + "self_attn.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], h))
        out += fp8(p + "self_attn.kv_b_proj.weight", (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]))
        out += fp8(p + "self_attn.o_proj.weight", (h, heads * c["v_head_dim"]))
        if i < c["first_k_dense_replace"]:
            out += ffn(p + "mlp.", h, c["intermediate_size"])
            continue
        out += [(p + "mlp.gate.weight", (c["n_routed_experts"], h), "BF16"),
                (p + "mlp.gate.e_score_correction_bias", (c["n_routed_experts"],), "F32")]
        for e in range(c["n_routed_experts"]):
            out += ffn(p + f"mlp.experts.{e}.", h, c["moe_intermediate_size"])
        out += ffn(p + "mlp.shared_experts.", h, c["moe_intermediate_size"] * c["n_shared_experts"])
        if i >= c["num_hidden_layers"]:  # the MTP module's own parts
            out += [(p + "enorm.weight", (h,), "BF16"), (p + "hnorm.weight", (h,), "BF16"),
                    (p + "eh_proj.weight", (h, 2 * h), "BF16"), (p + "shared_head.norm.weight", (h,), "BF16")]
    return out + [("model.norm.weight", (h,), "BF16"), ("lm_head.weight", (c["vocab_size"], h), "BF16")]


def ffn(prefix: str, h: int, f: int) -> list:
    return fp8(prefix + "gate_proj.weight", (f, h)) + fp8(prefix + "up_proj.weight", (f, h)) + \
        fp8(prefix + "down_proj.weight", (h, f))


def fp8(name: str, shape: tuple[int, int]) -> list:
    grid = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    return [(name, shape, "F8_E4M3"), (name + "_scale_inv", grid, "F32")]


def write_release(root: Path) -> int:
    """config.json, the index and 163 sparse shards with the release's headers; returns the bytes they claim."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(V3_CONFIG, indent=2))
    tensors = v3_tensors(V3_CONFIG)
    per_shard, weight_map, total = math.ceil(len(tensors) / SHARDS), {}, 0
    for k in range(SHARDS):
        part = tensors[k * per_shard:(k + 1) * per_shard]
        name = f"model-{k + 1:05d}-of-{SHARDS:06d}.safetensors"
        header, at = {}, 0
        for tname, shape, dtype in part:
            end = at + math.prod(shape) * BYTES[dtype]
            header[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, end]}
            weight_map[tname], at = name, end
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(root / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + at)  # the data: a hole
        total += at
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def plan_cases(exe: list[str], work: Path) -> None:
    claimed = write_release(work / "v3")
    target = work / "t.yaml"
    target.write_text("num_layers: 72\n")
    cases = {"convert-megatron-tp8-pp16-ep64": ["convert", "--format", "torch", "--tp", "8", "--pp", "16", "--ep", "64",
                                                "--decoder-first-pipeline-num-layers", "1"],
             "convert-torch-dist": ["convert", "--format", "torch_dist"],
             "grow-lemon-61-to-72-layers-hf": ["grow", "--method", "lemon", "--target", str(target), "--format", "hf"]}
    for name, command in cases.items():
        cmd = exe + command + ["--src", str(work / "v3"), "--dst", str(work / "out"), "--dry-run", "--drop-mtp"]
        seconds, peak = run_measured(["sh", "-c", " ".join(cmd) + " > /dev/null 2>&1"])
        print(json.dumps({"case": f"plan/{name}", "source_bytes_claimed": claimed, "seconds": round(seconds, 2),
                          "peak_rss_bytes": peak, "aim_met": seconds < 60 and peak < 2**30}), flush=True)


SMALL = dict(num_layers=8, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816, padded_vocab_size=32000,
             vocab_size=32000, max_position_embeddings=4096, normalization="RMSNorm", swiglu=True,
             position_embedding_type="rope", add_bias_linear=False, untie_embeddings_and_output_weights=True,
             multi_latent_attention=True, q_lora_rank=384, kv_lora_rank=256, qk_head_dim=64, qk_pos_emb_head_dim=32,
             v_head_dim=64, qk_layernorm=True, num_moe_experts=32, moe_router_topk=4, moe_ffn_hidden_size=384,
             moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=4,
             moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=384,
             moe_layer_freq=[0] + [1] * 7)


def real_cases(exe: list[str], work: Path) -> None:
    """The source is made by child processes (`init`, then `convert` to HF in 200 MB shards): a
    child forked from a large process would count that process's pages in its peak RSS."""
    (work / "small.yaml").write_text(yaml.safe_dump(SMALL))
    subprocess.run(exe + ["init", "--target", str(work / "small.yaml"), "--dst", str(work / "m"), "--dtype", "bf16"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(exe + ["convert", "--src", str(work / "m"), "--dst", str(work / "hf"), "--format", "hf",
                          "--max-shard-size", "200MB", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    for name, dst, command in (("hf-to-megatron-tp2-pp2-ep4", "m2", ["convert", "--format", "torch", "--tp", "2",
                                                                      "--pp", "2", "--ep", "4"]),
                               ("hf-to-torch-dist", "dist", ["convert", "--format", "torch_dist"])):
        print(json.dumps(measure(exe, work, f"deepseek-small/{name}", "hf", dst, command)), flush=True)


def main() -> None:
    real = "--skip-real" not in sys.argv
    sys.argv = [a for a in sys.argv if a != "--skip-real"]
    args, work, exe = bench_setup(__doc__)
    plan_cases(exe, work)
    if real:
        real_cases(exe, work)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
