"""scalegrow: grow and shrink pretrained GPT models on their sharded Megatron checkpoints."""
__version__ = "0.1.0"
