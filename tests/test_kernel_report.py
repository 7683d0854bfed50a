"""The GPU step proven without a GPU: the kernel report compiles the default variants for real targets
(NVIDIA sm_80/sm_90, AMD gfx90a/gfx942) and reads their assembly (benchmarks/kernel_report.py)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kr") / "report.json"
    # the report is of the default launch shapes: the suite's interpreter knobs must not reach it
    knobs = ("TRITON_INTERPRET", "LOWBIT_ADAMW_BLOCKS_PER_PROGRAM", "LOWBIT_ADAMW_NUM_WARPS")
    env = {k: v for k, v in os.environ.items() if k not in knobs}
    r = subprocess.run([sys.executable, "-P", os.path.join(ROOT, "benchmarks", "kernel_report.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "static figures" in r.stdout
    return json.loads(out.read_text())


def test_every_default_variant_compiles_for_every_target(report):
    got = {(v["target"], v["bits"], v["dtype"], v["aligned"]) for v in report["variants"]}
    assert got == {(t, b, d, a) for t in ("sm_80", "sm_90", "gfx90a", "gfx942") for b in (8, 4) for d in ("fp32", "bf16")
                   for a in (True, False)}
    assert "not timings" in report["note"]


def test_aligned_variants_move_data_in_vectors_only_and_nothing_spills(report):
    for v in report["variants"]:
        where = (v["target"], v["dtype"], v["aligned"])
        assert v["spill_bytes"] == 0, where
        if v["aligned"]:
            assert v["scalar_8_16_bit_global_ops"] == 0, (where, v["global_memory_ops"])
            assert any(k in v["global_memory_ops"] for k in ("ld.v4.b32", "global_load_dwordx4")), where
        else:  # the general variant takes any offset: byte-wide code accesses (what the aligned one avoids)
            assert v["scalar_8_16_bit_global_ops"] > 0, where


def test_bytes_per_param_and_floors(report):
    bf16 = next(v for v in report["variants"] if v["target"] == "sm_90" and v["dtype"] == "bf16" and v["aligned"] and v["bits"] == 8)
    bf16_4 = next(v for v in report["variants"] if v["target"] == "sm_90" and v["dtype"] == "bf16" and v["aligned"] and v["bits"] == 4)
    assert bf16_4["bytes_per_param"] == pytest.approx(2 * 2 + 2 + 2 * (1 + 8 / 128))
    assert bf16["bytes_per_param"] == pytest.approx(2 * 2 + 2 + 2 * (2 + 8 / 256))
    h100 = bf16["floors"][0]
    assert h100["gpu"].startswith("H100") and h100["llama2_7b_step_ms"] == pytest.approx(6_738_415_616 * 10.0625 / 3.35e12 * 1e3)
    assert h100["torch_fused_fp32_state_ms"] > 2 * h100["llama2_7b_step_ms"]  # 22 vs 10.06 bytes per parameter
    assert 0 < bf16["occupancy"] <= 1 and bf16["registers"] <= 255
