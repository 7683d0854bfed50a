"""How often the fused kernel's tile holds a flat block: one whose v all lie within a factor 2 of the block's
largest, encoded with 8-bit map B (a negative v scale). The Triton kernel skips map B's arithmetic for a tile
(blocks_per_program consecutive blocks of one tensor) without such a block; this counts, on real gradients, how
often a tile has to run it. TinyLM (Python stdlib text) trained by AdamW8bit; counts at a few steps.

    python benchmarks/flat_blocks.py [--steps 800] [--blocks-per-program 8] [--out benchmarks/results/flat_blocks.json]
"""
from __future__ import annotations

import argparse

import torch

from benchlib import save
from lowbit_adamw import AdamW8bit
from lowbit_adamw.tinylm import TinyLM, batches, token_splits


def flat_counts(opt, blocks_per_program: int) -> dict:
    """Flat blocks and tiles holding one, over every tensor with 8-bit state."""
    blocks = flat = tiles = flat_tiles = 0
    for state in opt.state.values():
        if "exp_avg_sq_absmax" not in state:
            continue
        b = state["exp_avg_sq_absmax"] < 0
        pad = (-b.numel()) % blocks_per_program
        t = torch.cat([b, b.new_zeros(pad)]).view(-1, blocks_per_program).any(1)
        blocks, flat, tiles, flat_tiles = blocks + b.numel(), flat + int(b.sum()), tiles + t.numel(), flat_tiles + int(t.sum())
    return dict(blocks=blocks, flat_blocks=flat, tiles=tiles, tiles_with_a_flat_block=flat_tiles)


def run(steps: int, blocks_per_program: int, size: dict, report_at) -> list[dict]:
    torch.manual_seed(0)
    model = TinyLM(**size)
    opt = AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.1)
    data = batches(token_splits()[0], 16, size["seq_len"], seed=0)
    rows = []
    for step in range(1, steps + 1):
        x, y = next(data)
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
        if step in report_at or step == steps:
            rows.append(dict(step=step, **flat_counts(opt, blocks_per_program)))
            r = rows[-1]
            print(f"step {step:5d}: {r['flat_blocks']}/{r['blocks']} blocks flat, {r['tiles_with_a_flat_block']}/{r['tiles']} "
                  f"tiles of {blocks_per_program} blocks hold one", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--blocks-per-program", type=int, default=8, help="the kernel's tile on NVIDIA at 8 bits")
    ap.add_argument("--quick", action="store_true", help="a smaller TinyLM")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    size = dict(dim=64, layers=2, seq_len=64) if args.quick else dict(dim=128, layers=4, seq_len=128)
    rows = run(args.steps, args.blocks_per_program, size, (10, 50, 100, 200, 400, 800, 1600))
    save(args.out, dict(rows=rows, steps=args.steps, blocks_per_program=args.blocks_per_program, model=size))


if __name__ == "__main__":
    main()
