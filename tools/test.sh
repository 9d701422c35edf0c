#!/usr/bin/env bash
# Install everything from nothing (Debian's SLURM daemons, a venv with the tested stack's packages) and
# run the whole test suite: unit tests, multi-process megatron-core checks, DeepSpeed runs, a SLURM job.
# Then, where a second Python of the other tested stack is on this machine (3.12 beside 3.11, or 3.11
# beside 3.12), the oracle tests on that stack too, in .venv-py3.N (its wheels stay in pip's cache).
#   SCALEGROW_STACKS=one   run only the first stack
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/system_deps.sh
# the oracle tests: megatron-core parity and loads, torch_dist, Hugging Face, MoE, training's export,
# the install, the corpus, HybridModel, scaled rope and sliding windows
ORACLE=(tests/test_parity.py tests/test_megatron_load.py tests/test_torch_dist.py tests/test_hf.py
        tests/test_moe.py tests/test_training.py tests/test_install.py tests/test_corpus.py
        tests/test_hybrid.py tests/test_rope.py tests/test_sliding.py tests/test_post_norm_families.py
        tests/test_moe_layouts.py tests/test_fp8.py tests/test_deepseek_routing.py tests/test_mla.py
        tests/test_deepseek_hf.py)
(
  source tools/venv.sh
  python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
)
[ "${SCALEGROW_STACKS:-}" = one ] && exit 0
first="$( (source tools/venv.sh >/dev/null 2>&1; python -c 'import sys; print(sys.version_info[1])') )"
if [ "$first" -ge 12 ]; then want=11; else want=12; fi
second=""
for c in "python3.$want" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3."$want".*/bin/python3; do
  if "$c" -c "import sys; assert sys.version_info[:2] == (3, $want)" >/dev/null 2>&1; then second="$c"; break; fi
done
if [ -z "$second" ]; then
  echo "no Python 3.$want here: the other tested stack was not run" >&2
  exit 0
fi
echo "the other tested stack: Python 3.$want ($second), oracle tests" >&2
SCALEGROW_PYTHON="$second" SCALEGROW_VENV="$PWD/.venv-py3.$want" bash -c \
  'source tools/venv.sh && exec python -m pytest -q -n 2 --dist loadfile --durations=10 "$@"' _ "${ORACLE[@]}"
