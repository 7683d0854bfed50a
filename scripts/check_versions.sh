#!/usr/bin/env bash
# The version claims of pyproject.toml and the README, checked: builds throw-away venvs and runs
#   - the oldest claimed triton: the interpreter tests of the kernel and the NVIDIA kernel report,
#   - the newest torch on the registry: the whole suite.
# Takes about 15 minutes and a few GB of downloads (the newest torch wheel pulls CUDA libraries).
#   bash scripts/check_versions.sh [OLDEST_TRITON] [NEWEST_TORCH]
set -euo pipefail
cd "$(dirname "$0")/.."
old_triton="${1:-3.3.1}"
new_torch="${2:-2.15.0}"
work="${TMPDIR:-/tmp}/lowbit_adamw_versions"
mkdir -p "$work"
export LOWBIT_ADAMW_BLOCKS_PER_PROGRAM=16

echo "== triton $old_triton (with torch 2.13.0)"
python3 -m venv "$work/triton-$old_triton"
"$work/triton-$old_triton/bin/pip" install -q torch==2.13.0 "triton==$old_triton" numpy pytest
"$work/triton-$old_triton/bin/pip" install -q --no-deps -e .
"$work/triton-$old_triton/bin/python" -P -m pytest -q tests/test_kernel_interpret.py tests/test_nonfinite.py
# AMD targets need a ROCm linker that triton bundles only from 3.4 on
"$work/triton-$old_triton/bin/python" -P benchmarks/kernel_report.py --quick --targets sm_80,sm_90 --out "$work/kernel_report_triton-$old_triton.json"

echo "== torch $new_torch"
python3 -m venv "$work/torch-$new_torch"
"$work/torch-$new_torch/bin/pip" install -q "torch==$new_torch"
"$work/torch-$new_torch/bin/pip" install -q -e ".[test]"
TORCHINDUCTOR_CACHE_DIR="$work/inductor-$new_torch" "$work/torch-$new_torch/bin/python" -P -m pytest -q tests
