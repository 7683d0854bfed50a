"""One optimizer step over a Llama-shaped parameter set: lowbit AdamW8bit vs torch AdamW (fused,
foreach) and bitsandbytes / torchao AdamW8bit when installed. Interleaved rounds, warm-up first,
medians and ratios to torch fused.

    python benchmarks/step_speed.py [--dim 512 --layers 8 --vocab 32000] [--dtype fp32] [--rounds 7] [--out ...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from lowbit_adamw import AdamW8bit


def llama_params(dim, layers, vocab, ffn, dtype, device):
    shapes = [(vocab, dim)]
    for _ in range(layers):
        shapes += [(dim,)] + [(dim, dim)] * 4 + [(dim,)] + [(ffn, dim)] * 2 + [(dim, ffn)]
    shapes += [(dim,), (vocab, dim)]
    return [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]


def candidates():
    out = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "lowbit AdamW8bit": lambda ps: AdamW8bit(ps),  # auto: compiled on CPU, Triton on CUDA
        "lowbit AdamW8bit eager": lambda ps: AdamW8bit(ps, backend="torch"),
    }
    try:
        import bitsandbytes as bnb

        out["bnb AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps)
    except Exception:
        pass
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        out["torchao AdamW8bit"] = lambda ps: AoAdamW8bit(ps)
    except Exception:
        pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", help="comma-separated subset of optimizer names")
    ap.add_argument("--out")
    args = ap.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cands = candidates()
    if args.only:
        cands = {k: v for k, v in cands.items() if any(s.strip() in k for s in args.only.split(","))}
    else:  # the eager variant is opt-in: its allocator churn slows whatever runs next by up to 1.7x here
        cands = {k: v for k, v in cands.items() if "eager" not in k}
    runs = {}
    for name, make in cands.items():
        torch.manual_seed(0)
        ps = llama_params(args.dim, args.layers, args.vocab, int(args.dim * 8 / 3) // 64 * 64, dtype, device)
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        runs[name] = (ps, make(ps))
    n = sum(p.numel() for p in next(iter(runs.values()))[0])
    times = {k: [] for k in runs}
    for r in range(args.rounds + 2):  # two warm-up rounds (state creation, compilation)
        for name, (_, opt) in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    base = med.get("torch AdamW fused")
    print(f"{n / 1e6:.1f}M params in {len(next(iter(runs.values()))[0])} tensors, {args.dtype}, {device}, {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"{k:<22}{v:>10.1f} ms{'' if not base else f'{v / base:>8.2f}x fused':>16}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(median_ms=med, params=n, tensors=len(next(iter(runs.values()))[0]), dtype=args.dtype, device=device,
                           device_name=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
                           threads=torch.get_num_threads(), torch=torch.__version__, date=datetime.date.today().isoformat(),
                           command="python benchmarks/step_speed.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v and k != "out")),
                      f, indent=2)


if __name__ == "__main__":
    main()
