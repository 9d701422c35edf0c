#!/usr/bin/env bash
# Quickstart on the embedded corpus (Python's own standard library as text; no download):
#   1. pretrain a tiny LLaMA-style GPT from scratch with DeepSpeed ZeRO (2 ranks; CPU if no GPU),
#   2. grow its Megatron export with LEMON (2x depth, 1.5x width) and verify the growth is lossless,
#   3. train the grown model with DeepSpeed on the LEMON schedule, starting from that growth.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
deepspeed --log_level error --num_gpus 2 launch/pretrain.py --config configs/runs/tiny_scratch.yaml
scalegrow grow --src runs/tiny_scratch/export --dst runs/quickstart/grown --method lemon \
  --target configs/models/gpt-tiny-grown.yaml --overwrite
scalegrow verify --src runs/tiny_scratch/export --dst runs/quickstart/grown
deepspeed --log_level error --num_gpus 2 launch/grow_pretrain.py --config configs/runs/tiny_lemon.yaml
scalegrow inspect runs/tiny_lemon/export
