"""Workers for tests/test_distributed.py, run with torch.multiprocessing.spawn on the gloo backend.

Every worker trains TinyLM with rows sized so that FSDP2's dim-0 shards are uneven (pos has 33
rows), block_size=64 so every matrix row is whole blocks, and each rank taking its slice of one
global batch, so that the averaged gradient equals the single-process one.
"""
import os

import torch
import torch.distributed as dist

from helpers import data, tiny_model
from lowbit_adamw import AdamW8bit
from lowbit_adamw import format as fmt

OPT_KW = dict(lr=3e-3, block_size=64, min_8bit_size=1024, weight_decay=0.1, ema_decay=0.9)  # EMA: one more sharded state


def opt_kw(bits=None):
    """OPT_KW at the code width the parent asked for (LOWBIT_TEST_BITS, set around the spawn)."""
    return dict(OPT_KW, bits=bits or int(os.environ.get("LOWBIT_TEST_BITS", "8")))
BATCH = 8


def setup(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)


def teardown():
    # Without the barrier gloo can abort ("terminate called without an active exception") when one
    # rank tears down while its peer is still finishing the last collective.
    dist.barrier()
    dist.destroy_process_group()


def batches(steps, skip=0):
    it = data(seq_len=32, batch=BATCH, seed=0)
    out = [next(it) for _ in range(skip + steps)]
    return out[skip:]


def sharded_model(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_model(seed=0, dim=64, layers=2, seq_len=33)
    mesh = init_device_mesh("cpu", (world,))
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_steps(model, opt, steps, rank, world, skip=0):
    """Global mean loss per step (each rank computes the loss of its slice of the batch)."""
    losses = []
    per = BATCH // world
    for x, y in batches(steps, skip):
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        loss = model.loss(xs, ys)
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
    return losses


def full_state(model, opt):
    """name -> dequantized moments and the parameter, gathered to full tensors (a collective)."""
    from lowbit_adamw.format.sharding import is_dtensor

    out = {}
    for (name, p), group_p in zip(model.named_parameters(), opt.param_groups[0]["params"]):
        assert p is group_p
        s = opt.state[p]
        full = lambda t: t.full_tensor() if is_dtensor(t) else t  # noqa: E731
        entry = {"param": full(p.detach()).clone(), "step": float(s["step"]), "8bit": "exp_avg_codes" in s,
                 "ema": full(s["ema"]).clone()}
        for m in ("exp_avg", "exp_avg_sq"):
            if m + "_codes" in s:
                entry[m] = fmt.dequantize_blockwise(full(s[m + "_codes"]).reshape(-1), full(s[m + "_absmax"]).reshape(-1),
                                                    fmt.is_signed(m), OPT_KW["block_size"], opt_kw()["bits"],
                                                    numel=p.numel()).view(p.shape)
            else:
                entry[m] = full(s[m]).clone()
        out[name] = entry
    return out


def fsdp_train_and_save(rank, world, port, out_dir, steps, more):
    """Train ``steps`` steps under FSDP2, save with DCP, then train ``more`` steps (for comparison)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    setup(rank, world, port)
    model = sharded_model(world)
    opt = AdamW8bit(model.parameters(), **opt_kw())
    losses = train_steps(model, opt, steps, rank, world)
    saved = full_state(model, opt)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=os.path.join(out_dir, f"ckpt_w{world}"))
    shards = {n: (tuple(p.to_local().shape), "exp_avg_codes" in opt.state[p]) for n, p in model.named_parameters()}
    after = train_steps(model, opt, more, rank, world, skip=steps)
    if rank == 0:
        torch.save({"losses": losses, "after": after, "saved": saved, "shards": shards}, os.path.join(out_dir, f"train_w{world}.pt"))
    teardown()


def fsdp_load(rank, world, port, out_dir, src, resave, steps_done, more):
    """Load a DCP checkpoint written on another world size, report the state, optionally re-save,
    and train ``more`` steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    setup(rank, world, port)
    model = sharded_model(world)
    opt = AdamW8bit(model.parameters(), **opt_kw())
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=os.path.join(out_dir, src))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    loaded = full_state(model, opt)
    full_osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # On one CPU rank the "full" tensors can share storage with the live state: snapshot them now.
    full_osd = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), full_osd)
    if resave:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=os.path.join(out_dir, resave))
    after = train_steps(model, opt, more, rank, world, skip=steps_done)
    if rank == 0:
        torch.save({"loaded": loaded, "after": after, "full_osd": full_osd}, os.path.join(out_dir, f"load_{src}_w{world}.pt"))
    teardown()


def ddp_train(rank, world, port, out_dir, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    setup(rank, world, port)
    inner = tiny_model(seed=0, dim=64, layers=2, seq_len=33)
    model = DDP(inner)
    opt = AdamW8bit(model.parameters(), **opt_kw())

    class Wrap:
        def loss(self, x, y):
            return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    losses = train_steps(Wrap(), opt, steps, rank, world)
    if rank == 0:
        torch.save({"losses": losses, "params": [p.detach().clone() for p in inner.parameters()]}, os.path.join(out_dir, "ddp.pt"))
    teardown()


def nonfinite_on_one_rank(rank, world, port, out_dir):
    """An Inf in one rank's shard only: that rank leaves the block that holds it, and nothing else; the
    rule is rank-local (blocks never straddle shards), so no rank waits for another."""
    setup(rank, world, port)
    model = sharded_model(world)
    opt = AdamW8bit(model.parameters(), **opt_kw())
    target = model.blocks[0].up.weight
    before = target.full_tensor().clone()
    x, y = batches(1)[0]
    model.loss(x[:4], y[:4]).backward()
    if rank == 1:
        target.grad.to_local()[0, 0] = float("inf")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    after = target.full_tensor()
    # rank 1's shard starts at row rows_per_rank; element [0, 0] of its shard is in the first block of that row
    rows_per_rank = -(-target.shape[0] // world)
    block = OPT_KW.get("block_size", 256)
    bad = torch.zeros_like(before, dtype=torch.bool)
    bad.view(-1)[rows_per_rank * target.shape[1]: rows_per_rank * target.shape[1] + block] = True
    # The 8-bit rule for sharded parameters: rows must be whole blocks (100 is not a multiple of 64).
    from torch.distributed.fsdp import fully_shard

    from lowbit_adamw.format.sharding import is_dtensor

    odd, even = torch.nn.Linear(100, 41, bias=False), torch.nn.Linear(128, 41, bias=False)
    kinds = {}
    for name, lin in (("odd", odd), ("even", even)):
        fully_shard(lin)
        o = AdamW8bit(lin.parameters(), **opt_kw())
        lin(torch.ones(2, lin.in_features)).sum().backward()
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            o.step()
        st = o.state[lin.weight]
        kinds[name] = ("8bit" if "exp_avg_codes" in st else "fp32", all(is_dtensor(v) for k, v in st.items() if k != "step"),
                       [str(w.message) for w in said if "sharded tensor(s)" in str(w.message)])
    torch.save({"kinds": kinds, "unchanged": torch.equal(before[bad], after[bad]), "rest_moved": bool((before[~bad] != after[~bad]).float().mean() > 0.9),
                "warned": any("parameter" in str(w.message) and "1 block" in str(w.message) for w in caught),
                "others_moved": not torch.equal(model.head.weight.full_tensor(), tiny_model(seed=0, dim=64, layers=2, seq_len=33).head.weight)},
               os.path.join(out_dir, f"nonfinite_r{rank}.pt"))
    teardown()
