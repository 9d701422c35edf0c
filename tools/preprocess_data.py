"""Tokenize a corpus into Megatron indexed datasets (megatron-core's builder), with a held-out split.

    python tools/preprocess_data.py --corpus data/gcide.txt --tokenizer data/tokenizer.model \
        --out data/gcide --valid-fraction 0.02
writes data/gcide_train.{bin,idx} and data/gcide_valid.{bin,idx}; runs then use
`data.corpus: data/gcide` and `data.tokenizer: data/tokenizer.model`.
"""
import argparse
import sys
from pathlib import Path

from scalegrow.data import build_indexed, load_documents, load_tokenizer
from scalegrow.errors import InputError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="embedded", help="'embedded', or a .txt/.json/.jsonl/.parquet file")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    p.add_argument("--out", required=True, help="output prefix")
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--max-bytes", type=int, default=50_000_000, help="cap for the embedded corpus")
    a = p.parse_args()
    try:
        counts = build_indexed(load_documents(a.corpus, a.max_bytes), load_tokenizer(a.tokenizer), Path(a.out),
                               a.valid_fraction)
    except InputError as exc:
        print(f"preprocess_data: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}_train ({counts['train']} tokens) and {a.out}_valid ({counts['valid']} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
