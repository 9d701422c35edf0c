"""What each worker wrote, left beside its files for the one that completes the checkpoint.

    DIR/.receipt-{rank}_{worker}.json      [record, ...] in the format's own terms

Formats whose tensors have planned places are written by several workers and ranks at once (each
computing its own layers); the index (HF's `model.safetensors.index.json`, torch_dist's
`.metadata`) is written once, by the process that completes the checkpoint, from these receipts.
They travel through the output directory itself, which every rank shares, and are gone when the
checkpoint is complete. JSON, not pickle: nothing but lists, strings and numbers is read back.
"""
from __future__ import annotations

import json
from pathlib import Path

PREFIX = ".receipt-"


def leave(root: Path, name: str, records: list) -> None:
    """This worker's records; written whole, then renamed, so a receipt is never read half-written."""
    part = root / f"{PREFIX}{name}.json.tmp"
    part.write_text(json.dumps(records))
    part.rename(root / f"{PREFIX}{name}.json")


def collect(root: Path) -> list:
    """Every worker's records, in worker order, and the receipts removed."""
    records = []
    for path in sorted(root.glob(f"{PREFIX}*.json"), key=_order):
        records += json.loads(path.read_text())
        path.unlink()
    return records


def _order(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in path.name[len(PREFIX):-len(".json")].split("_"))
