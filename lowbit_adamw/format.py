"""The lowbit-adamw state format, version 1. This docstring is the spec; the Triton kernel
(``lowbit_adamw.kernels``) and the PyTorch functions below both implement exactly this.

Layout
------
A parameter is read flat, in its own element order, and cut into blocks of ``block_size`` elements
(a power of two, 64..4096, default 256); the last block may be short. Per 8-bit moment buffer:

* ``*_codes``: uint8, one per element, shape ``(numel,)``.
* ``*_absmax``: float32, one per block, shape ``(ceil(numel / block_size),)``: the largest ``|x|`` in
  the block (for ``exp_avg_sq``, the largest ``x``).

So a parameter with both moments quantized holds ``2 + 8 / block_size`` bytes of state per element
(2.03125 at the default block size).

Code maps (closed-form companding, no table search)
---------------------------------------------------
``exp_avg`` (m, signed, square-root companding). With ``s = m / absmax`` in [-1, 1]::

    q    = sign(s) * floor(sqrt(|s|) * 127 + 0.5)          # q in [-127, 127]
    code = q + 127                                          # uint8; 127 is exact zero
    m    = sign(q) * (q / 127)**2 * absmax                  # decode

``exp_avg_sq`` and ``max_exp_avg_sq`` (v, unsigned, fourth-root companding). With ``s = v / absmax``
in [0, 1]::

    code = floor(sqrt(sqrt(s)) * 255 + 0.5)                 # code in [0, 255]
    code = max(code, 1)   if v > 0                          # zero-point guard
    v    = (code / 255)**4 * absmax                         # decode

Rounding is to the nearest level in the companded domain, ties upward. The tables ``M_CODE_MAP`` and
``V_CODE_MAP`` below list the 256 decoded values (code 255 of the m map is never written; it decodes
like the formula, to (128/127)**2).

Rules
-----
* A block whose absmax is 0 stores the code of zero (127 for m, 0 for v).
* The sign of a nonzero m is never flipped (the sign is applied after rounding the magnitude).
* A positive v never decodes to 0: the smallest level of a block is (1/255)**4 * absmax. Without this
  guard the update of a weight whose v rounded to zero becomes m / eps, 10^3..10^6 times too large.
* Quantization happens after the update: the step works on the decoded fp32 values, then the new
  block absmax is taken from the updated values and they are encoded against it.

Why these maps: measured against bitsandbytes' dynamic (tree) maps on real gradients of a small LM
(``benchmarks/codec_quality.py``), square-root/fourth-root companding gave about two thirds of the
update error of the dynamic maps (v's resolution for small values dominates the error), and encoding is
a couple of square roots instead of a search over 256 entries.

State dict
----------
Per parameter: ``step`` (float32 0-d tensor on the CPU, as torch), and either the 8-bit buffers above
(``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes``, ``exp_avg_sq_absmax``, and with amsgrad
``max_exp_avg_sq_codes`` / ``max_exp_avg_sq_absmax``), or torch's own fp32 ``exp_avg`` / ``exp_avg_sq``
(/ ``max_exp_avg_sq``) for parameters kept in fp32 state. The optimizer's state dict carries
``{"lowbit_adamw": {"format_version": FORMAT_VERSION, "block_size": ...}}`` at top level and
``block_size`` in every param group; a state dict of another version or block size is refused.
"""
from __future__ import annotations

import torch

FORMAT_VERSION = 1
DEFAULT_BLOCK_SIZE = 256
MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 4096

M_LEVELS = 127  # signed levels each side of zero
V_LEVELS = 255
M_ZERO_CODE = 127
V_ZERO_CODE = 0

# Elements per chunk in the PyTorch path: bounds every fp32 temporary to a few MB whatever the
# tensor size, and keeps the working set in cache. Must be a multiple of MAX_BLOCK_SIZE.
CHUNK_ELEMENTS = 1 << 18

# Names of the 8-bit buffers, in the order the step uses them.
QUANTIZED_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _m_map() -> torch.Tensor:
    q = torch.arange(256, dtype=torch.float64) - M_ZERO_CODE
    return (torch.sign(q) * (q / M_LEVELS) ** 2).float()


def _v_map() -> torch.Tensor:
    return ((torch.arange(256, dtype=torch.float64) / V_LEVELS) ** 4).float()


M_CODE_MAP = _m_map()
V_CODE_MAP = _v_map()


def check_block_size(block_size) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise ValueError(f"block_size must be an int, got {block_size!r}")
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(
            f"block_size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, got {block_size}"
        )
    return block_size


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def is_signed(name: str) -> bool:
    """exp_avg is signed; exp_avg_sq and max_exp_avg_sq are not."""
    return name == "exp_avg"


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root, as a new tensor. ATen's CPU ``torch.sqrt`` on float32 is not:
    in torch 2.13 about 16% of inputs come out one ulp off, on AVX2, AVX-512 and baseline builds alike,
    while inductor's C++, Triton's ``sqrt_rn`` and CUDA's ``sqrtf`` round correctly. On the CPU NumPy's
    float32 square root is the hardware instruction (IEEE, correctly rounded) and as fast as ATen's."""
    if x.device.type != "cpu":
        return torch.sqrt(x)
    import numpy as np

    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    np.sqrt(x.detach().numpy(), out=out.numpy())
    return out


# ---- encode / decode of one contiguous span that starts on a block boundary --------------------
# x is a 1-d fp32 tensor; blocks are consecutive runs of block_size (last may be short).

def _blocks(x: torch.Tensor, block_size: int):
    """Views of x as (full blocks, tail block or None), without copying."""
    n = x.numel()
    nfull = n // block_size
    full = x[: nfull * block_size].view(nfull, block_size)
    tail = x[nfull * block_size :].view(1, -1) if n % block_size else None
    return full, tail


def _encode_rows(x: torch.Tensor, signed: bool, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """x: (rows, cols) fp32, encoded into codes (rows, cols) uint8 and absmax (rows,) fp32.

    Uses x as scratch (it is a temporary of the step)."""
    a = x.abs().amax(dim=1) if signed else x.amax(dim=1)
    absmax.copy_(a)
    # 1/0 for empty blocks gives inf; 0 * inf would be NaN, so use 0 as the inverse there.
    inv = torch.where(a > 0, 1.0 / a, torch.zeros_like(a)).unsqueeze(1)
    if signed:
        s = x.mul(inv)
        q = sqrt_rn(s.abs()).mul_(M_LEVELS).add_(0.5).floor_()
        q.copysign_(s).add_(M_ZERO_CODE)
        codes.copy_(q)
    else:
        pos = x > 0
        q = sqrt_rn(sqrt_rn(x.mul_(inv))).mul_(V_LEVELS).add_(0.5).floor_()
        q.masked_fill_(pos & (q == 0), 1.0)
        codes.copy_(q)


def _decode_rows(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, out: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) uint8, absmax (rows,) → out (rows, cols) fp32."""
    a = absmax.unsqueeze(1)
    if signed:
        y = out.copy_(codes).sub_(M_ZERO_CODE).mul_(1.0 / M_LEVELS)
        return y.mul_(y.abs()).mul_(a)
    y = out.copy_(codes).mul_(1.0 / V_LEVELS)
    y.mul_(y)
    return y.mul_(y).mul_(a)


def encode_span(x: torch.Tensor, signed: bool, block_size: int, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """Encode fp32 span x (destroyed) into codes (same numel) and absmax (one per block)."""
    full, tail = _blocks(x, block_size)
    cf, ct = _blocks(codes, block_size)
    nfull = full.shape[0]
    if nfull:
        _encode_rows(full, signed, cf, absmax[:nfull])
    if tail is not None:
        _encode_rows(tail, signed, ct, absmax[nfull : nfull + 1])


def decode_span(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block_size: int, out: torch.Tensor) -> torch.Tensor:
    """Decode a span of codes (starting on a block boundary) into fp32 ``out``."""
    cf, ct = _blocks(codes, block_size)
    of, ot = _blocks(out, block_size)
    nfull = cf.shape[0]
    if nfull:
        _decode_rows(cf, absmax[:nfull], signed, of)
    if ct is not None:
        _decode_rows(ct, absmax[nfull : nfull + 1], signed, ot)
    return out


# ---- whole tensors (conversions, tests): chunked, so memory stays bounded ----------------------

def quantize_blockwise(x: torch.Tensor, signed: bool, block_size: int = DEFAULT_BLOCK_SIZE):
    """Quantize any floating tensor to (codes uint8 (numel,), absmax fp32 (blocks,)) on its device."""
    check_block_size(block_size)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, block_size), dtype=torch.float32, device=x.device)
    for start in range(0, n, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, n)
        b0 = start // block_size
        chunk = flat[start:stop].to(torch.float32, copy=True)
        encode_span(chunk, signed, block_size, codes[start:stop], absmax[b0 : b0 + num_blocks(stop - start, block_size)])
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: a flat fp32 tensor of ``codes.numel()`` elements."""
    check_block_size(block_size)
    n = codes.numel()
    if absmax.numel() != num_blocks(n, block_size):
        raise ValueError(
            f"absmax has {absmax.numel()} blocks but {n} codes at block_size={block_size} need {num_blocks(n, block_size)}"
        )
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    for start in range(0, n, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, n)
        b0 = start // block_size
        decode_span(codes[start:stop], absmax[b0 : b0 + num_blocks(stop - start, block_size)], signed, block_size, out[start:stop])
    return out
