"""The lowbit-adamw state format, version 4. This docstring is the spec; the Triton kernel
(``lowbit_adamw.kernels``), the C++ step and the PyTorch functions below all implement exactly this.

Layout
------
A parameter is read flat, in the order its elements sit in memory (``lowbit_adamw.format.layout``: row-major
for a contiguous tensor), and cut into blocks of ``block_size`` elements (a power of two, 64..4096;
default 256 at 8 bits, 128 at 4 bits); the last block may be short. Each quantized moment buffer has
a width of ``bits`` (8 or 4, per param group):

* ``*_codes``: uint8. At 8 bits one code per element, shape ``(numel,)``. At 4 bits two codes per
  byte, shape ``(ceil(numel / 2),)``: element ``2i`` in the low nibble of byte ``i``, element ``2i + 1``
  in the high nibble; the unused high nibble after an odd last element is 0. Blocks hold an even number
  of elements, so a byte never spans two blocks.
* ``*_absmax``: float32, one per block, shape ``(ceil(numel / block_size),)``: the block's scale. Its
  magnitude ``a`` is the largest ``|x|`` in the block (for ``exp_avg_sq``, the largest ``x``), saturated
  at the largest finite float32 and flushed to 0 below the smallest normal one (so its reciprocal
  never overflows). Its sign bit carries one bit of the map (below): a negative scale is ``-a``.

So a parameter with both moments quantized holds ``2 * (bits / 8 + 4 / block_size)`` bytes of state
per element: 2.03125 at 8 bits and blocks of 256, 1.0625 at 4 bits and blocks of 128.

Code maps
---------
``exp_avg`` (m, signed) at 8 bits: square-root companding, with ``L = 127`` and ``s = m / a`` in
[-1, 1], the scale always positive::

    q    = sign(s) * floor(sqrt(|s|) * L + 0.5)            # q in [-L, L]
    code = q + L                                            # L is exact zero
    m    = sign(q) * (q / L)**2 * a                         # decode

At 4 bits, the 16 levels of the dynamic-exponent map (Dettmers 2016) with 3 exponent bits,
``M4_LEVELS``: -0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0, 0.0055, 0.0325, 0.0775,
0.2125, 0.4375, 0.6625, 0.8875, 1 (each rounded to fp32; code 7 is zero). The scale's sign says on
which side of the map the block's largest ``|m|`` sits: ``scale = -a`` when ``-min(m) > max(m)``, else
``a``, so that element is ``+1`` of the map whatever its sign, and decodes exactly (a negative block
maximum stored at 0.8875 of itself would shrink m under a steady negative gradient)::

    s    = m * (1 / scale)
    code = number of i in 0..14 with M4_BOUNDS[i] <= s     # M4_BOUNDS[i] = fp32((level i + level i+1) / 2)
    m    = M4_LEVELS[code] * scale                          # decode

``exp_avg_sq`` and ``max_exp_avg_sq`` (v, unsigned), with ``s = v * (1 / a)`` in [0, 1]. Two maps at 8
bits; a block uses map B (its scale stored as ``-a``) when every v of it is at least half its largest,
s >= 1/2, else map A::

    A: level(c) = ((c * (1 / 255))**2)**2                     # fourth-root companding, c in [0, 255]
       lo = min(floor(sqrt(sqrt(s)) * 255), 254)
    B: level(c) = (c + 255) * (1 / 510)                       # linear on [1/2, 1]
       lo = min(max(floor(s * 510 - 255), 0), 254)

and at 4 bits one map, the zero-free linear map of Li et al. (2023)::

       level(c) = (c + 1) * (1 / 16)                          # c in [0, 15]
       lo = min(max(floor(s * 16 - 1), 0), 14)

v is rounded between the two levels around it with a dither ``u`` in [0, 1), so that the decoded
value is unbiased: with map A unbiased in the scale of the update, 1 / sqrt(v), with ``r = sqrt(s)``
and the levels' square roots ``l(c) = (c * (1 / 255))**2`` (the level's own intermediate); with map B
and at 4 bits unbiased in value::

    map A:  code = lo + 1   if (u * (l(lo + 1) - l(lo))) * r < (r - l(lo)) * l(lo + 1) or s >= 1   else lo
            code = max(code, 1)   if v > 0                                 # a positive v never decodes to 0
    else:   code = lo + 1   if (s - level(lo)) > u * (level(lo + 1) - level(lo))   else lo
    v = level(code) * a                                                     # decode

In the step, ``u`` is ``lowbit_adamw.format.rng``'s dither (a Weyl sequence per element over the steps), so v
does not drift over many re-encodings: rounding in the companded domain, or to nearest, ratchets v
upwards (a step moves v by about 0.1%, less than half a code, so only the large moves upward survive:
+26% after 3000 steps of stationary noise). Unbiased in 1 / sqrt(v) rather than in v, a small v of a
block (where neighbouring levels are far apart) rounds down less often: rounding down is what makes
an update too large (the largest single update on real gradients: 2.3x lr against 4.8x unbiased in
value; v's bias stays under 2%). Map B's levels are 0.2-0.4% apart, where the two rules agree. At 4
bits the levels are 1/16 apart near the block maximum and unbiased in value keeps v's bias under 1%
where unbiased in 1 / sqrt(v) leaves +6%. Elsewhere (``quantize_blockwise``: conversions, loading)
``u = 1/2``.

Rules
-----
* A block whose scale is 0 stores the code of zero (127 or 7 for m, 0 for v) and decodes to zeros.
* The sign of a nonzero m is never flipped (8 bits: the sign is applied after rounding the magnitude;
  4 bits: the bounds either side of zero are +-0.00275, so a small m rounds to 0, never across).
* A positive v never decodes to 0 (v at least the smallest normal float32, and below that it does not
  change the update against eps): the smallest level of a block is (1/255)**4 * a (map A), a / 2 (map B)
  or a / 16 at 4 bits (where a zero v in a block with a nonzero scale also decodes to a / 16).
* A v of inf (a finite gradient of 2e19 squares to inf) saturates the scale at the largest float32,
  and a decoded v equal to it (the top code of a saturated block) is inf again: that weight's update
  stays 0 as in fp32 AdamW, and no NaN reaches its block (its other elements decode finite).
* Quantization happens after the update: the step works on the decoded fp32 values, then the new
  block scale is taken from the updated values and they are encoded against it.

Why these maps: measured against alternatives (``benchmarks/codec_quality.py``: update error against
fp32 AdamW on real gradients of a small LM; ``benchmarks/codec_drift.py``: bias and error over 3000
steps without resync; ``benchmarks/convergence.py``: held-out loss after training). At 8 bits
square-root/fourth-root companding gives two thirds of the update error of bitsandbytes' dynamic (tree)
maps on real gradients, where v spans decades within a block; where it does not (stationary noise:
every v of a block within 20% of the largest), map B's codes are 4x finer there. At 4 bits v's
resolution near the block maximum matters most: the zero-free linear map beats fourth-root companding.
For the 4-bit m map the two measures disagree: square-root companding (format v2) has the smaller
update error, but in training it ended 2.6% / 3.4% above fp32 AdamW's held-out loss (lr 1e-3 / 3e-3,
3 seeds) where the dynamic-exponent map ends within 2%; the finer levels near zero (0.0055 of the
block maximum, against 0.02) are what keep small m from being rounded to 0. Rank-1 normalization of v
gains 10% in update error but needs every row of a tensor before any can be encoded (a second pass,
and an all-reduce under FSDP2), so blocks are kept.

State dict
----------
Per parameter: ``step`` (float32 0-d tensor on the CPU, as torch), and either the quantized buffers above
(``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes``, ``exp_avg_sq_absmax``, and with amsgrad
``max_exp_avg_sq_codes`` / ``max_exp_avg_sq_absmax``), or torch's own ``exp_avg`` / ``exp_avg_sq``
(/ ``max_exp_avg_sq``) for parameters kept in full-precision state. The optimizer's state dict carries
``{"lowbit_adamw": {"format_version": FORMAT_VERSION, ...}}`` at top level and ``block_size`` and ``bits``
in every param group (``lowbit_adamw.optim.checkpoint``). Versions 1 (8 bits only, no ``bits`` key) and 3
decode unchanged under version 4's rules: their scales are never negative, and a positive scale
selects what those versions wrote (map A; the 4-bit m map's positive side). Version 2 differs in the
4-bit m map (square-root companding on 7 levels a side); its 4-bit m codes are decoded with that map and
re-encoded with this one on load (``m4_codes_from_v2``: one extra rounding of m). A state dict of another
version, block size or width is refused.
"""
from __future__ import annotations

import torch


def is_signed(name: str) -> bool:
    """exp_avg is signed; exp_avg_sq and max_exp_avg_sq are not."""
    return name == "exp_avg"

FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # 1 and 3 decode as 4; 2 needs its 4-bit m re-encoded (m4_codes_from_v2)
FLT_MAX = 3.4028234663852886e38
FLT_MIN = 1.1754943508222875e-38  # the smallest normal float32
V_SPLIT = 0.5  # 8-bit v: a block whose every v is at least this fraction of its largest uses map B
BITS = (8, 4)
DEFAULT_BLOCK_SIZE = 256  # at 8 bits
DEFAULT_BLOCK_SIZE_4BIT = 128  # 1.0625 B/param; 256 has 1.5x the update error, 64 costs 1.125 B/param
MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 4096

M_LEVELS = 127  # signed levels each side of zero of the 8-bit m map
V_LEVELS = 255
M_ZERO_CODE = 127
V_ZERO_CODE = 0  # at every width
V4_LEVELS = 16  # 4-bit v: (code + 1) / 16

# Elements per chunk in the PyTorch path: bounds every fp32 temporary to a few MB whatever the
# tensor size, and keeps the working set in cache. Must be a multiple of MAX_BLOCK_SIZE.
CHUNK_ELEMENTS = 1 << 18

# Names of the 8-bit buffers, in the order the step uses them.
QUANTIZED_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def m_zero_code(bits: int) -> int:
    """m's code of zero: 127 at 8 bits, 7 at 4 bits."""
    return 2 ** (bits - 1) - 1


def _fp32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float64).float().item()


def dynamic_exponent_levels(bits: int) -> tuple[float, ...]:
    """The signed dynamic-exponent map (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep
    Learning") at ``bits`` bits with ``bits - 1`` exponent values, sorted, as fp32 values. Exponent ``e``
    (0 .. bits-2) spans [0.1, 1] * 10**(e - bits + 2) in 2**e linear steps, each level the middle of its
    step, with both signs; then 0 and +1."""
    mags = []
    for e in range(bits - 1):
        edges = [0.1 + 0.9 * i / 2**e for i in range(2**e + 1)]
        mags += [10.0 ** (e - bits + 2) * (lo + hi) / 2 for lo, hi in zip(edges, edges[1:])]
    levels = sorted([-m for m in mags] + [0.0] + mags + [1.0])
    assert len(levels) == 2**bits
    return tuple(_fp32(x) for x in levels)


M4_LEVELS = dynamic_exponent_levels(4)  # 4-bit m: code -> level (times absmax); code 7 is zero
M4_BOUNDS = tuple(_fp32((a + b) / 2) for a, b in zip(M4_LEVELS, M4_LEVELS[1:]))  # code = #(bounds <= s)


def code_map(name: str, bits: int = 8) -> torch.Tensor:
    """The 2**bits decoded values (times absmax) of a moment's codes."""
    codes = torch.arange(2**bits, dtype=torch.float64)
    if is_signed(name) and bits == 4:
        return torch.tensor(M4_LEVELS, dtype=torch.float32)
    if is_signed(name):
        q = codes - M_LEVELS
        return (torch.sign(q) * (q / M_LEVELS) ** 2).float()
    if bits == 8:
        return ((codes / V_LEVELS) ** 4).float()
    return ((codes + 1) / V4_LEVELS).float()


M_CODE_MAP = code_map("exp_avg", 8)
V_CODE_MAP = code_map("exp_avg_sq", 8)


def check_bits(bits) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4 (the width of the moment codes), got {bits!r}")
    return bits


def default_block_size(bits: int) -> int:
    return DEFAULT_BLOCK_SIZE if bits == 8 else DEFAULT_BLOCK_SIZE_4BIT


def codes_numel(numel: int, bits: int) -> int:
    """Bytes of codes for ``numel`` elements."""
    return numel if bits == 8 else (numel + 1) // 2


def state_bytes_per_element(bits: int, block_size: int, moments: int = 2) -> float:
    return moments * (bits / 8 + 4 / block_size)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16 -> bytes along the last dimension (``ceil(n / 2)`` of them), element 2i in the
    low nibble; an odd last element gets a 0 high nibble. Any leading dimensions (rows of blocks) stay."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles` along the last dimension: the first ``n`` codes (all by default)."""
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)
    return codes if n is None else codes[..., :n]


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


def m4_encode(s: torch.Tensor) -> torch.Tensor:
    """4-bit m codes (as fp32) of s = m / absmax: the number of ``M4_BOUNDS`` at or below s. A plain
    count of comparisons, the same in every backend (a NaN counts none)."""
    q = torch.zeros_like(s)
    for b in M4_BOUNDS:
        q += s >= b
    return q


_m4_tables: dict = {}


def m4_table(device) -> torch.Tensor:
    """``M4_LEVELS`` as an fp32 tensor on ``device`` (cached)."""
    key = str(device)
    if key not in _m4_tables:
        _m4_tables[key] = torch.tensor(M4_LEVELS, dtype=torch.float32, device=device)
    return _m4_tables[key]


# ---- encode / decode of one contiguous span that starts on a block boundary --------------------
# x is a 1-d fp32 tensor; blocks are consecutive runs of block_size (last may be short).

def _blocks(x: torch.Tensor, block_size: int):
    """Views of x as (full blocks, tail block or None), without copying."""
    n = x.numel()
    nfull = n // block_size
    full = x[: nfull * block_size].view(nfull, block_size)
    tail = x[nfull * block_size :].view(1, -1) if n % block_size else None
    return full, tail


def scale_magnitude(a: torch.Tensor) -> torch.Tensor:
    """A block maximum as a scale's magnitude: saturated at FLT_MAX, flushed to 0 below FLT_MIN (NaN stays)."""
    a = torch.where(a > FLT_MAX, torch.full_like(a, FLT_MAX), a)
    return torch.where(a < FLT_MIN, torch.zeros_like(a), a)


def v_level(c: torch.Tensor, map_b: torch.Tensor | None, bits: int = 8) -> torch.Tensor:
    """The v level of codes ``c`` (fp32 integers), per the spec; ``map_b`` (bool, broadcastable) picks
    map B at 8 bits."""
    if bits == 4:
        return (c + 1.0) * (1.0 / V4_LEVELS)
    y = c * (1.0 / V_LEVELS)
    y = y * y
    a_level = y * y
    if map_b is None:
        return a_level
    return torch.where(map_b, (c + 255.0) * (1.0 / 510.0), a_level)


def encode_values(x: torch.Tensor, signed: bool, bits: int = 8, u: torch.Tensor | float = 0.5, sqrt=sqrt_rn):
    """The spec's encoder on rows of fp32 ``x`` (rows, cols): (codes as fp32 integers, one per element,
    and the signed scale per row). ``u``: v's dither (rows, cols) or a number; ``sqrt``: a correctly
    rounded fp32 square root (ATen's CPU one is not: ``sqrt_rn``; inductor's and CUDA's are)."""
    a = scale_magnitude(x.abs().amax(dim=1) if signed else x.amax(dim=1))
    # 1/0 for empty blocks gives inf; 0 * inf would be NaN, so use 0 as the inverse there.
    if signed and bits == 4:
        scale = torch.where(-x.amin(dim=1) > x.amax(dim=1), -a, a)
        inv = torch.where(a > 0, 1.0 / scale, torch.zeros_like(a)).unsqueeze(1)
        return m4_encode(x * inv), scale
    inv = torch.where(a > 0, 1.0 / a, torch.zeros_like(a)).unsqueeze(1)
    s = x * inv
    if signed:
        q = torch.clamp(torch.floor(sqrt(s.abs()) * float(M_LEVELS) + 0.5), max=float(M_LEVELS))
        return torch.copysign(q, s) + M_LEVELS, a
    if bits == 4:  # unbiased in value between the two levels around s
        lo = torch.clamp(torch.floor(s * float(V4_LEVELS) - 1.0), 0.0, V4_LEVELS - 2.0)
        low, high = v_level(lo, None, 4), v_level(lo + 1.0, None, 4)
        return lo + ((s - low) > (u * (high - low))).to(s.dtype), a
    # 8 bits, map A: unbiased in the update's scale 1 / sqrt(v), with the levels' square roots y**2
    r = sqrt(s)
    lo_a = torch.clamp(torch.floor(sqrt(r) * float(V_LEVELS)), max=V_LEVELS - 1.0)
    y_lo, y_hi = lo_a * (1.0 / V_LEVELS), (lo_a + 1.0) * (1.0 / V_LEVELS)
    low, high = y_lo * y_lo, y_hi * y_hi
    q_a = lo_a + ((((u * (high - low)) * r) < ((r - low) * high)) | (s >= 1.0)).to(s.dtype)  # s >= 1: saturated by inf
    q_a = torch.where((x > 0) & (q_a == 0), torch.ones_like(q_a), q_a)  # a positive v never decodes to 0
    # map B: unbiased in value (its levels are 1/510 apart)
    lo_b = torch.clamp(torch.floor(s * 510.0 - 255.0), 0.0, V_LEVELS - 1.0)
    low_b, high_b = (lo_b + 255.0) * (1.0 / 510.0), ((lo_b + 1.0) + 255.0) * (1.0 / 510.0)
    q_b = lo_b + ((s - low_b) > (u * (high_b - low_b))).to(s.dtype)
    map_b = ((s.amin(dim=1) >= V_SPLIT) & (a > 0)).unsqueeze(1)
    return torch.where(map_b, q_b, q_a), torch.where(map_b[:, 0], -a, a)


def decode_values(codes: torch.Tensor, scale: torch.Tensor, signed: bool, bits: int = 8) -> torch.Tensor:
    """The spec's decoder: codes (rows, cols), one per element (any integer dtype), and the signed scale
    per row -> fp32 values."""
    a = scale.unsqueeze(1)
    if signed and bits == 4:
        return m4_table(codes.device)[codes.long()] * a
    c = codes.to(torch.float32)
    if signed:
        y = (c - M_LEVELS) * (1.0 / M_LEVELS)
        return y * y.abs() * a
    # a zero scale (a block of zeros) decodes to 0 for every code; a saturated one's top code to inf
    v = v_level(c, None, 4) * a if bits == 4 else v_level(c, a < 0, 8) * a.abs()
    return torch.where(v == FLT_MAX, torch.full_like(v, float("inf")), v)


def _encode_rows(x: torch.Tensor, signed: bool, codes: torch.Tensor, absmax: torch.Tensor, bits: int = 8,
                 u: torch.Tensor | float = 0.5) -> None:
    q, scale = encode_values(x, signed, bits, u)
    absmax.copy_(scale)
    codes.copy_(q)


def _decode_rows(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, out: torch.Tensor, bits: int = 8) -> torch.Tensor:
    return out.copy_(decode_values(codes, absmax, signed, bits))


def encode_span(x: torch.Tensor, signed: bool, block_size: int, codes: torch.Tensor, absmax: torch.Tensor,
                bits: int = 8, u: torch.Tensor | None = None) -> None:
    """Encode fp32 span x (destroyed) into codes (``codes_numel(x.numel(), bits)`` bytes) and absmax
    (one per block). The span starts on a block boundary. ``u``: v's dither for each element (fp32,
    like x); None rounds v to nearest in the value domain (u = 1/2)."""
    unpacked = codes if bits == 8 else torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
    full, tail = _blocks(x, block_size)
    cf, ct = _blocks(unpacked, block_size)
    uf, ut = _blocks(u, block_size) if u is not None else (0.5, 0.5)
    nfull = full.shape[0]
    if nfull:
        _encode_rows(full, signed, cf, absmax[:nfull], bits, uf)
    if tail is not None:
        _encode_rows(tail, signed, ct, absmax[nfull : nfull + 1], bits, ut)
    if bits != 8:
        codes.copy_(pack_nibbles(unpacked))


def decode_span(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block_size: int, out: torch.Tensor,
                bits: int = 8) -> torch.Tensor:
    """Decode a span of codes (starting on a block boundary) into fp32 ``out`` (its numel elements)."""
    if bits != 8:
        codes = unpack_nibbles(codes, out.numel())
    cf, ct = _blocks(codes, block_size)
    of, ot = _blocks(out, block_size)
    nfull = cf.shape[0]
    if nfull:
        _decode_rows(cf, absmax[:nfull], signed, of, bits)
    if ct is not None:
        _decode_rows(ct, absmax[nfull : nfull + 1], signed, ot, bits)
    return out


def m4_codes_from_v2(codes: torch.Tensor, absmax: torch.Tensor, numel: int, block_size: int):
    """4-bit m codes and scales written by format version 2 (m = sign(q) (q / 7)**2 * absmax, code q + 7)
    re-encoded with this version's map: (codes, absmax)."""
    q = unpack_nibbles(codes.reshape(-1), numel).float() - 7.0
    m = torch.sign(q) * (q / 7.0) ** 2 * absmax.reshape(-1).repeat_interleave(block_size)[:numel]
    return quantize_blockwise(m, True, block_size, bits=4)


# ---- whole tensors (conversions, tests): chunked, so memory stays bounded ----------------------

def quantize_blockwise(x: torch.Tensor, signed: bool, block_size: int = DEFAULT_BLOCK_SIZE, bits: int = 8):
    """Quantize any floating tensor to (codes uint8 (``codes_numel(numel, bits)``,), absmax fp32 (blocks,))
    on its device."""
    check_block_size(block_size)
    check_bits(bits)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    codes = torch.empty(codes_numel(n, bits), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(n, block_size), dtype=torch.float32, device=x.device)
    for start in range(0, n, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, n)
        b0 = start // block_size
        chunk = flat[start:stop].to(torch.float32, copy=True)
        encode_span(chunk, signed, block_size, codes[codes_numel(start, bits) : codes_numel(stop, bits)],
                    absmax[b0 : b0 + num_blocks(stop - start, block_size)], bits)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block_size: int = DEFAULT_BLOCK_SIZE,
                         bits: int = 8, numel: int | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: a flat fp32 tensor of ``numel`` elements (at 8 bits
    ``codes.numel()``; at 4 bits pass it, else ``2 * codes.numel()`` is assumed)."""
    check_block_size(block_size)
    check_bits(bits)
    n = numel if numel is not None else codes.numel() * (8 // bits)
    if codes.numel() != codes_numel(n, bits):
        raise ValueError(f"{codes.numel()} bytes of {bits}-bit codes cannot hold {n} elements (need {codes_numel(n, bits)})")
    if absmax.numel() != num_blocks(n, block_size):
        raise ValueError(
            f"absmax has {absmax.numel()} blocks but {n} codes at block_size={block_size} need {num_blocks(n, block_size)}"
        )
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    for start in range(0, n, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, n)
        b0 = start // block_size
        decode_span(codes[codes_numel(start, bits) : codes_numel(stop, bits)], absmax[b0 : b0 + num_blocks(stop - start, block_size)],
                    signed, block_size, out[start:stop], bits)
    return out
