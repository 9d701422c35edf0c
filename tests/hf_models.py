"""Tiny Hugging Face models of every family scalegrow reads, built with transformers' own classes and
saved with `save_pretrained` (small shards), with a real `tokenizers` BPE tokenizer beside them."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 1000
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)


def hf_config(family: str):
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                                       bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    rope = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    return {"llama": lambda: transformers.LlamaConfig(**COMMON, **rope, tie_word_embeddings=False),
            "mistral": lambda: transformers.MistralConfig(**COMMON, **rope, sliding_window=None),
            "qwen2": lambda: transformers.Qwen2Config(**COMMON, **rope, tie_word_embeddings=True),
            "qwen3": lambda: transformers.Qwen3Config(**COMMON, **rope, head_dim=24, tie_word_embeddings=True),
            "mixtral": lambda: transformers.MixtralConfig(**COMMON, **rope, num_local_experts=4, num_experts_per_tok=2),
            "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, **rope, head_dim=24, num_experts=4,
                                                             num_experts_per_tok=2, moe_intermediate_size=48,
                                                             norm_topk_prob=True),
            "phi3": lambda: transformers.Phi3Config(  # a window of 8 and rope over half of each head
                **COMMON, rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5},
                sliding_window=8, pad_token_id=None, eos_token_id=VOCAB - 1),
            "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, **rope, num_experts=4, num_experts_per_tok=2,
                                                             moe_intermediate_size=48,
                                                             shared_expert_intermediate_size=80),
            "gemma2": lambda: gemma_config(family), "gemma3_text": lambda: gemma_config(family),
            "olmo2": lambda: transformers.Olmo2Config(**COMMON, **rope, pad_token_id=None),
            "deepseek_v3": lambda: deepseek_config(),
            }[family]()


def deepseek_config(**changes):
    """DeepSeek-V3 in small: q and KV latents, YaRN with both mscales, a dense first layer, then 8
    routed experts in 4 groups (a token's 4 from its best 2), scaled by 2.5, and 2 shared experts."""
    import transformers

    yarn = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
                  routed_scaling_factor=2.5, kv_lora_rank=24, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=12,
                  qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
                  norm_topk_prob=True, max_position_embeddings=128, rope_parameters=yarn, rms_norm_eps=1e-6)
    return transformers.DeepseekV3Config(**{**values, **changes})


def deepseek_v2_config(**changes):
    """DeepSeek-V2 in small: V3's shape with V2's router (softmax over all experts, top 4 unnormalised,
    scaled by 2, within the 3 of 4 groups with the best expert) and no routing bias."""
    import transformers

    values = dict(deepseek_config().to_dict(), topk_method="group_limited_greedy", n_group=4, topk_group=3,
                  routed_scaling_factor=2.0, norm_topk_prob=False)
    for key in ("model_type", "architectures", "transformers_version", "rope_interleave", "num_nextn_predict_layers",
                "dtype", "head_dim", "qk_head_dim"):
        values.pop(key, None)
    return transformers.DeepseekV2Config(**{**values, **changes})


def gemma_config(family: str):
    """Every Gemma feature on: a query_pre_attn_scalar that is not the head dimension, final soft-capping,
    windows of 8; Gemma 2's attention scores capped at 2 (most of them bend), alternating windows;
    Gemma 3's five local layers to one global, its local rope and q/k norms."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=8,
                  query_pre_attn_scalar=24, final_logit_softcapping=5.0)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, num_hidden_layers=4, attn_logit_softcapping=2.0)
    return transformers.Gemma3TextConfig(**common, num_hidden_layers=6)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "mixtral", "qwen3_moe", "qwen2_moe")


def build(family: str, out: Path, tokenizer_dir: Path | None = None, seed: int = 0, config=None) -> Path:
    """A random `family` model (or one of `config`, a transformers config), its weights moved off
    transformers' init (noise on every tensor, so norms and biases matter), saved in shards of 100 kB."""
    import transformers

    torch.manual_seed(seed)  # transformers' own init draws from the global generator
    model = transformers.AutoModelForCausalLM.from_config(config or hf_config(family)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        for name, b in model.named_buffers():  # DeepSeek's routing bias: enough to change choices
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn(b.shape, generator=gen) * 0.1)
    model.generation_config.max_new_tokens = 17  # something to see carried over
    model.save_pretrained(out, max_shard_size="100KB")
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
    return out


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"


def train_tokenizer(out: Path) -> Path:
    """A byte-level BPE over the embedded corpus (the Python standard library), saved the way
    transformers does: tokenizer.json and tokenizer_config.json naming its eos token."""
    import tokenizers
    import transformers

    from scalegrow.data import embedded_documents

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tok.train_from_iterator(embedded_documents(300_000), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE  # transformers 5 saves it as chat_template.jinja
    fast.save_pretrained(out)
    return out


def logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits for a saved directory, after a strict load (nothing missing or unused)."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    with torch.no_grad():
        return model.eval()(tokens).logits
