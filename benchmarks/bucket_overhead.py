"""The host cost of a bucket under ``step_in_backward``: backward plus steps in buckets against the plain
``backward(); step()`` loop, on the same tensors, interleaved round by round, medians.

    python benchmarks/bucket_overhead.py                       # 300 tensors of 4K, 16 KiB and 64 MiB buckets
    python benchmarks/bucket_overhead.py --count 300 --numel 4096 --bucket-mb 0.016 64 --rounds 10 [--out J]

Each extra millisecond over the plain loop, divided by the buckets per backward, is a bucket's host work.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchlib import machine, save
from lowbit_adamw import AdamW8bit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--numel", type=int, default=4096)
    ap.add_argument("--bucket-mb", type=float, nargs="+", default=[0.016, 64.0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    init = [torch.randn(args.numel) * 0.02 for _ in range(args.count)]

    def loss(params):
        return sum((p * p).sum() for p in params)

    runs = {}  # name -> (its own copy of the parameters: the hooks of a step in backward free their gradients, optimizer)
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    runs["plain"] = (ps, AdamW8bit(ps))
    for mb in args.bucket_mb:
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        runs[f"in backward, {mb:g} MiB buckets"] = (ps, AdamW8bit(ps, step_in_backward=True, step_in_backward_bucket_mb=mb))
    buckets = {}
    for name, (ps, opt) in runs.items():
        if opt.step_in_backward:  # how many buckets one backward steps
            calls = []
            real = opt._step_params
            opt._step_params = lambda only, *a, _real=real, _calls=calls: (_calls.append(1), _real(only, *a))[1]
            loss(ps).backward()
            buckets[name] = len(calls)
            opt._step_params = real
    samples = {name: [] for name in runs}
    for r in range(args.rounds + 2):
        for name, (ps, opt) in runs.items():
            start = time.perf_counter()
            loss(ps).backward()
            if not opt.step_in_backward:
                opt.step()
                opt.zero_grad()
            if r >= 2:  # two warm-up rounds
                samples[name].append(time.perf_counter() - start)
    info = machine()
    print(f"{args.count} tensors of {args.numel}, {info['cpu_model']}, {info['threads']} threads")
    med = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
    per_bucket = {}
    for name, ms in med.items():
        extra = ""
        if name in buckets:
            per_bucket[name] = (ms - med["plain"]) / buckets[name]
            extra = f"  {buckets[name]} buckets, {per_bucket[name]:.3f} ms more per bucket"
        print(f"{name:32s} {ms:8.1f} ms{extra}")
    save(args.out, dict(median_ms=med, buckets_per_backward=buckets, extra_ms_per_bucket=per_bucket,
                        count=args.count, numel=args.numel, rounds=args.rounds))


if __name__ == "__main__":
    main()
