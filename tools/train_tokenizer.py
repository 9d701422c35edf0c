"""Train a sentencepiece BPE tokenizer on any text/json/parquet corpus, or the embedded one.

    python tools/train_tokenizer.py --corpus data/gcide.txt --vocab-size 8192 --out data/tokenizer
writes data/tokenizer.model (and .vocab).
"""
import argparse
import sys
from pathlib import Path

from scalegrow.data import load_documents, train_tokenizer
from scalegrow.errors import InputError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="embedded", help="'embedded', or a .txt/.json/.jsonl/.parquet file")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="model prefix: writes PREFIX.model")
    p.add_argument("--max-bytes", type=int, default=50_000_000, help="cap for the embedded corpus")
    a = p.parse_args()
    try:
        model = train_tokenizer(load_documents(a.corpus, a.max_bytes), Path(a.out), a.vocab_size)
    except InputError as exc:
        print(f"train_tokenizer: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
