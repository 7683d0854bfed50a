"""Stress case: embedding-like sparse gradients. Most rows get an exactly-zero gradient most steps,
a few rows are hot, and rare rows arrive with gradients 100x larger than the hot ones, so one
quantization block mixes moments of very different sizes. Each optimizer trains the same table
from the same gradients; we report whether anything became non-finite, the largest single-step
update relative to lr (Adam's update is about lr per element; a blow-up shows as >> 1), and the
distance to fp32 AdamW's table relative to how far fp32 AdamW moved.

    python benchmarks/stress_sparse.py --quick
    python benchmarks/stress_sparse.py --steps 2000 --out benchmarks/results/stress_sparse_cpu.json
"""
from __future__ import annotations

import argparse

import torch

from benchlib import save
from lowbit_adamw.memory import OPTIMIZERS, make_optimizer

NAMES = ("adamw", "bnb_8bit", "torchao_8bit", "lowbit_8bit", "torchao_4bit", "lowbit_4bit")


def gradients(rows, dim, steps, seed=0):
    """Deterministic stream: 1% hot rows active every step, 0.2% random rare rows per step with 100x gradients."""
    g = torch.Generator().manual_seed(seed)
    hot = torch.randperm(rows, generator=g)[: rows // 100]
    for _ in range(steps):
        grad = torch.zeros(rows, dim)
        grad[hot] = torch.randn(len(hot), dim, generator=g) * 1e-3
        rare = torch.randint(0, rows, (max(rows // 500, 1),), generator=g)
        grad[rare] = torch.randn(len(rare), dim, generator=g) * 1e-1
        yield grad


def run(name, rows, dim, steps, lr):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(rows, dim)
    start = emb.weight.detach().clone()
    opt = make_optimizer(name, emb, lr=lr)
    worst, finite = 0.0, True
    for grad in gradients(rows, dim, steps):
        before = emb.weight.detach().clone()
        emb.weight.grad = grad
        opt.step()
        delta = (emb.weight.detach() - before).abs().max().item()
        finite &= bool(torch.isfinite(emb.weight).all())
        worst = max(worst, delta / lr)
    return emb.weight.detach().clone(), start, dict(optimizer=name, label=OPTIMIZERS[name], finite=finite, max_update_over_lr=worst)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 steps")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optimizers", default=",".join(NAMES), help="adamw first: the others are compared with it")
    ap.add_argument("--out")
    args = ap.parse_args()
    steps = 300 if args.quick else args.steps
    results, ref = [], None
    for name in args.optimizers.split(","):
        try:
            w, start, r = run(name, args.rows, args.dim, steps, args.lr)
        except ImportError as e:
            print(f"skip {name}: {e}")
            continue
        if name == "adamw":
            ref = w
        if ref is not None:
            r["distance_to_fp32_adamw"] = ((w - ref).norm() / (ref - start).norm()).item()
        results.append(r)
        print(f"{r['label']:<26} finite {r['finite']}  max update {r['max_update_over_lr']:.2f} x lr  "
              f"distance to fp32 AdamW {r.get('distance_to_fp32_adamw', float('nan')):.4f}")
    save(args.out, dict(rows=args.rows, dim=args.dim, steps=steps, lr=args.lr, results=results))


if __name__ == "__main__":
    main()
