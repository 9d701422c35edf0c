import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def mcore():
    """megatron-core initialised for single-process TP1/PP1 use, with the CPU shims."""
    import mcore as oracle

    oracle.init_parallel(1, 1)
    return oracle
