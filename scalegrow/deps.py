"""Imports of megatron-core, which warns at import time about what it does not need."""
from __future__ import annotations

import importlib
import warnings


def megatron(module: str):
    """`megatron.core.<module>`, imported with megatron-core's "Transformer Engine and Apex are not
    installed" warnings silenced. Without them megatron-core falls back to local implementations of
    fused kernels and optimizers that scalegrow never calls (it uses megatron-core's indexed datasets
    and its list of safe pickle types), so there they are noise. Every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed",
                                category=UserWarning)
        return importlib.import_module(f"megatron.core.{module}")
