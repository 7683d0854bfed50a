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


def test_sass_is_counted_per_element_for_every_nvidia_variant(report):
    """The speed model's input: instructions disassembled from each cubin (hot path <= body <= with slow paths),
    per element a thread handles; an empty parse fails here rather than reporting zero."""
    nvidia = [v for v in report["variants"] if v["target"].startswith("sm_")]
    assert nvidia
    for v in nvidia:
        s = v["sass"]
        where = (v["target"], v["bits"], v["dtype"], v["aligned"])
        assert 0 < s["hot"] <= s["main"] <= s["total"], where
        assert s["elements_per_thread"] == v["elements_per_program"] / (v["num_warps"] * 32), where
        assert s["hot_per_element"] == pytest.approx(s["hot"] / s["elements_per_thread"]), where
        assert s["mufu"] > 0, where  # the step's square root at least: a parse that found instructions but not these is wrong


def test_the_speed_model_is_max_of_issue_and_memory_beside_torch_fused(report):
    model = report["speed_model"]
    assert "Static" in report["speed_model_note"]
    gpus = {m["gpu"] for m in model}
    assert gpus == {"H100 SXM", "A100 80GB SXM", "RTX 4090", "RTX 4060 Ti 16GB"}
    for m in model:
        assert m["predicted_ms"] == max(m["issue_ms"], m["memory_ms"])
        assert m["bound"] == ("issue" if m["issue_ms"] > m["memory_ms"] else "memory")
        # the budget is the instruction count at which issuing takes exactly as long as the memory
        assert m["issue_ms"] / m["memory_ms"] == pytest.approx(m["instructions_per_element"] / m["budget_instructions_per_element"])
    h100 = next(m for m in model if m["gpu"] == "H100 SXM" and m["who"] == "lowbit-adamw" and m["bits"] == 8 and m["dtype"] == "bf16")
    # 6.74e9 params x 10.06 B / 3.35 TB/s, and the issue rate 132 SMs x 4 x 1.98 GHz warp instructions per second
    assert h100["memory_ms"] == pytest.approx(6_738_415_616 * 10.0625 / 3.35e12 * 1e3)
    assert h100["budget_instructions_per_element"] == pytest.approx(10.0625 / 3.35e12 * 132 * 4 * 1.98e9 * 32)
    bnb = report["bitsandbytes"]
    if "skipped" in bnb["sm_90"]:
        pytest.skip(f"bitsandbytes' kernel: {bnb['sm_90']['skipped']}")
    assert bnb["sm_90"]["loop_body"] > 100  # decode, update, encode and the binary searches of its tree maps
    row = next(m for m in model if m["gpu"] == "H100 SXM" and m["who"] == "bitsandbytes")
    assert row["bytes_per_param"] == h100["bytes_per_param"] and row["instructions_per_element"] == bnb["sm_90"]["loop_body"]


def test_the_sass_parser_counts_the_hot_path_around_slow_path_calls(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import sass as kr
    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
        /*0010*/                   MUFU.RSQ R2, R3 ;
        /*0020*/              @!P0 BRA 0x60 ;
        /*0030*/                   MOV R4, R2 ;
        /*0040*/                   CALL.REL.NOINC 0xa0 ;
        /*0050*/                   BRA 0x70 ;
        /*0060*/                   FMUL R5, R2, R2 ;
        /*0070*/                   STG.E desc[UR4][R6.64], R5 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
        /*00a0*/                   FADD R2, R2, R4 ;
        /*00b0*/                   RET.REL.NODEC R8 0x0 ;
        /*00c0*/                   NOP;
    """
    counts = kr.sass_counts(kr.parse_sass(sass))
    assert counts == dict(total=11, main=9, hot=6, calls=1, branches=2, mufu=1)
    loop = kr.parse_sass(sass.replace("BRA 0x70 ;", "BRA 0x10 ;"))
    assert kr.loop_body_count(loop) == 5  # 0x10 .. 0x50
    with pytest.raises(ValueError, match="no SASS instructions"):
        kr.sass_counts(kr.parse_sass("code for sm_90\n"))


def test_every_part_the_parts_count_takes_out_is_still_in_the_kernel(tmp_path):
    # benchmarks/kernel_parts.py counts a part by editing it out of a copy of the kernel's source: each edit's
    # anchor must still be there (a renamed line would make the count silently wrong), and each copy must load.
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import kernel_parts

    from lowbit_adamw.kernels import adamw8bit_kernel

    assert os.environ.get("TRITON_INTERPRET") == "1"  # importing the script left the interpreter on

    source = open(kernel_parts.KERNEL_SOURCE).read()
    for i, (part, edits) in enumerate(kernel_parts.PARTS_8BIT.items()):
        kernel = kernel_parts.edited_kernel(source, edits, str(tmp_path), f"part_{i}")
        assert kernel.arg_names == adamw8bit_kernel.arg_names, part
    for steps in (kernel_parts.FORMAT_LADDER, kernel_parts.FORMAT_LADDER_4BIT):
        # the ladder's rungs, as main() builds them: each anchor must survive the edits before it
        for i, (step, edits) in enumerate(kernel_parts.cumulative(steps)):
            kernel = kernel_parts.edited_kernel(source, edits, str(tmp_path), f"ladder{len(steps)}_{i}")
            assert kernel.arg_names == adamw8bit_kernel.arg_names, step
    with pytest.raises(ValueError, match="no longer contains"):
        kernel_parts.edited_kernel(source, [("a line the kernel does not have", "")], str(tmp_path), "missing")


def test_the_shape_sweep_covers_the_optimizers_shape_in_whole_blocks():
    # kernel_parts' sweep asks whether another tile lowers the floor: it must include the shape the optimizer
    # launches, and every shape must be whole quantization blocks with 8, 16 or 32 elements a thread
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import kernel_parts

    from lowbit_adamw import format as fmt
    from lowbit_adamw.step import kernel_launch

    for bits in fmt.BITS:
        block = fmt.default_block_size(bits)
        shapes = kernel_parts.launch_shapes(bits)
        chosen = (kernel_launch.default_blocks_per_program(block), kernel_launch.default_num_warps(False))
        assert chosen in shapes, bits
        per_thread = {bpp * block // (warps * 32) for bpp, warps in shapes}
        assert per_thread == {8, 16, 32}, bits
        assert all(bpp >= 1 and bpp & (bpp - 1) == 0 and bpp * block % (warps * 32) == 0 for bpp, warps in shapes)
        assert {warps for _, warps in shapes} == {1, 2, 4, 8}
