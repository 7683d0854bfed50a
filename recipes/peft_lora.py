"""LoRA fine-tuning of a tiny Llama with PEFT and lowbit-adamw (needs `pip install peft`). Offline.

LoRA factors are small (rank x width), so the default min_8bit_size=4096 would keep many of them
in fp32 state; this recipe lowers it so every adapter gets 8-bit state.

    python recipes/peft_lora.py --steps 60
"""
from __future__ import annotations

import argparse

import torch

from recipe_utils import byte_windows, memory_summary, tiny_llama
from lowbit_adamw import AdamW8bit


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args(argv)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("this recipe needs peft: pip install peft")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = AdamW8bit(trainable, lr=args.lr, weight_decay=0.0, min_8bit_size=256, block_size=64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    examples = byte_windows(256)
    for step in range(args.steps):
        i = (step * 8) % (len(examples) - 8)
        ids = torch.stack([e["input_ids"] for e in examples[i:i + 8]]).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"memory: {memory_summary(opt)}")


if __name__ == "__main__":
    main()
