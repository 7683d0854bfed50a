"""Workers for tests/test_deepspeed.py: DeepSpeed ZeRO on 2 CPU ranks (DS_ACCELERATOR=cpu, gloo), AdamW8bit as
the client optimizer, beside torch's AdamW under the same engine."""
import json
import os

import torch

from helpers import data, tiny_model

BATCH = 8
CONFIG = {
    "train_micro_batch_size_per_gpu": BATCH // 2,
    "gradient_accumulation_steps": 1,
    "steps_per_print": 10**9,
    # DeepSpeed asserts on a ZeRO client optimizer it has not tested itself (the Trainer sets this flag too)
    "zero_allow_untested_optimizer": True,
}


def setup(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import logging

    import deepspeed

    from deepspeed_cpu import skip_shm_op

    deepspeed.utils.logger.setLevel(logging.WARNING)
    skip_shm_op()  # an op for inference that takes 30-45 s to build
    deepspeed.init_distributed(dist_backend="gloo")


def engine(stage, optimizer):
    import deepspeed

    from lowbit_adamw import AdamW8bit

    model = tiny_model(seed=0, dim=64, layers=2, seq_len=33)
    if optimizer == "lowbit":
        opt = AdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.1, min_8bit_size=0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=dict(CONFIG, zero_optimization={"stage": stage}))
    return eng, opt


def train(eng, steps, rank, skip=0):
    """The global mean loss per step; each rank takes its half of one batch."""
    it = data(seq_len=32, batch=BATCH, seed=0)
    batches = [next(it) for _ in range(skip + steps)][skip:]
    losses = []
    for x, y in batches:
        x, y = x[rank * BATCH // 2 : (rank + 1) * BATCH // 2], y[rank * BATCH // 2 : (rank + 1) * BATCH // 2]
        loss = torch.nn.functional.cross_entropy(eng(x).flatten(0, 1), y.flatten())
        eng.backward(loss)
        eng.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item() / 2)
    return losses


def state_summary(opt):
    """Per state tensor of the client optimizer: (key, dtype, numel), in order."""
    return [(k, str(v.dtype), v.numel()) for s in opt.state.values() for k, v in sorted(s.items()) if torch.is_tensor(v)]


def zero_stages(rank, world, port, out, ckpt):
    """ZeRO 1, 2 and 3: AdamW8bit and torch's AdamW train the same model; at stage 2 and 3 a checkpoint is saved
    after 4 steps, training goes on for 3, and a fresh engine loaded from the checkpoint runs the same 3."""
    setup(rank, world, port)
    result = {}
    for stage in (1, 2, 3):
        row = {}
        for name in ("torch", "lowbit"):
            eng, opt = engine(stage, name)
            row[name] = train(eng, 4, rank)
            if name == "lowbit":
                row["state"] = state_summary(opt)
                if stage > 1:
                    eng.save_checkpoint(ckpt, tag=f"stage{stage}")
                    row["continued"] = train(eng, 3, rank, skip=4)
                    after = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
                    eng2, opt2 = engine(stage, name)
                    eng2.load_checkpoint(ckpt, tag=f"stage{stage}")
                    row["resumed"] = train(eng2, 3, rank, skip=4)
                    again = {k: v for s in opt2.state.values() for k, v in s.items() if torch.is_tensor(v)}
                    row["state_equal_after_resume"] = after.keys() == again.keys() and all(
                        torch.equal(after[k], again[k]) for k in after)
        result[stage] = row
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    # as dist_workers.teardown: a rank that leaves while its peer finishes a collective can make gloo abort
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
