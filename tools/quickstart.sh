#!/usr/bin/env bash
# Quickstart: install into ./.venv, write a small Megatron checkpoint (LLaMA-style: RMSNorm, SwiGLU,
# GQA, rope), grow it with LEMON to 2x depth and 1.5x width, and prove the grown model is lossless.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
OUT="${1:-runs/quickstart}"
scalegrow init --target configs/models/gpt-tiny.yaml --dst "$OUT/small" --overwrite
scalegrow grow --src "$OUT/small" --dst "$OUT/grown" --method lemon \
  --target configs/models/gpt-tiny-grown.yaml --overwrite
scalegrow verify --src "$OUT/small" --dst "$OUT/grown"
scalegrow inspect "$OUT/grown"
