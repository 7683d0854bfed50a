#!/usr/bin/env bash
# The README's test command: installs pinned CPU torch, the package with its test extras, runs pytest.
# Kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
export LOWBIT_ADAMW_BLOCKS_PER_PROGRAM="${LOWBIT_ADAMW_BLOCKS_PER_PROGRAM:-16}"
# -P: do not put the repo root on sys.path (kernels/ would shadow the PyPI package "kernels").
exec python3 -P -m pytest -q tests "$@"
