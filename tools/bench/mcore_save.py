"""megatron-core's own torch_dist save of a checkpoint's model: the baseline for scalegrow's writer.

    python tools/bench/mcore_save.py SRC DST

Builds megatron-core's GPTModel (local spec, CPU, one process: the test suite's oracle set-up in
tests/mcore.py), loads SRC's tensors into it, and times `dist_checkpointing.save` with the
torch_dist strategy on two threads to the bytes being on disk (`sync`). The model is in memory
before the clock starts: what is timed is the save alone, which favours megatron-core. Prints one
JSON line: seconds, bytes written, and the data files megatron-core wrote.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def main() -> None:
    import mcore
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from scalegrow.formats.registry import open_checkpoint

    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    mcore.init_parallel(1, 1)
    ckpt = open_checkpoint(src)
    model = mcore.build_gpt(ckpt.config)
    mcore.load_strict(model, ckpt.state_dict(clone=False), fill_extra_state=True)
    state = {"model": model.sharded_state_dict(), "args": ckpt.args, "checkpoint_version": 3.0, "iteration": 1}
    dst.mkdir(parents=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_checkpointing.save(state, str(dst), sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1,
                                                                                               thread_count=2))
    os.sync()
    seconds = time.perf_counter() - start
    files = sorted(p.name for p in dst.iterdir())
    print(json.dumps({"save_seconds": round(seconds, 2), "bytes": sum(p.stat().st_size for p in dst.iterdir()),
                      "files": files}))


if __name__ == "__main__":
    main()
