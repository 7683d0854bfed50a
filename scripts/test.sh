#!/usr/bin/env bash
# The README's test command: installs pinned CPU torch and the package with its test extras, runs the
# whole suite, then runs the numerics tests again under ATen's other CPU code paths (avx2, default; side
# by side), so a machine with AVX-512 also checks what an AVX2-only or a baseline machine computes.
#   bash scripts/test.sh            everything
#   bash scripts/test.sh --quick    without the slow tests (marked in tests/conftest.py)
# Kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without CUDA).
# pytest-xdist spreads the tests over one worker per core; tests/conftest.py keeps the tests of each
# expensive module-scoped fixture on one worker, and runs the multi-rank tests one at a time (--dist loadgroup).
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = "--quick" ]; then
  select=(-m "not slow")
  shift
fi
# pip compiles what it installs one file at a time; compileall does it on every core (about 12 s less on 2 cores).
# A file it cannot compile (pip skips those too) does not stop the run.
python3 -m pip install -q --no-compile torch==2.13.0
# The test extras through uv: ~10 s where pip takes ~30 s on 2 cores. torch==2.13.0 is named again because uv does
# not read pip's configuration (where a machine may keep its CPU wheel): the torch pip installed satisfies it.
# Where uv cannot be had or cannot install into this interpreter, pip does it.
python=$(python3 -c 'import sys; print(sys.executable)')
if ! { python3 -m pip install -q --no-compile uv && python3 -m uv pip install -q --python "$python" -e ".[test]" torch==2.13.0; }; then
  echo "scripts/test.sh: uv did not install the test extras; pip installs them" >&2
  python3 -m pip install -q --no-compile -e ".[test]"
fi
python3 -m compileall -qq -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
export LOWBIT_ADAMW_BLOCKS_PER_PROGRAM="${LOWBIT_ADAMW_BLOCKS_PER_PROGRAM:-16}"
# -P: do not put the repo root on sys.path (kernels/ would shadow the PyPI package "kernels"); the xdist
# workers, which start with it there, drop it in tests/conftest.py.
parallel=(-n "${LOWBIT_ADAMW_TEST_WORKERS:-auto}" --dist loadgroup)
python3 -P -m pytest -q "${parallel[@]}" tests "${select[@]}" "$@"
native=$(python3 -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
reruns=()
for isa in avx2 default; do
  [ "$isa" = "$native" ] || reruns+=("$isa")
done
# The reruns run side by side, the workers shared between them: each alone leaves cores idle while its
# workers start and while its last tests finish.
cores=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
per_rerun=$(( cores / ${#reruns[@]} > 0 ? cores / ${#reruns[@]} : 1 ))
logs="$(mktemp -d)"
pids=()
for isa in "${reruns[@]}"; do
  # inductor's cache does not tell code paths apart: a kernel cached under one crashes under another
  ATEN_CPU_CAPABILITY=$isa TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/lowbit_adamw_inductor_$isa" LOWBIT_ADAMW_NUMERICS_ONLY=1 \
    python3 -P -m pytest -q -n "${LOWBIT_ADAMW_TEST_WORKERS:-$per_rerun}" --dist loadgroup tests -m "numerics and not slow" "$@" \
    >"$logs/$isa.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!reruns[@]}"; do
  wait "${pids[$i]}" || status=1
  echo "== numerics tests with ATEN_CPU_CAPABILITY=${reruns[$i]}"
  cat "$logs/${reruns[$i]}.log"
done
rm -rf "$logs"
exit $status
