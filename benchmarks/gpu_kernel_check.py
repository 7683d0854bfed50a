"""GPU check of the fused kernel at Llama-2-7B tensor shapes: correctness against the PyTorch step, and
achieved bandwidth against a device-to-device copy measured in the same run.

    python benchmarks/gpu_kernel_check.py [--layers 32] [--dtype bf16] [--out benchmarks/results/gpu_kernel.json]
    python benchmarks/gpu_kernel_check.py --sweep     # also time blocks per program x num_warps, aligned vs general

Bytes the step must move per element: read+write param (2x4 fp32 / 2x2 bf16), read grad (4 / 2), read+write
two codes (4) and absmax (2 x 2 x 4 / block_size): 16.06 B for fp32 params, 10.06 for bf16. The launch
shape the optimizer uses was chosen from static figures (benchmarks/kernel_report.py --sweep); --sweep
confirms or overturns that choice on a real GPU in one command (set LOWBIT_ADAMW_BLOCKS_PER_PROGRAM /
LOWBIT_ADAMW_NUM_WARPS to the winner). Under TRITON_INTERPRET=1 on the CPU it runs a tiny shape set as a
smoke test (--smoke).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchlib import machine, step_bytes_per_param
from lowbit_adamw import StepScalars, adamw8bit_step
from lowbit_adamw import format as fmt
from lowbit_adamw.step import kernel_launch

LLAMA7B = dict(vocab=32000, dim=4096, ffn=11008)


def llama_shapes(layers, vocab, dim, ffn):
    shapes = [(vocab, dim)]
    for _ in range(layers):
        shapes += [(dim, dim)] * 4 + [(ffn, dim), (ffn, dim), (dim, ffn)]
    return shapes + [(vocab, dim)]  # norms keep fp32 state and are not the kernel's concern


def make(shapes, dtype, device):
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    states = []
    for p in params:
        s = {"step": torch.tensor(0.0)}
        for name in ("exp_avg", "exp_avg_sq"):
            s[name + "_codes"], s[name + "_absmax"] = fmt.quantize_blockwise(torch.zeros(p.numel(), device=device), fmt.is_signed(name))
        states.append(s)
    return params, grads, states


def timer(device):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=5, rep=50, return_mode="median")

    def cpu(fn):
        t = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t)

    return cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for the interpreter")
    ap.add_argument("--sweep", action="store_true", help="time blocks per program x num_warps, aligned and general")
    ap.add_argument("--out")
    args = ap.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # smoke: few blocks (the interpreter pays per program), a vocabulary that ends in a short block
    shapes = llama_shapes(1, 97, 64, 100) if args.smoke else llama_shapes(args.layers, **LLAMA7B)
    sc = StepScalars(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    bench = timer(device)

    # correctness on the first few tensors: kernel vs PyTorch step (the spec makes them bit-identical)
    small = shapes[:3]
    a, b = make(small, dtype, device), make(small, dtype, device)
    for (pa, pb) in zip(a[0], b[0]):
        pb.copy_(pa)
    for (ga, gb) in zip(a[1], b[1]):
        gb.copy_(ga)
    for s in a[2] + b[2]:
        s["step"] += 1
    adamw8bit_step(*a, sc, backend="torch")
    adamw8bit_step(*b, sc, backend="triton")
    max_code_diff = max((x[k].int() - y[k].int()).abs().max().item() for x, y in zip(a[2], b[2]) for k in x if k.endswith("_codes"))
    max_param_diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a[0], b[0]))
    del a, b

    params, grads, states = make(shapes, dtype, device)
    n = sum(p.numel() for p in params)
    bytes_per = step_bytes_per_param(params[0].element_size())
    cache = {}

    def step(**kw):
        for s in states:
            s["step"] += 1
        kernel_launch.triton_step_8bit(params, grads, states, sc, block_size=fmt.DEFAULT_BLOCK_SIZE, plan_cache=cache, **kw)

    if device == "cuda":
        src = torch.empty(int(n * bytes_per / 2), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = bench(lambda: dst.copy_(src))
        step_ms = bench(step)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        step_ms, copy_ms, extra = bench(step), float("nan"), 0
    moved = n * bytes_per
    sweep = []
    if args.sweep:
        for bpp in (4, 8, 16):
            for warps in (2, 4, 8):
                for general in (False, True):
                    ms = bench(lambda: step(blocks_per_program=bpp, num_warps=warps, force_general=general))
                    sweep.append(dict(blocks_per_program=bpp, num_warps=warps, variant="general" if general else "aligned",
                                      step_ms=ms, step_GBps=moved / ms / 1e6,
                                      chosen=(bpp, warps, general) == (kernel_launch.default_blocks_per_program(fmt.DEFAULT_BLOCK_SIZE),
                                                                       kernel_launch.default_num_warps(), False)))
                    print(f"bpp {bpp:2d} warps {warps} {sweep[-1]['variant']:8} {ms:8.3f} ms {sweep[-1]['step_GBps']:8.1f} GB/s"
                          + ("  <- default" if sweep[-1]["chosen"] else ""))
    result = dict(
        dtype=args.dtype, params=n, tensors=len(shapes), step_ms=step_ms, copy_ms=copy_ms,
        step_GBps=moved / step_ms / 1e6, copy_GBps=moved / copy_ms / 1e6, fraction_of_copy=copy_ms / step_ms,
        peak_extra_bytes_in_step=extra, max_code_diff_vs_torch=max_code_diff, max_param_diff_vs_torch=max_param_diff,
        sweep=sweep, **machine(),
    )
    if device != "cuda":
        result["device"] = "cpu (interpreter smoke)"
    print(json.dumps({k: v for k, v in result.items() if k != "sweep"}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
