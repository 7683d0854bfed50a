"""DeepSpeed ZeRO (stage 1, 2 or 3) with lowbit-adamw's AdamW8bit as the client optimizer.

    torchrun --standalone --nproc-per-node 2 recipes/deepspeed_zero.py --stage 2 --steps 50     # CPU: gloo
    torchrun --standalone --nproc-per-node 8 recipes/deepspeed_zero.py --stage 3 --steps 50     # GPUs: nccl
    torchrun --standalone --nproc-per-node 2 recipes/deepspeed_zero.py --ckpt /tmp/ds --steps 20
    torchrun --standalone --nproc-per-node 2 recipes/deepspeed_zero.py --resume /tmp/ds --steps 10  # same world size
    torchrun --standalone --nproc-per-node 2 recipes/deepspeed_zero.py --ckpt /tmp/ds --ckpt-step 10 --steps 20

Two config flags matter (docs/integrations.md): ``zero_allow_untested_optimizer`` (DeepSpeed refuses a ZeRO
client optimizer it has not tested itself without it; Hugging Face's Trainer sets it on its own), and with
``--offload`` (ZeRO-Offload: optimizer state in host memory) ``zero_force_ds_cpu_optimizer: false``, without which
DeepSpeed insists on its own CPUAdam. Under ZeRO the optimizer sees each rank's flat partition of the
parameters, not the parameters: every tensor's state is 8-bit there, embeddings included, and a quantization
block may span the end of one parameter and the start of the next.
"""
from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lowbit_adamw import AdamW8bit  # noqa: E402
from lowbit_adamw.memory import optimizer_state_bytes  # noqa: E402
from lowbit_adamw.tinylm import TinyLM  # noqa: E402
from recipe_utils import check_ckpt_step, log_loss, rank_batches  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=(1, 2, 3), default=2)
    ap.add_argument("--offload", action="store_true", help="ZeRO-Offload: optimizer state in host memory")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="global batch, split across ranks")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ckpt", default=None, help="save a DeepSpeed checkpoint here at the end")
    ap.add_argument("--ckpt-step", type=int, default=None,
                    help="save it once this many steps are done instead (training goes on; --resume repeats the rest exactly)")
    ap.add_argument("--resume", default=None, help="load a DeepSpeed checkpoint (same world size) before training")
    args = ap.parse_args(argv)

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyLM(dim=args.dim, layers=args.layers, heads=4, seq_len=128)
    opt = AdamW8bit(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    zero = {"stage": args.stage}
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": args.batch // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    start = 0
    if args.resume:
        _, client = engine.load_checkpoint(args.resume)
        start = client["step"]
        if rank == 0:
            print(f"resumed from {args.resume} at step {start} on {world} rank(s)")

    check_ckpt_step(args.ckpt, args.ckpt_step, start, args.steps)
    data = rank_batches(args.batch, world, rank, start, engine.device)
    for step in range(start, start + args.steps):
        x, y = next(data)
        loss = torch.nn.functional.cross_entropy(engine(x).flatten(0, 1), y.flatten())
        engine.backward(loss)
        engine.step()
        log_loss(step, loss, start, args.steps, rank, world)
        if args.ckpt and step + 1 == args.ckpt_step:
            save(engine, args.ckpt, step + 1, rank)

    held = optimizer_state_bytes(opt)["total"]
    local = sum(s["exp_avg_codes"].numel() for s in opt.state.values() if "exp_avg_codes" in s)
    if rank == 0:
        print(f"memory: optimizer state on rank 0 {held / 2**20:.2f} MiB for a partition of {local:,} elements "
              f"({held / max(local, 1):.2f} B/param)")
    if args.ckpt and args.ckpt_step is None:
        save(engine, args.ckpt, start + args.steps, rank)
    dist.barrier()


def save(engine, path, step, rank):
    engine.save_checkpoint(path, client_state={"step": step})
    if rank == 0:
        print(f"saved {path} after step {step}")


if __name__ == "__main__":
    main()
