"""What ZeRO's flat partitions cost AdamW8bit: quantization blocks that span parameter boundaries, and no
fp32 state for small tensors.

    python benchmarks/zero_blocks.py [--steps 200] [--seeds 3] [--world 2] [--out benchmarks/results/zero_blocks.json]

DeepSpeed ZeRO hands the client optimizer each rank's flat fp32 partition of the parameters (in
``model.parameters()`` order, one tensor per param group and rank), so AdamW8bit's blocks of 256 run across
parameter boundaries: a LayerNorm's tail and a matrix's head share one scale. The same thing is simulated here
in one process (the step is per tensor, so ``world`` partitions in one optimizer is what ``world`` ranks run),
beside AdamW8bit on the parameters themselves, on TinyLM (built-in text):

* ``per-parameter``: AdamW8bit as under DDP (tensors under ``min_8bit_size`` keep fp32 state);
* ``per-parameter, all 8-bit``: ``min_8bit_size=0``, so the only difference to ``flat`` is where blocks start;
* ``flat (ZeRO)``: ``world`` flat partitions;
* fp32 torch AdamW, the reference.

Two measures: the update error against fp32 AdamW with teacher forcing (every variant starts each step
from the reference weights and gradients and keeps its own quantized moments: relative L2 error of the
update, overall and for the worst tensor, mean over steps), and held-out loss after free training over
several seeds (warmup + cosine schedule, gradients clipped to norm 1, as the main job).
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

from benchlib import save
from lowbit_adamw import AdamW8bit
from lowbit_adamw.cli import lr_factor
from lowbit_adamw.tinylm import TinyLM, batches, held_out_loss, token_splits

LR, WARMUP = 2e-3, 18


class Flat:
    """An optimizer over ``world`` flat fp32 partitions of ``params``, as ZeRO-1/2 give it: gradients are
    gathered into the partitions, the optimizer steps them, and the weights are copied back."""

    def __init__(self, params, world, **kw):
        self.params = list(params)
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        size = math.ceil(flat.numel() / world)
        self.parts = [torch.nn.Parameter(flat[i * size:(i + 1) * size].clone()) for i in range(world)]
        self.opt = AdamW8bit(self.parts, **kw)
        self.param_groups = self.opt.param_groups

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        g = torch.cat([p.grad.reshape(-1) for p in self.params])
        start = 0
        for part in self.parts:
            part.grad = g[start:start + part.numel()].clone()
            start += part.numel()
        self.opt.step()
        flat = torch.cat([part.detach() for part in self.parts])
        start = 0
        for p in self.params:
            p.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()

    def load_weights(self):
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            start = 0
            for part in self.parts:
                part.copy_(flat[start:start + part.numel()])
                start += part.numel()


def variants(world):
    return {
        "per-parameter": lambda ps: AdamW8bit(ps, lr=LR),
        "per-parameter, all 8-bit": lambda ps: AdamW8bit(ps, lr=LR, min_8bit_size=0),
        "flat (ZeRO)": lambda ps: Flat(ps, world, lr=LR, min_8bit_size=0),
    }


def schedule(opt, steps):
    """The main job's schedule (warmup, cosine decay to a tenth)."""
    return torch.optim.lr_scheduler.LambdaLR(opt.opt if isinstance(opt, Flat) else opt, lambda i: lr_factor(i, steps, WARMUP))


def update_error(steps, world, seed=0):
    """Teacher forcing along fp32 AdamW's trajectory: per variant, the mean over steps of the relative L2
    error of its update (all parameters, and the worst single tensor)."""
    train, _ = token_splits()
    torch.manual_seed(seed)
    ref = TinyLM()
    names = [n for n, _ in ref.named_parameters()]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    ref_sched = schedule(ref_opt, steps)
    models, opts, scheds = {}, {}, {}
    for name, make in variants(world).items():
        models[name] = TinyLM()
        models[name].load_state_dict(ref.state_dict())
        opts[name] = make(list(models[name].parameters()))
        scheds[name] = schedule(opts[name], steps)
    data = batches(train, 16, 128, seed)
    errors = {name: [] for name in models}
    worst = {name: [] for name in models}
    for _ in range(steps):
        x, y = next(data)
        ref_opt.zero_grad(set_to_none=True)
        ref.loss(x, y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        before = [p.detach().clone() for p in ref.parameters()]
        ref_opt.step()
        ref_sched.step()
        ref_upd = [p.detach() - b for p, b in zip(ref.parameters(), before)]
        for name, model in models.items():
            with torch.no_grad():
                for p, b, r in zip(model.parameters(), before, ref.parameters()):
                    p.copy_(b)
                    p.grad = r.grad.clone()
            if isinstance(opts[name], Flat):
                opts[name].load_weights()
            opts[name].step()
            scheds[name].step()
            upd = [p.detach() - b for p, b in zip(model.parameters(), before)]
            num = sum(((u - r) ** 2).sum() for u, r in zip(upd, ref_upd))
            den = sum((r ** 2).sum() for r in ref_upd)
            errors[name].append(math.sqrt(num / den))
            per = [((u - r).norm() / r.norm()).item() if r.norm() > 0 else 0.0 for u, r in zip(upd, ref_upd)]
            worst[name].append(max(zip(per, names)))
    out = {}
    for name in models:
        tensor_means = {}
        for e, n in worst[name]:
            tensor_means.setdefault(n, []).append(e)
        top = max(tensor_means.items(), key=lambda kv: len(kv[1]))
        out[name] = dict(update_error=statistics.mean(errors[name]),
                         worst_tensor_error=statistics.mean(e for e, _ in worst[name]),
                         most_often_worst=top[0])
    return out


def convergence(steps, seeds, world):
    train, val = token_splits()
    makes = dict(variants(world), **{"torch AdamW (fp32)": lambda ps: torch.optim.AdamW(ps, lr=LR)})
    out = {name: [] for name in makes}
    for seed in range(seeds):
        for name, make in makes.items():
            torch.manual_seed(seed)
            model = TinyLM()
            opt = make(list(model.parameters()))
            sched = schedule(opt, steps)
            data = batches(train, 16, 128, seed)
            for _ in range(steps):
                x, y = next(data)
                opt.zero_grad(set_to_none=True)
                model.loss(x, y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
            out[name].append(held_out_loss(model, val, 128))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="20 teacher-forced steps, 1 seed of 20 steps")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds = 20, 1
    errors = update_error(args.steps, args.world)
    print(f"update error against fp32 AdamW, teacher-forced, {args.steps} steps (world {args.world}):")
    for name, r in errors.items():
        print(f"  {name:<26} {100 * r['update_error']:6.2f}%   worst tensor {100 * r['worst_tensor_error']:6.2f}% "
              f"(most often {r['most_often_worst']})")
    held = convergence(args.steps, args.seeds, args.world)
    base = held["torch AdamW (fp32)"]
    print(f"held-out loss after {args.steps} steps, {args.seeds} seeds:")
    gaps = {}
    for name, losses in held.items():
        gaps[name] = [100 * (x / b - 1) for x, b in zip(losses, base)]
        print(f"  {name:<26} {statistics.mean(losses):.4f}   vs fp32 " + ", ".join(f"{g:+.2f}%" for g in gaps[name]))
    if args.out:
        save(args.out, dict(steps=args.steps, seeds=args.seeds, world=args.world,
                            update_error=errors, held_out=held, held_out_gap_percent=gaps))


if __name__ == "__main__":
    main()
