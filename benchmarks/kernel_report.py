"""The fused kernel, compiled ahead of time for real GPUs on a machine that has none: static figures.

    python benchmarks/kernel_report.py [--quick] [--targets sm_80,sm_90,gfx90a,gfx942] [--sweep]
                                       [--out benchmarks/results/kernel_report.json] [--ptx-dir benchmarks/results/ptx]

Every variant the optimizer can launch (code width x param dtype x amsgrad x stochastic rounding x EMA x
aligned/general, with the default non-finite rule) is compiled by Triton for each target (no driver needed), and its
assembly is read: global loads/stores by width, registers, spills, shared memory, occupancy at the chosen
launch shape, and the bytes a step moves per parameter. From those bytes and the published memory
bandwidth of a GPU comes a floor for one Llama-2-7B step, beside the same floor for torch's fused AdamW
with fp32 state. These are static figures: what the compiler produced and what the memory system allows,
not timings. --quick: the default variants only (what the test suite runs). --sweep: registers and
occupancy for other blocks-per-program / warp counts of the bf16 default variant.

The speed model (NVIDIA): each variant's cubin is disassembled (the triton wheel's ``cuobjdump -sass``) and its
instructions counted per element a thread handles: ``hot`` the straight-line path (the IEEE square roots' and
divisions' slow-path calls not taken), ``main`` the kernel body with those call sites, ``total`` with the
slow-path subroutines too. At most one warp instruction issues per cycle per SM sub-partition (4 per SM), so a
step of N parameters needs at least ``N * instructions / 32 / (SMs * 4 * clock)`` to issue, beside
``N * bytes / bandwidth`` to move: the predicted step time is the larger (static; stalls, latency and
occupancy are what a GPU timing adds). The same count of bitsandbytes' shipped kernel for the same step
(``kOptimizerStatic8bit2StateBlockwise<bf16, ADAM, 256, 1>`` from its CUDA library's cubin for that
architecture; one element per thread per iteration of its loop, the loop body counted) is its row beside ours.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces @triton.jit: compile for real here

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowbit_adamw import format as fmt  # noqa: E402
from lowbit_adamw.step import kernel_launch  # noqa: E402
from lowbit_adamw.kernels import adamw8bit_kernel, variant_constexprs  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import machine, step_bytes_per_param  # noqa: E402
from sass import bnb_loop_instructions, disassemble, parse_sass, sass_counts  # noqa: E402

# name: (backend, arch, warp size, registers per SM, max warps per SM, shared memory per SM in bytes)
TARGETS = {
    "sm_80": ("cuda", 80, 32, 65536, 64, 164 * 1024),
    "sm_90": ("cuda", 90, 32, 65536, 64, 228 * 1024),
    "gfx90a": ("hip", "gfx90a", 64, None, None, 64 * 1024),
    "gfx942": ("hip", "gfx942", 64, None, None, 64 * 1024),
}
# The speed model's GPUs: published SM count, boost clock (Hz), memory bandwidth (bytes/s), and the target whose
# code we count for it (Ada cards run the sm_80 count: the same instruction set for this kernel) and the
# architecture of bitsandbytes' cubin for it.
ISSUE_GPUS = [
    dict(gpu="H100 SXM", target="sm_90", bnb_arch="sm_90", sms=132, clock=1.98e9, bandwidth=3.35e12),
    dict(gpu="A100 80GB SXM", target="sm_80", bnb_arch="sm_80", sms=108, clock=1.41e9, bandwidth=2.039e12),
    dict(gpu="RTX 4090", target="sm_80", bnb_arch="sm_89", sms=128, clock=2.52e9, bandwidth=1.008e12),
    dict(gpu="RTX 4060 Ti 16GB", target="sm_80", bnb_arch="sm_89", sms=34, clock=2.535e9, bandwidth=0.288e12),
]
ISSUE_PER_SM_PER_CYCLE = 4  # warp instructions: one per sub-partition scheduler
# Published peak memory bandwidths (bytes/s) of the cards each target stands for.
GPUS = {
    "sm_90": [("H100 SXM", 3.35e12)],
    "sm_80": [("A100 80GB SXM", 2.039e12), ("RTX 4090 (sm_89, runs sm_80 code)", 1.008e12)],
    "gfx942": [("MI300X", 5.3e12)],
    "gfx90a": [("MI250X (per GCD: half of 3.2768 TB/s)", 1.6384e12)],
}
LLAMA2_7B_PARAMS = 6_738_415_616
DTYPES = {"fp32": ("*fp32", 4), "bf16": ("*bf16", 2), "fp16": ("*fp16", 2)}
DEFAULT_BLOCK = fmt.DEFAULT_BLOCK_SIZE


def launch_shape(backend: str, bits: int = 8) -> tuple[int, int]:
    """(blocks per program, num_warps) the optimizer launches with on this kind of GPU."""
    return (kernel_launch.default_blocks_per_program(fmt.default_block_size(bits)),
            kernel_launch.default_num_warps(backend == "hip"))


def compile_variant(target: str, dtype: str, amsgrad=False, stochastic=False, ema=False, aligned=True, bpp=None, warps=None,
                    bits=8, kernel=None):
    """Compile one variant for ``target`` (``kernel``: a build of the kernel other than the shipped one, as
    benchmarks/kernel_parts.py makes): (compiled kernel, blocks per program, warps)."""
    kernel = kernel or adamw8bit_kernel
    backend, arch, warp_size = TARGETS[target][:3]
    d_bpp, d_warps = launch_shape(backend, bits)
    bpp, warps = bpp or d_bpp, warps or d_warps
    ptr = DTYPES[dtype][0]
    types = dict(p_base=ptr, g_base=ptr, mc_base="*u8", ma_base="*fp32", vc_base="*u8", va_base="*fp32", xc_base="*u8",
                 xa_base="*fp32", e_base="*fp32", tensor_table="*i64", step_table="*i64", prog_start="*i32",
                 num_tensors="i32", bad_blocks="*i32", decay="fp32", beta1="fp32", one_minus_beta1="fp32", beta2="fp32",
                 one_minus_beta2="fp32", eps="fp32", clip_value="fp32")
    names = kernel.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    # At launch Triton marks pointer arguments 16-byte aligned when they are; torch's allocations always are.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if types.get(n, "").startswith("*")}
    constexprs = variant_constexprs(200, fmt.default_block_size(bits), bpp, amsgrad, False, stochastic, False, ema, True, aligned,
                                    bits, (fmt.M4_LEVELS, fmt.M4_BOUNDS))
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget(backend, arch, warp_size), options=dict(num_warps=warps, enable_fp_fusion=False))
    return compiled, bpp, warps


# ---- reading the assembly ------------------------------------------------------------------------

_PTX_MEM = re.compile(r"^\s*(?:@%p\d+\s+)?(ld|st)\.global((?:\.[a-zA-Z0-9_:]+)*)\s", re.M)


def ptx_memory_ops(ptx: str) -> Counter:
    """Global loads/stores of the PTX by kind, e.g. {'ld.v4.b32': 6, 'st.b8': 0, ...} (static count)."""
    ops = Counter()
    for op, mods in _PTX_MEM.findall(ptx):
        parts = mods.split(".")
        vec = next((p for p in parts if re.fullmatch(r"v\d", p)), None)
        width = next((p for p in parts if re.fullmatch(r"[bsuf]\d+", p)), "?")
        ops[f"{op}.{vec + '.' if vec else ''}{width}"] += 1
    return ops


def scalar_narrow_nvidia(ops: Counter) -> int:
    return sum(n for k, n in ops.items() if k.count(".") == 1 and k.split(".")[1][1:] in ("8", "16"))


_AMD_MEM = re.compile(r"^\s*(global|buffer)_(load|store)_(\w+)", re.M)


def amdgcn_memory_ops(asm: str) -> Counter:
    return Counter(f"{a}_{op}_{w}" for a, op, w in _AMD_MEM.findall(asm))


def scalar_narrow_amd(ops: Counter) -> int:
    return sum(n for k, n in ops.items() if re.search(r"_(u|s)?(byte|short)(_d16(_hi)?)?$", k))


def issue_model(n_params: float, instr_per_element: float, bytes_per_param: float, gpu: dict) -> dict:
    """One GPU's static prediction for a step of ``n_params``: issue time, memory time, the larger, and the
    instructions per element at which the two are equal (the budget)."""
    issue_rate = gpu["sms"] * ISSUE_PER_SM_PER_CYCLE * gpu["clock"]  # warp instructions per second
    issue_ms = n_params * instr_per_element / 32 / issue_rate * 1e3
    memory_ms = n_params * bytes_per_param / gpu["bandwidth"] * 1e3
    return dict(issue_ms=issue_ms, memory_ms=memory_ms, predicted_ms=max(issue_ms, memory_ms),
                bound="issue" if issue_ms > memory_ms else "memory",
                budget_instructions_per_element=memory_ms / 1e3 * issue_rate * 32 / n_params)


def speed_model(rows: list[dict], bnb: dict) -> list[dict]:
    """Per speed-model GPU: each counted default variant of ours (aligned) and bitsandbytes' kernel, predicted
    Llama-2-7B step time beside torch fused AdamW's memory floor."""
    out = []
    for gpu in ISSUE_GPUS:
        for r in rows:
            if r["target"] != gpu["target"] or "sass" not in r or not r["aligned"]:
                continue
            per = r["sass"]["hot_per_element"]
            out.append(dict(gpu=gpu["gpu"], who="lowbit-adamw", target=r["target"], bits=r["bits"], dtype=r["dtype"],
                            amsgrad=r["amsgrad"], stochastic=r["stochastic"], ema=r["ema"], instructions_per_element=per,
                            instructions_per_element_with_slow_paths=r["sass"]["total_per_element"],
                            bytes_per_param=r["bytes_per_param"],
                            torch_fused_fp32_state_ms=LLAMA2_7B_PARAMS * torch_fused_bytes_per_param(r["dtype"]) / gpu["bandwidth"] * 1e3,
                            **issue_model(LLAMA2_7B_PARAMS, per, r["bytes_per_param"], gpu)))
        b = bnb.get(gpu["bnb_arch"], {})
        if "loop_body" in b:
            bpp = bytes_per_param("bf16")  # the same traffic: bf16 weights, 8-bit codes, blocks of 256
            out.append(dict(gpu=gpu["gpu"], who="bitsandbytes", target=gpu["bnb_arch"], bits=8, dtype="bf16", amsgrad=False,
                            stochastic=False, ema=False, instructions_per_element=b["loop_body"] / b["elements_per_thread"],
                            bytes_per_param=bpp,
                            torch_fused_fp32_state_ms=LLAMA2_7B_PARAMS * torch_fused_bytes_per_param("bf16") / gpu["bandwidth"] * 1e3,
                            **issue_model(LLAMA2_7B_PARAMS, b["loop_body"] / b["elements_per_thread"], bpp, gpu)))
    return out


def ptxas_figures(ptx: str, arch: int) -> dict:
    """Registers and spills from ptxas -v, with the ptxas Triton itself uses for this architecture."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    ptxas = tool.path if hasattr(tool, "path") else tool[0]  # triton < 3.4: (path, version)
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={sm}", "-v", path, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", text).group(1))
    return dict(registers=regs, spill_bytes=spill_st + spill_ld, ptxas=os.path.basename(ptxas))


def occupancy_nvidia(target: str, regs: int, warps: int, smem: int) -> dict:
    _, _, _, regs_per_sm, max_warps, smem_per_sm = TARGETS[target]
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = regs_per_sm // per_warp // warps
    by_smem = smem_per_sm // smem if smem else 32
    blocks = min(by_regs, by_smem, 32, max_warps // warps)
    return dict(blocks_per_sm=blocks, occupancy=blocks * warps / max_warps,
                limited_by="registers" if blocks == by_regs else "shared memory" if blocks == by_smem else "warps")


def amd_figures(asm: str) -> dict:
    def grab(pattern, default=0):
        m = re.search(pattern, asm)
        return int(m.group(1)) if m else default

    # spill_bytes: scratch memory per work-item (VGPRs spilled to memory); SGPR spills land in VGPR lanes
    return dict(registers=grab(r"\.vgpr_count:\s+(\d+)"), sgprs=grab(r"\.sgpr_count:\s+(\d+)"),
                spilled_vgprs=grab(r"\.vgpr_spill_count:\s+(\d+)"), spill_bytes=grab(r"; ScratchSize: (\d+)"),
                waves_per_simd=grab(r"; Occupancy: (\d+)"))


# ---- bytes and floors --------------------------------------------------------------------------------

def bytes_per_param(dtype: str, amsgrad=False, ema=False, bits=8) -> float:
    return step_bytes_per_param(DTYPES[dtype][1], amsgrad, ema, fmt.default_block_size(bits), bits)


def torch_fused_bytes_per_param(dtype: str) -> float:
    """torch's fused AdamW with fp32 state: param read+write, grad read, m and v read+write in fp32."""
    e = DTYPES[dtype][1]
    return 3 * e + 16


def floors(target: str, dtype: str, bpp_bytes: float) -> list[dict]:
    out = []
    for gpu, bw in GPUS[target]:
        out.append(dict(gpu=gpu, bandwidth_TBps=bw / 1e12, llama2_7b_step_ms=LLAMA2_7B_PARAMS * bpp_bytes / bw * 1e3,
                        torch_fused_fp32_state_ms=LLAMA2_7B_PARAMS * torch_fused_bytes_per_param(dtype) / bw * 1e3))
    return out


def report_variant(target, dtype, amsgrad=False, stochastic=False, ema=False, aligned=True, bpp=None, warps=None, ptx_dir=None,
                   bits=8):
    kernel, bpp, warps = compile_variant(target, dtype, amsgrad, stochastic, ema, aligned, bpp, warps, bits)
    backend = TARGETS[target][0]
    smem = int(getattr(kernel.metadata, "shared", 0) or 0)
    row = dict(target=target, bits=bits, dtype=dtype, amsgrad=amsgrad, stochastic=stochastic, ema=ema, aligned=aligned,
               block_size=fmt.default_block_size(bits), blocks_per_program=bpp,
               elements_per_program=bpp * fmt.default_block_size(bits), num_warps=warps, shared_bytes=smem)
    if backend == "cuda":
        ptx = kernel.asm["ptx"]
        ops = ptx_memory_ops(ptx)
        row.update(ptxas_figures(ptx, TARGETS[target][1]))
        row.update(occupancy_nvidia(target, row["registers"], warps, smem))
        row["scalar_8_16_bit_global_ops"] = scalar_narrow_nvidia(ops)
        per_thread = row["elements_per_program"] / (warps * TARGETS[target][2])
        counts = sass_counts(parse_sass(disassemble(kernel.asm["cubin"])))
        row["sass"] = dict(counts, elements_per_thread=per_thread,
                           **{f"{k}_per_element": counts[k] / per_thread for k in ("hot", "main", "total")})
        text, ext = ptx, "ptx"
    else:
        asm = kernel.asm["amdgcn"]
        ops = amdgcn_memory_ops(asm)
        row.update(amd_figures(asm))
        row["scalar_8_16_bit_global_ops"] = scalar_narrow_amd(ops)
        text, ext = asm, "amdgcn"
    row["global_memory_ops"] = dict(sorted(ops.items()))
    row["bytes_per_param"] = bytes_per_param(dtype, amsgrad, ema, bits)
    row["floors"] = floors(target, dtype, row["bytes_per_param"])
    if ptx_dir:
        os.makedirs(ptx_dir, exist_ok=True)
        name = f"{target}_{'4bit_' if bits == 4 else ''}{dtype}{'_amsgrad' if amsgrad else ''}{'_sr' if stochastic else ''}{'_ema' if ema else ''}_{'aligned' if aligned else 'general'}.{ext}"
        with open(os.path.join(ptx_dir, name), "w") as f:
            f.write(text)
    return row


def variants(quick: bool):
    if quick:  # the default options at both widths: fp32 and bf16 weights, aligned and general
        for bits in fmt.BITS:
            for dtype in ("fp32", "bf16"):
                for aligned in (True, False):
                    yield dict(dtype=dtype, aligned=aligned, bits=bits)
        return
    for bits in fmt.BITS:
        for dtype in DTYPES:
            for amsgrad in (False, True):
                for stochastic in ((False,) if dtype == "fp32" else (False, True)):  # fp32 weights round exactly
                    for ema in (False, True):
                        for aligned in (True, False):
                            yield dict(dtype=dtype, amsgrad=amsgrad, stochastic=stochastic, ema=ema, aligned=aligned, bits=bits)


def sweep(target: str) -> list[dict]:
    rows = []
    backend = TARGETS[target][0]
    for bpp in (4, 8, 16):
        for warps in (2, 4, 8):
            r = report_variant(target, "bf16", bpp=bpp, warps=warps)
            per_thread = bpp * DEFAULT_BLOCK // (warps * TARGETS[target][2])
            keep = ("blocks_per_program", "elements_per_program", "num_warps", "registers", "spill_bytes", "occupancy",
                    "waves_per_simd", "scalar_8_16_bit_global_ops", "global_memory_ops")
            rows.append({**{k: r[k] for k in keep if k in r}, "elements_per_thread": per_thread,
                         "chosen": (bpp, warps) == launch_shape(backend)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--quick", action="store_true", help="default variants only")
    ap.add_argument("--sweep", action="store_true", help="also sweep blocks per program and warps (bf16, aligned)")
    ap.add_argument("--out", default="benchmarks/results/kernel_report.json")
    ap.add_argument("--ptx-dir", default=None, help="write each variant's PTX / AMDGCN here")
    args = ap.parse_args(argv)
    targets = args.targets.split(",")
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    rows = [report_variant(t, ptx_dir=args.ptx_dir, **v) for t in targets for v in variants(args.quick)]
    bnb = {arch: bnb_loop_instructions(arch) for arch in sorted({g["bnb_arch"] for g in ISSUE_GPUS})}
    model = speed_model(rows, bnb)
    result = dict(
        note="Static figures from ahead-of-time compilation (no GPU was used): instruction counts, registers, "
             "occupancy and bandwidth floors, not timings.",
        machine=machine(), triton=triton.__version__, block_size=DEFAULT_BLOCK, variants=rows,
        sweep={t: sweep(t) for t in targets} if args.sweep else None,
        bitsandbytes=bnb, speed_model=model,
        speed_model_note="Static: Llama-2-7B step = max(issue, memory); issue = params x SASS instructions per element "
                         "/ 32 / (SMs x 4 x boost clock), memory = params x bytes per param / bandwidth.",
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
    )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{'target':7} {'bits':4} {'dtype':5} {'variant':22} {'regs':>4} {'spill':>5} {'occ':>5} {'narrow':>6} {'B/param':>7}  loads/stores")
    for r in rows:
        flags = "+".join(k for k in ("amsgrad", "stochastic", "ema") if r[k]) or "default"
        occ = f"{r['occupancy']:.2f}" if "occupancy" in r else f"{r['waves_per_simd']}w"
        print(f"{r['target']:7} {r['bits']:4d} {r['dtype']:5} {flags + (' aligned' if r['aligned'] else ' general'):22} {r['registers']:4d} "
              f"{r['spill_bytes']:5d} {occ:>5} {r['scalar_8_16_bit_global_ops']:6d} {r['bytes_per_param']:7.2f}  "
              + " ".join(f"{k}:{n}" for k, n in r["global_memory_ops"].items()))
    print()
    print(f"{'GPU':17} {'who':12} {'bits':4} {'dtype':5} {'variant':18} {'instr/el':>8} {'budget':>6} {'issue ms':>8} "
          f"{'memory ms':>9} {'predicted':>9} {'torch fused':>11}")
    for m in model:
        flags = "+".join(k for k in ("amsgrad", "stochastic", "ema") if m[k]) or "default"
        print(f"{m['gpu']:17} {m['who']:12} {m['bits']:4d} {m['dtype']:5} {flags:18} {m['instructions_per_element']:8.1f} "
              f"{m['budget_instructions_per_element']:6.1f} {m['issue_ms']:8.1f} {m['memory_ms']:9.1f} "
              f"{m['predicted_ms']:7.1f} {m['bound'][0]} {m['torch_fused_fp32_state_ms']:11.1f}")
    for arch, b in bnb.items():
        if "skipped" in b:
            print(f"bitsandbytes {arch}: skipped ({b['skipped']})")
    print("static figures (compiled, not run): no GPU timing is implied")
    return result


if __name__ == "__main__":
    main()
