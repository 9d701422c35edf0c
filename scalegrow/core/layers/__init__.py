"""The reference model's layers, each megatron-core's module of the same name in plain PyTorch:
`blocks` (norms, the FFN), `attention` (self-attention and rope), `mla` (multi-latent attention), `moe` (the router and the
experts).
`core/model.py` assembles them into the GPT."""
