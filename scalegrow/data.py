"""Data the Megatron way: a sentencepiece tokenizer, documents from `datasets`, a megatron-core indexed
dataset (`.bin/.idx`) per split, and deterministic batches that are a pure function of the step.
Training, calibration, LiGO's operator training and `scalegrow eval` all read tokens through here.

The embedded default corpus is the Python standard library's own source files, shipped inside the
package (`scalegrow/corpus`) so that every Python reads the same text: the quickstart and the tests
need no download and give the same tokens on 3.10 to 3.13.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from scalegrow import corpus, deps
from scalegrow.errors import InputError

EMBEDDED = "embedded"
SPLITS = ("train", "valid")


# ---- documents -------------------------------------------------------------------------------------
def embedded_documents(max_bytes: int) -> Iterator[str]:
    """The embedded corpus (`scalegrow/corpus`: CPython 3.11.7's standard library modules, the same
    on every Python), up to `max_bytes` characters."""
    try:
        yield from corpus.documents(max_bytes)
    except corpus.CorpusError as exc:
        raise InputError(str(exc)) from None


def load_documents(corpus: str, max_bytes: int) -> Iterable[str]:
    """Documents from the embedded corpus, or from any text/json/jsonl/parquet file via `datasets`
    (a `text` column; plain text files are split into paragraphs)."""
    if corpus == EMBEDDED:
        return embedded_documents(max_bytes)
    path = Path(corpus)
    if not path.is_file():
        raise InputError(f"{corpus}: no such corpus file (or use 'embedded')")
    import datasets

    kind = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise InputError(f"{corpus}: unsupported corpus type {path.suffix!r} (.txt, .json, .jsonl, .parquet)")
    extra = {"sample_by": "paragraph"} if kind == "text" else {}
    ds = datasets.load_dataset(kind, data_files=str(path), split="train", **extra)
    if "text" not in ds.column_names:
        raise InputError(f"{corpus}: no 'text' column (columns: {', '.join(ds.column_names)})")
    return (row for row in ds["text"] if row and row.strip())


def is_valid_document(index: int, fraction: float) -> bool:
    """Deterministic held-out membership by document index (independent of corpus size)."""
    return zlib.crc32(str(index).encode()) % 10_000 < fraction * 10_000


# ---- tokenizer ---------------------------------------------------------------------------------------
def train_tokenizer(documents: Iterable[str], model_prefix: Path, vocab_size: int) -> Path:
    """A sentencepiece BPE model that round-trips any text exactly: identity normalisation, no
    dummy prefix, whitespace kept (code needs its indentation), newline and tab as their own pieces,
    byte fallback for anything unseen; eos marks the end of a document."""
    import sentencepiece as spm

    def sentences():
        for doc in documents:
            for line in doc.splitlines():
                if line.strip():
                    yield line[:4096]

    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "\t"], num_threads=2,
        input_sentence_size=200_000, shuffle_input_sentence=False, minloglevel=2)
    return Path(f"{model_prefix}.model")


def load_tokenizer(path: str | Path):
    """A sentencepiece model (`*.model`), or a Hugging Face `tokenizer.json` (or a directory holding
    one) behind the same three calls data preparation makes: encode, eos_id, get_piece_size."""
    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{path}: no such tokenizer (a sentencepiece .model or a tokenizer.json)")
    if path.suffix == ".json":
        return HFTokenizer(path)
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


class HFTokenizer:
    """A Hugging Face fast tokenizer (the `tokenizers` library) that speaks sentencepiece's calls. The
    end-of-document token is the tokenizer_config.json's `eos_token`, else config.json's `eos_token_id`."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path, self.tokenizer = path, Tokenizer.from_file(str(path))
        self._eos = self._find_eos()

    def _find_eos(self) -> int:
        config, model = self.path.parent / "tokenizer_config.json", self.path.parent / "config.json"
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and self.tokenizer.token_to_id(eos) is not None:
            return self.tokenizer.token_to_id(eos)
        eos_id = json.loads(model.read_text()).get("eos_token_id") if model.is_file() else None
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if not isinstance(eos_id, int):
            raise InputError(f"{self.path}: no end-of-document token (eos_token in tokenizer_config.json or "
                             f"eos_token_id in config.json)")
        return eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def eos_id(self) -> int:
        return self._eos

    def get_piece_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


# ---- indexed datasets ----------------------------------------------------------------------------------
def build_indexed(documents: Iterable[str], tokenizer, prefix: Path, valid_fraction: float) -> dict[str, int]:
    """Tokenize every document (+ end-of-document) into `{prefix}_{train,valid}.{bin,idx}` with
    megatron-core's builder. Returns the token count per split."""
    dtype = np.uint16 if tokenizer.get_piece_size() < 65_000 else np.int32
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = deps.megatron("datasets.indexed_dataset").IndexedDatasetBuilder
    builders = {s: builder(f"{prefix}_{s}.bin", dtype=dtype) for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    eod = tokenizer.eos_id()
    for i, doc in enumerate(documents):
        ids = tokenizer.encode(doc) + [eod]
        split = "valid" if is_valid_document(i, valid_fraction) else "train"
        builders[split].add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        counts[split] += len(ids)
    for s in SPLITS:
        builders[s].finalize(f"{prefix}_{s}.idx")
    return counts


class TokenStream:
    """The documents of one indexed dataset as one token stream, cut into (seq_length + 1)-token
    windows at a stride of seq_length (inputs and next-token labels)."""

    def __init__(self, path_prefix: str | Path, seq_length: int):
        indexed = deps.megatron("datasets.indexed_dataset").IndexedDataset
        if not indexed.exists(str(path_prefix)):
            raise InputError(f"{path_prefix}: no indexed dataset (.bin/.idx)")
        self.dataset = indexed(str(path_prefix))
        self.seq_length = seq_length
        self.ends = np.cumsum(self.dataset.sequence_lengths.astype(np.int64))
        self.num_samples = max(0, (int(self.ends[-1]) - 1) // seq_length) if len(self.ends) else 0

    def window(self, sample: int) -> torch.Tensor:
        start, length = sample * self.seq_length, self.seq_length + 1
        doc = int(np.searchsorted(self.ends, start, side="right"))
        pieces = []
        while length > 0:
            doc_start = int(self.ends[doc - 1]) if doc else 0
            offset = start - doc_start
            take = min(length, int(self.ends[doc]) - start)
            pieces.append(self.dataset.get(doc, offset=offset, length=take))
            start, length, doc = start + take, length - take, doc + 1
        return torch.from_numpy(np.concatenate(pieces).astype(np.int64))


@dataclass(frozen=True)
class BatchOrder:
    """Which samples each rank sees: a pure function of (step, micro-step, rank), so a resumed run
    reads exactly the batches an uninterrupted one would."""

    num_samples: int
    micro_batch_size: int
    accumulation: int
    data_parallel: int
    seed: int

    def samples(self, step: int, micro: int, rank: int) -> list[int]:
        per_step = self.micro_batch_size * self.accumulation * self.data_parallel
        first = step * per_step + (micro * self.data_parallel + rank) * self.micro_batch_size
        return [self._shuffled(g) for g in range(first, first + self.micro_batch_size)]

    def _shuffled(self, global_index: int) -> int:
        epoch, position = divmod(global_index, self.num_samples)
        return int(_permutation(self.num_samples, self.seed + epoch)[position])


_PERMUTATIONS: dict[tuple[int, int], np.ndarray] = {}


def _permutation(n: int, seed: int) -> np.ndarray:
    if (n, seed) not in _PERMUTATIONS:
        _PERMUTATIONS.clear()
        _PERMUTATIONS[n, seed] = np.random.default_rng(seed).permutation(n)
    return _PERMUTATIONS[n, seed]


def batch(stream: TokenStream, samples: list[int]) -> torch.Tensor:
    """[len(samples), seq_length + 1] token ids."""
    return torch.stack([stream.window(s) for s in samples])


# ---- a corpus for a command (eval, calibration, LiGO) -------------------------------------------------
@contextlib.contextmanager
def corpus_streams(data: str, tokenizer: Path, seq_length: int, valid_fraction: float = 0.05,
                   max_bytes: int = 4_000_000) -> Iterator[tuple[TokenStream, TokenStream]]:
    """(train, valid) token streams of `data`: a preprocessed .bin/.idx prefix as it is, or any corpus
    (including 'embedded') tokenized into a temporary indexed dataset for the duration."""
    if data != EMBEDDED and Path(f"{data}_train.idx").is_file():
        yield TokenStream(f"{data}_train", seq_length), TokenStream(f"{data}_valid", seq_length)
        return
    with tempfile.TemporaryDirectory(prefix="scalegrow-data-") as tmp:
        prefix = Path(tmp) / "corpus"
        build_indexed(load_documents(data, max_bytes), load_tokenizer(tokenizer), prefix, valid_fraction)
        yield TokenStream(f"{prefix}_train", seq_length), TokenStream(f"{prefix}_valid", seq_length)


TOKENIZERS = ("tokenizer.model", "tokenizer.json")  # sentencepiece first: what scalegrow's own runs ship


def tokenizer_near(checkpoint: str | Path) -> Path | None:
    """The tokenizer shipped with a checkpoint (an export, an HF directory, or a run's checkpoints/data
    directory): a sentencepiece tokenizer.model, else a Hugging Face tokenizer.json."""
    root = Path(checkpoint)
    for where in (root, root.parent / "export", root.parent / "data"):
        for name in TOKENIZERS:
            if (where / name).is_file():
                return where / name
    return None


# Files that travel with the weights from a checkpoint to what is written from it: the tokenizer in
# every spelling transformers (4 and 5) and sentencepiece save it, its chat templates, generation settings
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                        "merges.txt", "chat_template.jinja", "chat_template.json")
COMPANION_FILES = ("tokenizer.model", "tokenizer.json", *TOKENIZER_SIDE_FILES, "generation_config.json")
TEMPLATE_DIR = "additional_chat_templates"  # transformers' named chat templates, one .jinja each


def companion_files(checkpoint: str | Path, tokenizer: str | None = None) -> dict[str, Path]:
    """The tokenizer (and generation config) files a checkpoint written from `checkpoint` carries
    (name -> path; a name may be under `additional_chat_templates/`): those in its directory, else
    the tokenizer a training run keeps near it, else `tokenizer` (given by the user)."""
    root = Path(checkpoint)
    found = _present(root, COMPANION_FILES)
    if any(name in found for name in TOKENIZERS):
        return found
    near = tokenizer_near(root) or (Path(tokenizer) if tokenizer else None)
    return {**found, **(tokenizer_bundle(near) if near else {})}


def tokenizer_bundle(tokenizer: Path) -> dict[str, Path]:
    """A tokenizer file and the HF files that belong to it (its config, special tokens, chat templates)."""
    out = {tokenizer.name: tokenizer}
    if tokenizer.suffix == ".json":
        out.update(_present(tokenizer.parent, TOKENIZER_SIDE_FILES))
    return out


def _present(root: Path, names: tuple[str, ...]) -> dict[str, Path]:
    found = {name: root / name for name in names if (root / name).is_file()}
    if "chat_template.jinja" in names:
        found.update({f"{TEMPLATE_DIR}/{p.name}": p for p in sorted((root / TEMPLATE_DIR).glob("*.jinja"))})
    return found


def source_tokenizer(src_path, tokenizer: str | None) -> Path:
    """--tokenizer, else the tokenizer that ships with the checkpoint."""
    found = Path(tokenizer) if tokenizer else tokenizer_near(src_path)
    if found is None or not found.exists():
        raise InputError(f"--tokenizer: {src_path} ships no tokenizer (tokenizer.model or tokenizer.json); "
                         f"pass the source's tokenizer")
    return found
