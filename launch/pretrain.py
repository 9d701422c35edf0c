"""Pretrain from scratch with DeepSpeed ZeRO: `deepspeed launch/pretrain.py --config configs/runs/X.yaml [k=v ...]`"""
import sys

from scalegrow.train.launch import main

if __name__ == "__main__":
    sys.exit(main("pretrain"))
