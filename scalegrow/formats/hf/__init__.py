"""Hugging Face model directories: families as data, the reader and writer, safetensors shards."""
