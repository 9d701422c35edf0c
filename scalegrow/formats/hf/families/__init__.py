"""The Hugging Face families scalegrow reads and writes, one record each (`family.HFFamily`):

    llama, mistral   RMSNorm, SwiGLU, GQA, rope          q/k/v and gate/up fused the megatron-core way
    qwen2            + q/k/v biases
    qwen3            + per-head q/k norms (megatron-core's qk_layernorm)
    phi3             llama with q/k/v in one qkv_proj, gate/up in one gate_up_proj, partial rope, a window
    gemma2           zero-centred RMSNorm before and after each block, √d embeddings, GeGLU (tanh),
                     query_pre_attn_scalar, soft-capping, alternating windows (HF only: not in megatron-core)
    gemma3_text      gemma2 without soft-capping, + q/k norms, a plain local rope on its 5:1 windowed layers
    olmo2            llama with norms after attention and the MLP instead of before, q/k norms over all heads
    gpt2             LayerNorm, GELU (tanh approximation), MHA, learned positions, biases, tied
    mixtral          llama + MoE in every layer
    qwen3_moe        qwen3 + MoE in every layer
    qwen2_moe        qwen2 + MoE in every layer + a gated shared expert

Adding a family: a module with its record, and one entry in `formats/hf/registry.py`.
"""
