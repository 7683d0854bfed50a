"""A plain PyTorch training loop with lowbit-adamw: tiny Llama, cosine schedule, grad clipping,
optional bf16 autocast (or fp16 with GradScaler on CUDA). Offline; CPU or GPU.

    python recipes/plain_loop.py --steps 100
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from recipe_utils import byte_windows, memory_summary, tiny_llama
from lowbit_adamw import AdamW8bit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(seed=0).to(device)
    examples = byte_windows(256)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = AdamW8bit([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                    lr=args.lr, betas=(0.9, 0.95), fp32_state=[torch.nn.Embedding], model=model)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    scaler = torch.amp.GradScaler(device, enabled=args.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    for step in range(args.steps):
        i = (step * args.batch) % (len(examples) - args.batch)
        batch = examples[i:i + args.batch]
        ids = torch.stack([e["input_ids"] for e in batch]).to(device)
        autocast = torch.autocast(device, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        model.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
    print(f"memory: {memory_summary(opt)}")


if __name__ == "__main__":
    main()
