"""The step's bits do not depend on which of ATen's CPU code paths runs (AVX-512, AVX2, the baseline): the
eager step and the C++ step give one digest over a battery of steps (tests/code_path_battery.py) under every
ATEN_CPU_CAPABILITY this machine can run, and the Triton kernel under the interpreter gives it under the native one.

This is why scripts/test.sh does not rerun tests/test_kernel_interpret.py under the other code paths: the
interpreter computes with numpy whatever ATen's path, and what it is compared with, the eager step, is the
same to the bit under each path (here). The compiled step and the C++ step, whose generated code does
follow the path, are rerun in full."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BATTERY = Path(__file__).with_name("code_path_battery.py")
CAPABILITIES = ("avx512", "avx2", "default")


def _digests(capability: str, backends: str) -> subprocess.Popen:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-P", str(BATTERY), "0", backends], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU code paths: run on a machine without CUDA")
def test_every_backend_gives_the_same_bits_under_every_cpu_code_path():
    native = torch.backends.cpu.get_cpu_capability().lower()
    wanted = [c for c in CAPABILITIES if c == native or c in ("avx2", "default") and native.startswith(("avx2", "avx512"))]
    if native not in CAPABILITIES:  # not x86 (NEON, ...): only the baseline beside it
        wanted = ["default"]
    # The interpreter runs the kernel in numpy, which ATEN_CPU_CAPABILITY does not reach, and what the launch
    # computes in torch beforehand is the shared pre-step the eager backend runs under every path: the Triton
    # battery runs once, under the native path (17 s a path here), the eager and C++ ones under every path.
    runs = {c: _digests(c, "torch,triton,cpp" if c == wanted[0] else "torch,cpp") for c in wanted}
    results = {}
    for capability, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}: {err[-3000:]}"
        results[capability] = json.loads(out.strip().splitlines()[-1])
    # each run took the code path asked for, so the comparison below compares different paths
    assert {c: r["capability"].lower() for c, r in results.items()} == {c: c for c in results}
    for dtype in results[wanted[0]]["digests"]["torch"]:
        digests = {(c, b): d[dtype] for c, r in results.items() for b, d in r["digests"].items() if dtype in d}
        expected = {(c, b) for c in results for b in ("torch", "cpp") if b == "torch" or dtype != "torch.float16"}
        assert set(digests) == expected | {(wanted[0], "triton")}, sorted(digests)  # the C++ step: fp32 and bf16
        assert len(set(digests.values())) == 1, \
            f"{dtype} weights: bits differ between backends or code paths: {digests}"


def test_the_battery_digest_sees_a_changed_input():
    sys.path.insert(0, str(BATTERY.parent))
    import code_path_battery

    assert code_path_battery.battery(0) != code_path_battery.battery(1)
