"""Shared pieces of the recipes: a tiny Llama built from a config (no download), byte-level
windows of text that ships with Python, and a one-line memory summary."""
from __future__ import annotations

import resource
import sys

import torch

from lowbit_adamw import optimizer_state_bytes
from lowbit_adamw.tinylm import batches, token_splits


def tiny_llama(seed: int = 0, hidden: int = 128, layers: int = 2, dtype=torch.float32):
    """A small LlamaForCausalLM over byte tokens (vocab 256), randomly initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def byte_windows(n: int, seq_len: int = 64, held_out: bool = False) -> list[dict]:
    """``n`` non-overlapping windows of built-in text as causal-LM examples (labels = input_ids)."""
    train, val = token_splits(max_bytes=400_000)
    tokens = val if held_out else train
    if n * seq_len > len(tokens):
        raise ValueError(f"asked for {n} windows of {seq_len} tokens; the built-in text has {len(tokens)}")
    return [{"input_ids": tokens[i * seq_len:(i + 1) * seq_len].clone(), "labels": tokens[i * seq_len:(i + 1) * seq_len].clone()}
            for i in range(n)]


def memory_summary(optimizer) -> str:
    """State bytes per parameter this process holds (a sharded parameter counts its local shard), why any
    tensors keep full-precision state, and the peak memory."""
    from lowbit_adamw.memory.state import full_state_causes, optimizer_params

    state = optimizer_state_bytes(optimizer)
    n = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in optimizer_params(optimizer).values())
    parts = [f"optimizer state {state['total'] / 2**20:.2f} MiB ({state['total'] / max(n, 1):.2f} B/param over {n:,} params)"]
    causes = full_state_causes(optimizer)
    if causes:
        parts.append("full-precision state for " + ", ".join(f"{c['tensors']} tensor(s) by {k}" for k, c in causes.items()))
    if torch.cuda.is_available():
        parts.append(f"CUDA peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        parts.append(f"process peak RSS {rss / (2**20 if sys.platform == 'darwin' else 2**10):.0f} MiB")
    return ", ".join(parts)


def rank_batches(batch: int, world: int, rank: int, start: int, device):
    """This rank's share of each batch of TinyLM windows (128 tokens) of the built-in text, from step ``start``
    on: the same data order as an uninterrupted run, whatever the world size (the distributed recipes)."""
    data = batches(token_splits()[0], batch, 128, seed=0)
    for _ in range(start):
        next(data)
    per = batch // world
    for x, y in data:
        yield x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device)


def log_loss(step: int, loss: torch.Tensor, start: int, steps: int, rank: int, world: int) -> None:
    """Rank 0 prints the mean loss over the ranks on about ten of the steps, and on the last."""
    import torch.distributed as dist

    avg = loss.detach().clone()
    dist.all_reduce(avg)
    if rank == 0 and (step % max(1, steps // 10) == 0 or step == start + steps - 1):
        print(f"step {step:4d}  loss {avg.item() / world:.4f}")


def check_ckpt_step(ckpt: str | None, ckpt_step: int | None, start: int, steps: int) -> None:
    """--ckpt-step K (save once K steps are done, training goes on) must name a step this run reaches, and a
    --ckpt to save to: otherwise nothing would be saved, and nothing said."""
    if ckpt_step is None:
        return
    if not ckpt:
        raise SystemExit("--ckpt-step needs --ckpt (where to save)")
    if not start < ckpt_step <= start + steps:
        raise SystemExit(f"--ckpt-step {ckpt_step} is not reached by this run: it trains from {start} to {start + steps} "
                         "steps done; pick a step in that range")
