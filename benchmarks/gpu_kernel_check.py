"""GPU check of the fused kernel at Llama-2-7B tensor shapes: correctness against the PyTorch step, and
achieved bandwidth against a device-to-device copy measured in the same run.

    python benchmarks/gpu_kernel_check.py [--layers 32] [--dtype bf16] [--out benchmarks/results/gpu_kernel.json]

Bytes the step must move per element: read+write param (2x4 fp32 / 2x2 bf16), read grad (4 / 2), read+write
two codes (4) and absmax (2 x 2 x 4 / block_size): 16.06 B for fp32 params, 10.06 for bf16.
Under TRITON_INTERPRET=1 on the CPU it runs a tiny shape set as a smoke test (--smoke).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from lowbit_adamw import StepScalars, adamw8bit_step
from lowbit_adamw import format as fmt

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for the interpreter")
    ap.add_argument("--out")
    args = ap.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = llama_shapes(1, 512, 64, 172) if args.smoke else llama_shapes(args.layers, **LLAMA7B)
    sc = StepScalars(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

    # correctness on the first few tensors: kernel vs PyTorch step
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
    bytes_per = 2 * params[0].element_size() + grads[0].element_size() + 4 + 16 / fmt.DEFAULT_BLOCK_SIZE
    cache = {}

    def step():
        for s in states:
            s["step"] += 1
        adamw8bit_step(params, grads, states, sc, backend="triton", plan_cache=cache)

    if device == "cuda":
        from triton.testing import do_bench

        src = torch.empty(int(n * bytes_per / 2), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
        step_ms = do_bench(step, warmup=5, rep=50, return_mode="median")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        name = torch.cuda.get_device_name()
    else:
        import time

        t = time.perf_counter()
        step()
        step_ms, copy_ms, extra, name = 1000 * (time.perf_counter() - t), float("nan"), 0, "cpu (interpreter smoke)"
    moved = n * bytes_per
    result = dict(
        device=name, dtype=args.dtype, params=n, tensors=len(shapes), step_ms=step_ms, copy_ms=copy_ms,
        step_GBps=moved / step_ms / 1e6, copy_GBps=moved / copy_ms / 1e6, fraction_of_copy=copy_ms / step_ms,
        peak_extra_bytes_in_step=extra, max_code_diff_vs_torch=max_code_diff, max_param_diff_vs_torch=max_param_diff,
        torch=torch.__version__, python=platform.python_version(), date=datetime.date.today().isoformat(),
    )
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
