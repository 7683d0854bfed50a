"""Fused low-bit AdamW step for a whole bucket of tensors: decode -> AdamW -> encode, one pass.

Pure Triton over tensors and scalars; the state format is ``lowbit_adamw.format`` (v4: 8-bit codes, or
4-bit codes packed two per byte, chosen by the ``BITS`` constexpr) and the update
is the one written in ``lowbit_adamw.format.step_spec``. Nothing here knows about optimizers.

How a bucket becomes one launch
-------------------------------
Every tensor of a bucket (params, grads, code buffers, absmax buffers) is addressed as an element
offset from one *base* tensor of the same dtype (``base_ptr + offset + i``), so one launch covers
tensors that live in separate allocations, without copying them into a packed buffer and without
casting integers to pointers. A program owns ``BPP`` consecutive quantization blocks of one tensor
(a ``[BPP, BLOCK]`` tile), so every block's absmax is computed in registers and no program straddles
tensors. It finds its tensor by a binary search over ``prog_start`` (cumulative program counts per
tensor; T+1 int32), so the only per-launch tables are O(number of tensors), not O(programs).

Tables (built and cached by ``lowbit_adamw.step.kernel_launch``):
  ``tensor_table``  int64 [T, 10]: offsets of p, m codes, m absmax, v codes, v absmax, vmax codes,
                    vmax absmax, numel, the EMA buffer (fp32), and the tensor's slot in ``bad_blocks``.
                    Changes only when a tensor is reallocated.
  ``step_table``    int64 [T, 12]: grad offset, fp32 bits of lr/bc1, fp32 bits of 1/sqrt(bc2), skip
                    flag (the whole tensor), fp32 bits of the gradient multiplier (AMP unscale,
                    loss scale, norm clipping, accumulation mean), fp32 bits of the EMA momentum
                    (0 on a tensor's first step, so the average starts at the weights) and of
                    1 - momentum (rounded once on the host, as the PyTorch paths do), the
                    tensor's stochastic-rounding key, and its v dither: key, Weyl offset, and 1 if
                    on (0: u = 1/2) (``lowbit_adamw.format.rng``), and the index of the tensor's first
                    element in its whole parameter (a shard's offset; the random numbers' index).
                    Uploaded each step.

Arithmetic follows ``lowbit_adamw.format.step_spec`` exactly: IEEE division and square root (``div_rn``,
``sqrt_rn``) and no FMA contraction (the launch passes ``enable_fp_fusion=False``), so the GPU gives the
bits the PyTorch paths give. A block whose gradient holds NaN/Inf stores nothing (``SKIP_NONFINITE``)
and is counted in ``bad_blocks``: no second pass over the gradient, no host sync.

Two variants of one source: ``ALIGNED`` tells the compiler that offsets and sizes are multiples of 16
elements, which turns every per-element access into 128-bit vector loads/stores; the general variant
takes any tensor (views at odd offsets, odd sizes). ``benchmarks/kernel_report.py`` compiles both for
real GPU targets and reads the PTX.
"""
import triton
import triton.language as tl

STEP_COLS: tl.constexpr = tl.constexpr(12)  # columns of step_table (see above)
TENSOR_COLS: tl.constexpr = tl.constexpr(10)  # columns of tensor_table


@triton.jit
def _find_tensor(prog_start, pid, num_tensors, SEARCH_STEPS: tl.constexpr):
    lo = pid * 0
    hi = num_tensors + lo
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(prog_start + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _safe_inverse(a):
    # 1/a for a block absmax; 0 for an all-zero block, so it encodes to the code of zero.
    return tl.where(a > 0, tl.div_rn(tl.full(a.shape, 1.0, tl.float32), tl.where(a > 0, a, 1.0)), 0.0)


@triton.jit
def _round_nearest(x, OUT_DTYPE: tl.constexpr):
    # fp32 -> OUT_DTYPE, round to nearest even. bf16 is done on the bits: the interpreter's cast
    # truncates, the GPU's rounds, and the spec says nearest on both.
    if OUT_DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(OUT_DTYPE)


@triton.jit
def _load_codes(base, off, idx, pidx, mask, pvalid, BPP: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                ZERO: tl.constexpr):
    # [BPP, BLOCK] codes as fp32, ZERO where masked. At 4 bits, byte j of a block holds elements 2j
    # (low nibble) and 2j + 1 (high nibble): load [BPP, BLOCK / 2] bytes and interleave the nibbles.
    if BITS == 8:
        return tl.load(base + off + idx, mask=mask, other=ZERO).to(tl.float32)
    else:
        packed = tl.load(base + off + pidx, mask=pvalid, other=0)
        codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BPP, BLOCK))
        return tl.where(mask, codes.to(tl.float32), ZERO)


@triton.jit
def _store_codes(base, off, idx, pidx, mask, valid, pmask, codes, BPP: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr):
    # codes: [BPP, BLOCK] fp32 integers. valid: the element exists (a padding nibble is written as 0).
    if BITS == 8:
        tl.store(base + off + idx, codes.to(tl.uint8), mask=mask)
    else:
        lo, hi = tl.split(tl.reshape(tl.where(valid, codes, 0.0).to(tl.uint8), (BPP, BLOCK // 2, 2)))
        tl.store(base + off + pidx, lo | (hi << 4), mask=pmask)


@triton.jit
def _decode_m(code, a, BITS: tl.constexpr, M4_LEVELS: tl.constexpr):
    if BITS == 8:
        q = (code - 127.0) * (1.0 / 127.0)
        return q * tl.abs(q) * a
    else:  # the 16-entry table as a select tree on the code's bits: 15 selects on constants (the host's fp32
        # values), no memory; comparing the code with each entry took twice the instructions
        c = code.to(tl.int32)
        b0 = (c & 1) != 0
        b1 = (c & 2) != 0
        b2 = (c & 4) != 0
        b3 = (c & 8) != 0
        t0 = tl.where(b1, tl.where(b0, M4_LEVELS[3], M4_LEVELS[2]), tl.where(b0, M4_LEVELS[1], M4_LEVELS[0]))
        t1 = tl.where(b1, tl.where(b0, M4_LEVELS[7], M4_LEVELS[6]), tl.where(b0, M4_LEVELS[5], M4_LEVELS[4]))
        t2 = tl.where(b1, tl.where(b0, M4_LEVELS[11], M4_LEVELS[10]), tl.where(b0, M4_LEVELS[9], M4_LEVELS[8]))
        t3 = tl.where(b1, tl.where(b0, M4_LEVELS[15], M4_LEVELS[14]), tl.where(b0, M4_LEVELS[13], M4_LEVELS[12]))
        return tl.where(b3, tl.where(b2, t3, t2), tl.where(b2, t1, t0)) * a


@triton.jit
def _encode_m(m, inv, BITS: tl.constexpr, M4_BOUNDS: tl.constexpr):
    s = m * inv
    if BITS == 8:
        q = tl.floor(tl.sqrt_rn(tl.abs(s)) * 127.0 + 0.5)
        q = tl.where(q > 127.0, 127.0, q)  # s beyond 1: a saturated scale
        return tl.where(s < 0, -q, q) + 127.0
    else:  # nearest level, ties upward: the number of the 15 sorted midpoints at or below s, found bit by bit
        # (a binary search whose bound at each step is picked from constants by the bits found so far: 4 tests
        # and 11 selects, where counting took 15 tests and 15 adds; a NaN passes no test and counts 0, as before)
        b3 = s >= M4_BOUNDS[7]
        b2 = s >= tl.where(b3, M4_BOUNDS[11], M4_BOUNDS[3])
        b1 = s >= tl.where(b3, tl.where(b2, M4_BOUNDS[13], M4_BOUNDS[9]), tl.where(b2, M4_BOUNDS[5], M4_BOUNDS[1]))
        b0 = s >= tl.where(b3, tl.where(b2, tl.where(b1, M4_BOUNDS[14], M4_BOUNDS[12]), tl.where(b1, M4_BOUNDS[10], M4_BOUNDS[8])),
                           tl.where(b2, tl.where(b1, M4_BOUNDS[6], M4_BOUNDS[4]), tl.where(b1, M4_BOUNDS[2], M4_BOUNDS[0])))
        return (b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)).to(tl.float32)


@triton.jit
def _scale_magnitude(a):
    # lowbit_adamw.format: saturated at FLT_MAX, flushed to 0 below FLT_MIN (its reciprocal never overflows)
    a = tl.where(a > 3.4028234663852886e38, 3.4028234663852886e38, a)
    return tl.where(a < 1.1754943508222875e-38, 0.0, a)


@triton.jit
def _v_level(c, map_b, BITS: tl.constexpr):
    # 8 bits: map A (fourth-root companding) or, where map_b, map B (linear on [1/2, 1]); 4 bits: (c + 1) / 16
    if BITS == 8:
        y = c * (1.0 / 255.0)
        y = y * y
        return tl.where(map_b, (c + 255.0) * (1.0 / 510.0), y * y)
    else:
        return (c + 1.0) * (1.0 / 16.0)


@triton.jit
def _decode_v(code, a, BITS: tl.constexpr):
    # a: the signed scale; at 8 bits its sign selects the map. The top code of a saturated block is inf.
    if BITS == 8:
        v = _v_level(code, a < 0, BITS) * tl.abs(a)
    else:
        v = _v_level(code, False, BITS) * a
    return tl.where(v == 3.4028234663852886e38, float("inf"), v)


@triton.jit
def _encode_v(v, a, valid, u, BITS: tl.constexpr, FLAT_BRANCH: tl.constexpr):
    # (codes, map B per block), rounded between the two levels around s with the dither u
    # (lowbit_adamw.format): 8-bit map A unbiased in 1 / sqrt(v), map B and 4 bits in v. Clamps are
    # selects, so that NaN propagates as in torch.clamp.
    s = v * _safe_inverse(a)[:, None]
    if BITS == 8:
        map_b = (tl.min(tl.where(valid, s, 1.0), axis=1) >= 0.5) & (a > 0)
        r = tl.sqrt_rn(s)
        lo_a = tl.floor(tl.sqrt_rn(r) * 255.0)
        lo_a = tl.where(lo_a > 254.0, 254.0, lo_a)
        ylo = lo_a * (1.0 / 255.0)
        yhi = (lo_a + 1.0) * (1.0 / 255.0)
        low, high = ylo * ylo, yhi * yhi
        up_a = (((u * (high - low)) * r) < ((r - low) * high)) | (s >= 1.0)  # s >= 1: saturated by inf
        qa = lo_a + up_a.to(tl.float32)
        qa = tl.where((v > 0) & (qa == 0), 1.0, qa)  # a positive v never decodes to 0
        # Map B is for flat blocks (every v within a factor 2 of the largest: stationary noise); on real
        # gradients a tile almost never holds one (benchmarks/flat_blocks.py), so a tile without one skips it
        # (FLAT_BRANCH). Not with amsgrad: its two encodes' branches cost registers (sm_90's general variants
        # went from 18.75% occupancy to 12.5%).
        q = qa
        if (tl.max(map_b.to(tl.int32), axis=0) != 0) | (not FLAT_BRANCH):
            lo_b = tl.floor(s * 510.0 - 255.0)
            lo_b = tl.where(lo_b > 254.0, 254.0, tl.where(lo_b < 0.0, 0.0, lo_b))
            low_b = (lo_b + 255.0) * (1.0 / 510.0)
            high_b = ((lo_b + 1.0) + 255.0) * (1.0 / 510.0)
            qb = lo_b + ((s - low_b) > u * (high_b - low_b)).to(tl.float32)
            q = tl.where(map_b[:, None], qb, qa)
    else:
        map_b = a < 0  # never: one map at 4 bits
        lo = tl.floor(s * 16.0 - 1.0)
        lo = tl.where(lo > 14.0, 14.0, tl.where(lo < 0.0, 0.0, lo))
        low = _v_level(lo, False, BITS)
        high = _v_level(lo + 1.0, False, BITS)
        q = lo + ((s - low) > u * (high - low)).to(tl.float32)
    return q, map_b


@triton.jit
def _mix32(x):
    # lowbit_adamw.format.rng.mix32 on uint32 (multiplies wrap mod 2**32)
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x21F0AAAD, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x735A2D97, tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def _stochastic_round(x, key, idx, OUT_DTYPE: tl.constexpr):
    # Round toward zero to the 16-bit dtype, then one unit away from zero when the counter-based
    # uniform of (key, element index) is below the fraction of the gap: lowbit_adamw.step.functional.stochastic_round_.
    nearest = x.to(OUT_DTYPE)
    bits = nearest.to(tl.int16, bitcast=True)
    away = tl.abs(nearest.to(tl.float32)) > tl.abs(x)
    lo_bits = bits - away.to(tl.int16)
    lo = lo_bits.to(OUT_DTYPE, bitcast=True)
    hi = (lo_bits + 1).to(OUT_DTYPE, bitcast=True)
    lo32 = tl.abs(lo.to(tl.float32))
    gap = tl.abs(hi.to(tl.float32)) - lo32
    frac = tl.where(gap > 0, (tl.abs(x) - lo32) / tl.where(gap > 0, gap, 1.0), 0.0)
    h = _mix32(idx.to(tl.uint32) ^ key)
    u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.where(u < frac, hi, lo)


@triton.jit
def adamw8bit_kernel(
    p_base, g_base, mc_base, ma_base, vc_base, va_base, xc_base, xa_base, e_base,
    tensor_table, step_table, prog_start, num_tensors, bad_blocks,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, clip_value,
    BLOCK: tl.constexpr, BPP: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, STOCHASTIC: tl.constexpr, CLIP: tl.constexpr, EMA: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr, ALIGNED: tl.constexpr, BITS: tl.constexpr, M4_LEVELS: tl.constexpr,
    M4_BOUNDS: tl.constexpr,
):
    MZ: tl.constexpr = 127.0 if BITS == 8 else 7.0  # m's code of zero
    pid = tl.program_id(0)
    t = _find_tensor(prog_start, pid, num_tensors, SEARCH_STEPS)
    step_row = step_table + t * STEP_COLS
    skip = tl.load(step_row + 3)
    if skip == 0:
        row = tensor_table + t * TENSOR_COLS
        p_off = tl.load(row + 0)
        mc_off = tl.load(row + 1)
        ma_off = tl.load(row + 2)
        vc_off = tl.load(row + 3)
        va_off = tl.load(row + 4)
        numel = tl.load(row + 7)
        slot = tl.load(row + 9)  # the tensor's index in the whole bucket: its non-finite counter
        g_off = tl.load(step_row + 0)
        if ALIGNED:
            # The host launches this variant only for tensors whose per-element buffers start on 16-element
            # boundaries (scales on 16 bytes) and whose numel is a multiple of 16: with these facts the
            # compiler emits 128-bit loads and stores, and the masks stay constant over 16 elements.
            p_off = tl.multiple_of(p_off, 16)
            g_off = tl.multiple_of(g_off, 16)
            mc_off = tl.multiple_of(mc_off, 16)
            vc_off = tl.multiple_of(vc_off, 16)
            ma_off = tl.multiple_of(ma_off, 4)
            va_off = tl.multiple_of(va_off, 4)
            numel = tl.multiple_of(numel, 16)
        code_bytes = (numel + 1) // 2  # at 4 bits
        if ALIGNED:
            code_bytes = tl.multiple_of(code_bytes, 8)
        step_size = tl.load(step_row + 1).to(tl.int32).to(tl.float32, bitcast=True)
        inv_bc2_sqrt = tl.load(step_row + 2).to(tl.int32).to(tl.float32, bitcast=True)

        first_block = (pid - tl.load(prog_start + t)).to(tl.int64) * BPP
        blocks = first_block + tl.arange(0, BPP)
        idx = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        pidx = blocks[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]  # code bytes at 4 bits
        valid = idx < numel
        pvalid = pidx < code_bytes
        mask = valid
        pmask = pvalid
        bmask = blocks * BLOCK < numel

        g = tl.load(g_base + g_off + idx, mask=mask, other=0.0).to(tl.float32)
        if SKIP_NONFINITE:
            # |g| <= FLT_MAX is false for NaN and for +-Inf. A bad block stores nothing at all.
            bad = tl.max(tl.where(tl.abs(g) <= 3.4028234663852886e38, 0, 1), axis=1)  # 1 for a bad block
            n_bad = tl.sum(bad, axis=0)
            if n_bad > 0:
                tl.atomic_add(bad_blocks + slot, n_bad)
            good = bad == 0
            bmask = bmask & good
            mask = mask & good[:, None]
            pmask = pmask & good[:, None]

        # decode (lowbit_adamw.format): m = sign(q) (q/127)^2 absmax or M4_LEVELS[c] absmax; v = (c/255)^4 absmax or (c+1)/16 absmax
        m = _decode_m(_load_codes(mc_base, mc_off, idx, pidx, mask, pvalid, BPP, BLOCK, BITS, MZ),
                      tl.load(ma_base + ma_off + blocks, mask=bmask, other=0.0)[:, None], BITS, M4_LEVELS)
        v = _decode_v(_load_codes(vc_base, vc_off, idx, pidx, mask, pvalid, BPP, BLOCK, BITS, 0),
                      tl.load(va_base + va_off + blocks, mask=bmask, other=0.0)[:, None], BITS)
        if BITS != 8:  # a 4-bit code of 0 decodes to absmax / 16: masked lanes must not count (8 bits: 0 already)
            v = tl.where(mask, v, 0.0)

        p_raw = tl.load(p_base + p_off + idx, mask=mask, other=0.0)
        p = p_raw.to(tl.float32)
        g = g * tl.load(step_row + 4).to(tl.int32).to(tl.float32, bitcast=True)
        if CLIP:
            g = tl.minimum(tl.maximum(g, -clip_value), clip_value)
        if MAXIMIZE:
            g = -g

        p = p * decay
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        if AMSGRAD:
            xc_off = tl.load(row + 5)
            xa_off = tl.load(row + 6)
            if ALIGNED:
                xc_off = tl.multiple_of(xc_off, 16)
                xa_off = tl.multiple_of(xa_off, 4)
            vmax = _decode_v(_load_codes(xc_base, xc_off, idx, pidx, mask, pvalid, BPP, BLOCK, BITS, 0),
                             tl.load(xa_base + xa_off + blocks, mask=bmask, other=0.0)[:, None], BITS)
            if BITS != 8:
                vmax = tl.where(mask, vmax, 0.0)
            vh = tl.maximum(vmax, v)
        else:
            vh = v
        denom = tl.sqrt_rn(vh) * inv_bc2_sqrt + eps
        p = p - step_size * tl.div_rn(m, denom)

        if STOCHASTIC:
            key = tl.load(step_row + 7).to(tl.uint32)
            out = _stochastic_round(p, key, idx + tl.load(step_row + 11), p_raw.dtype)
        else:
            out = _round_nearest(p, p_raw.dtype)
        tl.store(p_base + p_off + idx, out, mask=mask)
        if EMA:  # Keras' use_ema: ema = momentum * ema + (1 - momentum) * (the weight as stored)
            e_off = tl.load(row + 8)
            if ALIGNED:
                e_off = tl.multiple_of(e_off, 16)
            mom = tl.load(step_row + 5).to(tl.int32).to(tl.float32, bitcast=True)
            one_minus_mom = tl.load(step_row + 6).to(tl.int32).to(tl.float32, bitcast=True)
            ema = tl.load(e_base + e_off + idx, mask=mask, other=0.0)
            tl.store(e_base + e_off + idx, ema * mom + out.to(tl.float32) * one_minus_mom, mask=mask)

        # encode m (8 bits: square-root companding; 4 bits: nearest of the table's levels, the scale's sign
        # on the side of the block's largest |m|; masked lanes hold 0, which changes neither side's test)
        am = _scale_magnitude(tl.max(tl.abs(m), axis=1))
        if BITS == 8:
            sm = am
        else:
            sm = tl.where(-tl.min(m, axis=1) > tl.max(m, axis=1), -am, am)
        _store_codes(mc_base, mc_off, idx, pidx, mask, valid, pmask,
                     _encode_m(m, tl.where(am > 0, tl.div_rn(tl.full(sm.shape, 1.0, tl.float32), tl.where(am > 0, sm, 1.0)), 0.0)[:, None],
                               BITS, M4_BOUNDS),
                     BPP, BLOCK, BITS)
        tl.store(ma_base + ma_off + blocks, sm, mask=bmask)

        # encode v (8 bits: map A or B, zero-point guard; 4 bits: zero-free linear), dithered (lowbit_adamw.format.rng)
        h = _mix32((idx + tl.load(step_row + 11)).to(tl.uint32) ^ tl.load(step_row + 8).to(tl.uint32)) + tl.load(step_row + 9).to(tl.uint32)
        u = tl.where(tl.load(step_row + 10) != 0, (h >> 8).to(tl.float32) * (1.0 / 16777216.0), 0.5)
        av = _scale_magnitude(tl.max(v, axis=1))
        qv, vb = _encode_v(v, av, valid, u, BITS, not AMSGRAD)
        _store_codes(vc_base, vc_off, idx, pidx, mask, valid, pmask, qv, BPP, BLOCK, BITS)
        tl.store(va_base + va_off + blocks, tl.where(vb, -av, av), mask=bmask)
        if AMSGRAD:
            ax = _scale_magnitude(tl.max(vh, axis=1))
            qx, xb = _encode_v(vh, ax, valid, u, BITS, False)
            _store_codes(xc_base, xc_off, idx, pidx, mask, valid, pmask, qx, BPP, BLOCK, BITS)
            tl.store(xa_base + xa_off + blocks, tl.where(xb, -ax, ax), mask=bmask)


def launch_adamw8bit(
    bases, tensor_table, step_table, prog_start, num_tensors, num_programs, scalars, bad_blocks,
    *, block_size, blocks_per_program, amsgrad, maximize, stochastic, clip_value=float("inf"), ema=False,
    skip_nonfinite=True, aligned=False, num_warps=4, bits=8, m4_table=((), ()),
):
    """Launch the kernel once over ``num_programs`` programs. ``bases`` are the 9 base tensors
    (p, g, m codes, m absmax, v codes, v absmax, vmax codes, vmax absmax, ema); ``scalars`` is
    (decay, beta1, 1-beta1, beta2, 1-beta2, eps) as Python floats (runtime arguments: a schedule never
    recompiles the kernel). ``clip_value`` clamps each (scaled) gradient element; inf turns it off.
    ``bad_blocks`` (int32, one slot per tensor, see the table's slot column) receives the count of
    blocks skipped for a non-finite gradient. ``aligned`` selects the vectorized variant: only for
    tensors that satisfy its alignment facts (see the kernel). ``m4_table`` is (levels, bounds) of the
    4-bit m map (``lowbit_adamw.format.M4_LEVELS`` / ``M4_BOUNDS``), compiled in as constants."""
    if num_programs == 0:
        return
    if bits == 4 and (len(m4_table[0]), len(m4_table[1])) != (16, 15):
        raise ValueError("bits=4 needs m4_table=(16 levels, 15 bounds): lowbit_adamw.format.M4_LEVELS, M4_BOUNDS")
    adamw8bit_kernel[(num_programs,)](
        *bases, tensor_table, step_table, prog_start, num_tensors, bad_blocks, *scalars,
        clip_value if clip_value != float("inf") else 0.0,
        **variant_constexprs(num_tensors, block_size, blocks_per_program, amsgrad, maximize, stochastic,
                             clip_value != float("inf"), ema, skip_nonfinite, aligned, bits, m4_table),
        num_warps=num_warps,
        enable_fp_fusion=False,  # the spec's arithmetic: every multiply and add rounded on its own
    )


def variant_constexprs(num_tensors, block_size, blocks_per_program, amsgrad, maximize, stochastic, clip, ema,
                       skip_nonfinite, aligned, bits=8, m4_table=((), ())) -> dict:
    """The compile-time arguments of one kernel variant (shared with the ahead-of-time kernel report)."""
    return dict(
        BLOCK=block_size, BPP=blocks_per_program, SEARCH_STEPS=max(1, int(num_tensors).bit_length()),
        AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), STOCHASTIC=bool(stochastic), CLIP=bool(clip), EMA=bool(ema),
        SKIP_NONFINITE=bool(skip_nonfinite), ALIGNED=bool(aligned), BITS=int(bits),
        M4_LEVELS=tuple(m4_table[0]), M4_BOUNDS=tuple(m4_table[1]),
    )
