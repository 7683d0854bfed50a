"""The counter-based random numbers of the step: the same bits from every backend, and nothing to save.

Stochastic rounding needs one uniform number per element and step. Drawing them from a generator
would tie the result to the backend (torch's, Triton's and a C++ stream all differ) and to the
generator's state, which a checkpoint would have to carry. Instead each number is a hash of where it
is used::

    key = mix32(mix32(mix32(seed ^ stream) ^ tensor_id) ^ step)      # on the host, once per tensor and step
    u   = (mix32(key ^ (index mod 2**32)) >> 8) * 2**-24                 # per element: a uniform in [0, 1)

``seed`` belongs to the optimizer (in its state dict), ``stream`` tells apart the uses (the weights,
a moment's codes), ``tensor_id`` is the parameter's position in the optimizer, ``step`` its step count
and ``index`` the element's position in the buffer being rounded. ``mix32`` is a 32-bit integer
finalizer (two multiply-xorshift rounds; constants from Chris Wellons' hash prospector, below 2**31 so
that a product of two values below 2**32 also fits a signed 64-bit integer, which is how the PyTorch
paths compute it)::

    x ^= x >> 16;  x = (x * 0x21F0AAAD) mod 2**32
    x ^= x >> 15;  x = (x * 0x735A2D97) mod 2**32
    x ^= x >> 15

The second moment's codes are rounded with a *dither* instead: a Weyl sequence in the step, from a
random phase per element::

    key    = mix32(mix32(seed ^ STREAM_V) ^ tensor_id)                     # on the host, once per tensor
    offset = (step * 0x9E3779B9) mod 2**32                                 # on the host, once per step
    u      = (((mix32(key ^ (index mod 2**32)) + offset) mod 2**32) >> 8) * 2**-24

so each element's rounding decisions over successive steps follow a low-discrepancy sequence: the
rounding errors of consecutive steps cancel instead of adding up as independent draws would (v is an
average over about 1 / (1 - beta2) steps, so independent rounding noise would accumulate). Measured
in ``benchmarks/codec_drift.py``.

A resumed run draws exactly the numbers the uninterrupted run would have drawn.
"""
from __future__ import annotations

import functools

import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x21F0AAAD
MUL2 = 0x735A2D97

STREAM_WEIGHTS = 1  # stochastic rounding of 16-bit weights
STREAM_V = 2  # the dither of the second moment's codes
WEYL = 0x9E3779B9  # 2**32 / golden ratio


def mix32(x: int) -> int:
    """``mix32`` of a Python int (taken mod 2**32)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    return x ^ (x >> 15)


def tensor_key(seed: int, stream: int, tensor_id: int, step: int) -> int:
    """The per-tensor, per-step key (an int below 2**32)."""
    return mix32(mix32(mix32(seed ^ stream) ^ tensor_id) ^ int(step))


def mix32_tensor(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` elementwise on an int64 tensor of values below 2**32 (a new tensor)."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 15)


def uniform(key: int, start: int, count: int, device) -> torch.Tensor:
    """The fp32 uniforms ``u`` of elements ``start .. start + count - 1`` under ``key``."""
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device) & MASK32
    h = mix32_tensor(idx ^ key)
    return (h >> 8).to(torch.float32) * (2.0**-24)


@functools.lru_cache(maxsize=65536)  # the step asks for it for every tensor, every step
def dither_key(seed: int, tensor_id: int) -> int:
    """The per-tensor key of the second moment's dither (step-independent)."""
    return mix32(mix32(seed ^ STREAM_V) ^ tensor_id)


def dither_offset(step: int) -> int:
    """The per-step offset of the dither's Weyl sequence."""
    return (int(step) * WEYL) & MASK32


def dither(key: int, offset: int, start: int, count: int, device) -> torch.Tensor:
    """The fp32 dither ``u`` of elements ``start .. start + count - 1`` (see the module doc)."""
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device) & MASK32
    h = (mix32_tensor(idx ^ key) + offset) & MASK32
    return (h >> 8).to(torch.float32) * (2.0**-24)
