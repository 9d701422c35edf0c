"""Checkpoint formats: one module each (`megatron` legacy torch, `torch_dist` over `dcp`, `deepspeed`,
`hf/` with one record per Hugging Face family), listed in `registry`. Readers and writers exchange
full tensors under megatron-core names (`base`); `megatron_rules` and `megatron_args` are shared by
both Megatron formats; `options` is what a write is asked for; `metadata` is `scalegrow.json`."""
