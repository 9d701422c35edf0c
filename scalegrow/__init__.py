"""scalegrow: grow and shrink pretrained GPT models on their sharded checkpoints (Megatron, Hugging Face,
DeepSpeed). The parts: `core/` (the model), `formats/`, `operators/`, `write/`, `methods/`, `train/`,
`commands.py` and `cli.py`; docs/DESIGN.md says what each may import."""
__version__ = "0.1.0"
