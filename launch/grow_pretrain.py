"""Grow a pretrained checkpoint, then train it with DeepSpeed ZeRO:
`deepspeed launch/grow_pretrain.py --config configs/runs/X.yaml [k=v ...]`"""
import sys

from scalegrow.train.launch import main

if __name__ == "__main__":
    sys.exit(main("grow_pretrain"))
