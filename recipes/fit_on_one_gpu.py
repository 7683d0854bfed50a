"""Fit a bigger model on one device: the optimizer step inside backward (gradients freed as they are
used), 8-bit state, activation checkpointing. A tiny Llama built from a config (offline), CPU or GPU.

    python recipes/fit_on_one_gpu.py --steps 50 [--bucket-mb 16] [--no-step-in-backward] [--bf16]

Prints the loss, the optimizer state and the peak memory (CUDA allocator peak on a GPU, process RSS
on the CPU), and the largest amount of gradient memory alive at once during backward.
"""
from __future__ import annotations

import argparse

import torch

from recipe_utils import byte_windows, memory_summary, tiny_llama
from lowbit_adamw import AdamW8bit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bucket-mb", type=float, default=1.0, help="gradient MiB per stepped bucket (default 1 for this tiny model)")
    ap.add_argument("--no-step-in-backward", action="store_true", help="the plain backward(); step() loop, to compare")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights (no autocast, no GradScaler)")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(seed=0, hidden=args.hidden, layers=args.layers, dtype=torch.bfloat16 if args.bf16 else torch.float32).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sib = not args.no_step_in_backward
    opt = AdamW8bit(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fp32_state=[torch.nn.Embedding],
                    model=model, step_in_backward=sib, step_in_backward_bucket_mb=args.bucket_mb)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    params = [p for p in model.parameters() if p.requires_grad]
    peak_grads = [0]

    def watch(_):  # runs after the optimizer's own hook on each parameter
        live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        peak_grads[0] = max(peak_grads[0], live)

    for p in params:
        p.register_post_accumulate_grad_hook(watch)

    examples = byte_windows(512)
    for step in range(args.steps):
        i = (step * args.batch) % (len(examples) - args.batch)
        ids = torch.stack([e["input_ids"] for e in examples[i:i + args.batch]]).to(device)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    total = sum(p.numel() * p.element_size() for p in params)
    print(f"gradients alive at once, at most: {peak_grads[0] / 2**20:.2f} MiB of {total / 2**20:.2f} MiB "
          f"({'step in backward, bucket ' + str(args.bucket_mb) + ' MiB' if sib else 'plain loop'})")
    print(f"memory: {memory_summary(opt)}")


if __name__ == "__main__":
    main()
