import torch

from lowbit_adamw.tinylm import TinyLM, batches, token_splits


def tiny_model(seed=0, dim=32, layers=1, seq_len=32, dtype=torch.float32):
    torch.manual_seed(seed)
    return TinyLM(dim=dim, layers=layers, heads=2, seq_len=seq_len).to(dtype)


def data(seq_len=32, batch=8, seed=0):
    train, _ = token_splits(max_bytes=200_000)
    return batches(train, batch, seq_len, seed)


def train(model, opt, steps, seq_len=32, seed=0):
    it = data(seq_len, seed=seed)
    losses = []
    for _ in range(steps):
        x, y = next(it)
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def dequantized(opt, p, name):
    from lowbit_adamw import format as fmt

    s = opt.state[p]
    if name + "_codes" in s:
        block = [g for g in opt.param_groups if any(q is p for q in g["params"])][0]["block_size"]
        return fmt.dequantize_blockwise(s[name + "_codes"], s[name + "_absmax"], fmt.is_signed(name), block).view_as(p)
    return s[name]
