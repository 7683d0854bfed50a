"""Convergence: TinyLM (byte-level causal LM) on Python's own stdlib source, one init and one batch
order for every optimizer, at two learning rates: fp32 torch AdamW, bitsandbytes AdamW8bit, torchao
AdamW8bit and AdamW4bit, and lowbit AdamW8bit at 8 and 4 bits. Reports final held-out loss (and its gap to fp32 AdamW) and the curves.

    python benchmarks/convergence.py --quick                 # a few minutes on 2 CPU cores
    python benchmarks/convergence.py --steps 600 --out benchmarks/results/convergence_cpu.json --png benchmarks/results/convergence_cpu.png
"""
from __future__ import annotations

import argparse
import time

import torch

from benchlib import pyplot, save
from lowbit_adamw.memory import OPTIMIZERS, make_optimizer
from lowbit_adamw.tinylm import TinyLM, batches, held_out_loss, token_splits

EARLY = (30, 60)  # held-out loss also at these steps: where 4-bit state trails first
NAMES = ("adamw", "bnb_8bit", "torchao_8bit", "lowbit_8bit", "torchao_4bit", "lowbit_4bit")


def run(name, lr, steps, dim, layers, seq_len, batch, eval_every, seed=0):
    train, val = token_splits()
    torch.manual_seed(seed)
    model = TinyLM(dim=dim, layers=layers, seq_len=seq_len)
    if name.startswith("cand:"):  # a candidate codec (codec_candidates.py), with AdamW8bit's defaults
        from codec_candidates import CodecSim

        opt = CodecSim(model.parameters(), name[5:], lr=lr)
    else:
        opt = make_optimizer(name, model, lr=lr)
    data = batches(train, batch, seq_len, seed=seed)
    curve, evals, t0 = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = next(data)
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if step % eval_every == 0 or step == steps or step in EARLY:
            evals.append((step, held_out_loss(model, val, seq_len)))
    return dict(optimizer=name, label=OPTIMIZERS.get(name, name), lr=lr, seed=seed, train_curve=curve, held_out=evals,
                final_held_out=evals[-1][1], finite=all(c == c and abs(c) != float("inf") for c in curve),
                seconds=time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="150 steps of a smaller model")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--optimizers", default=",".join(NAMES))
    ap.add_argument("--seeds", default="0", help="init and data-order seeds; gaps are reported per seed and averaged")
    ap.add_argument("--out")
    ap.add_argument("--png")
    args = ap.parse_args()
    size = dict(dim=96, layers=3, seq_len=96, batch=16) if args.quick else dict(dim=128, layers=4, seq_len=128, batch=16)
    steps = 150 if args.quick else args.steps
    rows = []
    for seed in (int(x) for x in args.seeds.split(",")):
        for lr in (float(x) for x in args.lrs.split(",")):
            for name in args.optimizers.split(","):
                try:
                    r = run(name, lr, steps, eval_every=max(steps // 10, 1), seed=seed, **size)
                except ImportError as e:
                    print(f"skip {name}: {e}")
                    continue
                base = next((b for b in rows if b["optimizer"] == "adamw" and b["lr"] == lr and b["seed"] == seed), None)
                r["gap_vs_fp32_adamw"] = r["final_held_out"] / base["final_held_out"] - 1 if base else 0.0
                rows.append(r)
                print(f"seed {seed} lr {lr:g}  {r['label']:<28} held-out {r['final_held_out']:.4f}  "
                      f"({100 * r['gap_vs_fp32_adamw']:+.2f}% vs fp32 AdamW)  {1000 * r['seconds'] / steps:.0f} ms/step")
    summary = {}
    for r in rows:
        summary.setdefault(f"{r['optimizer']} lr {r['lr']:g}", []).append(r["gap_vs_fp32_adamw"])
    summary = {k: sum(v) / len(v) for k, v in summary.items()}
    for k, v in summary.items():
        print(f"mean gap vs fp32 AdamW  {k:<26} {100 * v:+.2f}%")
    save(args.out, dict(model=size, steps=steps, results=rows, mean_gap_vs_fp32_adamw=summary))
    if args.png:
        plt = pyplot()
        lrs = sorted({r["lr"] for r in rows})
        fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4), squeeze=False)
        for ax, lr in zip(axes[0], lrs):
            for r in (r for r in rows if r["lr"] == lr and r["seed"] == rows[0]["seed"]):
                xs, ys = zip(*r["held_out"])
                ax.plot(xs, ys, marker="o", ms=3, label=f"{r['label']} ({r['final_held_out']:.3f})")
            ax.set_title(f"TinyLM on stdlib text, lr {lr:g}: held-out loss", fontsize=10)
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
