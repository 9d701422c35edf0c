"""Checkpoint formats: one module each (`megatron` legacy torch, `torch_dist`, `deepspeed`), listed in
`registry`. Readers and writers exchange full tensors under megatron-core names (`base`)."""
