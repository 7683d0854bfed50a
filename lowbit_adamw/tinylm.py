"""A tiny byte-level causal LM and built-in text, for the CLI demo, benchmarks and tests.

Everything here runs offline: the text is Python's own standard-library source, which ships with
every Python installation, so no download is ever needed.
"""
from __future__ import annotations

import math
import os
import sysconfig

import torch
import torch.nn as nn
import torch.nn.functional as F

# Files read in this order; the first ones found are used. Fixed names keep the corpus identical
# across machines with the same Python version.
_TEXT_FILES = ("argparse.py", "textwrap.py", "difflib.py", "inspect.py", "typing.py", "pathlib.py")


def builtin_text(max_bytes: int = 1_000_000) -> bytes:
    """Return up to ``max_bytes`` of Python standard-library source text (ASCII-ish bytes)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for name in _TEXT_FILES:
        path = os.path.join(stdlib, name)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no standard-library text found under {stdlib}")
    return b"".join(chunks)[:max_bytes]


def token_splits(max_bytes: int = 1_000_000, held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens of the built-in text, split into (train, held-out) 1-d int64 tensors."""
    data = torch.frombuffer(bytearray(builtin_text(max_bytes)), dtype=torch.uint8).long()
    n_val = int(len(data) * held_out)
    return data[:-n_val], data[-n_val:]


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    """An endless, seeded stream of (input, target) windows: the same seed gives the same order."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=g)
        x = torch.stack([tokens[i : i + seq_len] for i in idx.tolist()])
        y = torch.stack([tokens[i + 1 : i + seq_len + 1] for i in idx.tolist()])
        yield x, y


@torch.no_grad()
def held_out_loss(model, tokens: torch.Tensor, seq_len: int, batches_n: int = 8) -> float:
    """Mean loss over a fixed set of held-out windows (seed 1234), the same for every optimizer."""
    it = batches(tokens, 16, seq_len, seed=1234)
    return sum(model.loss(*next(it)).item() for _ in range(batches_n)) / batches_n


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """GPT-style byte LM. Default size: ~0.8M parameters, trains at a few steps/s on 2 CPU cores."""

    def __init__(self, dim: int = 128, layers: int = 4, heads: int = 4, seq_len: int = 128, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:  # scaled residual init, as in GPT-2
            nn.init.normal_(blk.down.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, x):
        h = self.embed(x) + self.pos[: x.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))

    def loss(self, x, y):
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())
