"""FSDP2 (torch.distributed.fsdp.fully_shard) training with lowbit-adamw, with DCP checkpoints.

    torchrun --standalone --nproc-per-node 2 recipes/fsdp2_train.py --steps 50          # CPU: gloo
    torchrun --standalone --nproc-per-node 8 recipes/fsdp2_train.py --steps 50          # GPUs: nccl
    torchrun --standalone --nproc-per-node 2 recipes/fsdp2_train.py --ckpt /tmp/ck --steps 20
    torchrun --standalone --nproc-per-node 1 recipes/fsdp2_train.py --resume /tmp/ck --steps 10   # any world size
    torchrun --standalone --nproc-per-node 2 recipes/fsdp2_train.py --ckpt /tmp/ck --ckpt-step 10 --steps 20

Each rank keeps 8-bit state for its own shard. A sharded matrix gets 8-bit state when its rows are
whole quantization blocks (row length a multiple of block_size, 256 by default; true for every
weight matrix of the usual LLM shapes), so the checkpoint reshards to any number of ranks.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lowbit_adamw import AdamW8bit
from lowbit_adamw.memory import optimizer_state_bytes
from lowbit_adamw.tinylm import TinyLM

from recipe_utils import check_ckpt_step, log_loss, rank_batches


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="global batch, split across ranks")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ckpt", default=None, help="save a DCP checkpoint here at the end")
    ap.add_argument("--ckpt-step", type=int, default=None,
                    help="save it once this many steps are done instead (training goes on; --resume repeats the rest)")
    ap.add_argument("--resume", default=None, help="load a DCP checkpoint (any world size) before training")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # same init on every rank; fully_shard keeps each rank's slice
    model = TinyLM(dim=args.dim, layers=args.layers, heads=4, seq_len=128).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = AdamW8bit(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    start = 0
    if args.resume:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "meta": {"step": 0}}
        dcp.load(state, checkpoint_id=args.resume)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = state["meta"]["step"]
        if rank == 0:
            print(f"resumed from {args.resume} at step {start} on {world} rank(s)")

    check_ckpt_step(args.ckpt, args.ckpt_step, start, args.steps)
    data = rank_batches(args.batch, world, rank, start, device)
    for step in range(start, start + args.steps):
        x, y = next(data)
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        log_loss(step, loss, start, args.steps, rank, world)
        if args.ckpt and step + 1 == args.ckpt_step:
            save(model, opt, args.ckpt, step + 1, rank)

    held = torch.tensor([optimizer_state_bytes(opt)["total"]], dtype=torch.float64, device=device)
    n_local = torch.tensor([sum(p.to_local().numel() for p in model.parameters())], dtype=torch.float64, device=device)
    if rank == 0:
        print(f"memory: optimizer state on rank 0 {held.item() / 2**20:.2f} MiB for {int(n_local.item()):,} local parameters "
              f"({held.item() / n_local.item():.2f} B/param)")
    if args.ckpt and args.ckpt_step is None:
        save(model, opt, args.ckpt, start + args.steps, rank)
    dist.barrier()
    dist.destroy_process_group()


def save(model, opt, path, step, rank):
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "meta": {"step": step}}, checkpoint_id=path)
    if rank == 0:
        print(f"saved {path} after step {step}")


if __name__ == "__main__":
    main()
