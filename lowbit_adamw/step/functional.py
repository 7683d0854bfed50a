"""The AdamW update over 8-bit blockwise state: one signature, three implementations.

``adamw8bit_step`` takes a bucket of parameters (one device, one dtype) with their gradients and
state dicts, and updates them in place. ``backend="torch"`` runs the chunked, vectorised PyTorch
path below (eager; the test oracle); ``backend="cpp"`` runs every block of the bucket through one call
of a small C++ library (``lowbit_adamw.step.cpu_kernel``: the fast CPU path, float32 and bfloat16 weights;
other tensors go to the compiled path); ``backend="compiled"`` runs the same math as one
``torch.compile``d function over whole quantization blocks (inductor fuses decode, update and encode
into one C++ loop nest), with the eager code for a tensor's last partial block;
``backend="triton"`` runs the fused Triton kernel (``lowbit_adamw.kernels``) for CUDA tensors, or
on CPU tensors under ``TRITON_INTERPRET=1``.

What each computes, to the bit, is written once in ``lowbit_adamw.format.step_spec``; the state format in
``lowbit_adamw.format``. The eager path spells every operation out (no ``add(alpha=)``, ``addcmul``
or ``addcdiv``, which ATen contracts into FMAs on AVX2/AVX-512 builds and not on others), so it gives
the same bits on every CPU, and the same bits as the other two backends.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.optim.adamw import adamw as torch_adamw

from .. import format as fmt
from ..format import rng
from ..format.step_spec import StepScalars, state_names

__all__ = ["StepScalars", "state_names", "adamw8bit_step", "fp32_state_step", "stochastic_round_"]


# ---- stochastic rounding ------------------------------------------------------------------------
# Rule (shared with the kernel): round toward zero to the 16-bit dtype, then move one unit away from
# zero with probability (|x| - |lo|) / (|hi| - |lo|). Expected value equals x, so updates smaller
# than half a 16-bit ulp still move the weight on average instead of being lost.

def _toward_zero(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        # bf16 is the top half of an fp32: truncating the low 16 bits rounds toward zero exactly.
        return (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    lo = x.to(dtype)
    bits = lo.view(torch.int16)
    # Round-to-nearest went away from zero: step one unit back (sign-magnitude: bits - 1).
    away = lo.float().abs() > x.abs()
    return (bits - away.to(torch.int16)).view(dtype)


def _stochastic_pick(x: torch.Tensor, dtype: torch.dtype, u: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to the 16-bit ``dtype`` by the rule above, with uniforms ``u`` (same shape)."""
    lo = _toward_zero(x, dtype)
    hi = (lo.view(torch.int16) + 1).view(dtype)  # one unit further from zero
    lo32, hi32 = lo.float(), hi.float()
    gap = (hi32 - lo32).abs()
    frac = torch.where(gap > 0, (x.abs() - lo32.abs()) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    return torch.where(u < frac, hi, lo)


def stochastic_round_(dst: torch.Tensor, x: torch.Tensor, key: int, start: int = 0) -> None:
    """Write fp32 ``x`` (flat) into 16-bit ``dst`` with stochastic rounding (the rule above), with the
    counter-based uniforms of ``lowbit_adamw.format.rng`` for elements ``start ..`` under ``key``."""
    dst.copy_(_stochastic_pick(x, dst.dtype, rng.uniform(key, start, x.numel(), x.device).view(x.shape)))


# ---- the PyTorch path ---------------------------------------------------------------------------

def _update_chunk(p32, g, m, v, vmax, sc: StepScalars, step_size: float, inv_bc2_sqrt: float, grad_mul: float = 1.0):
    """In-place AdamW math on fp32 chunk tensors (g may be the caller's fp32 copy, it is scratch).
    One rounded operation at a time, in step_spec's order."""
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps = sc.constants()
    if grad_mul != 1.0:
        g.mul_(grad_mul)
    if sc.clip_value != math.inf:
        g.clamp_(-sc.clip_value, sc.clip_value)
    if sc.maximize:
        g.neg_()
    if decay != 1.0:
        p32.mul_(decay)
    t = torch.mul(g, one_minus_beta1)
    m.mul_(beta1).add_(t)
    torch.mul(g, g, out=t).mul_(one_minus_beta2)
    v.mul_(beta2).add_(t)
    if vmax is not None:
        torch.maximum(vmax, v, out=vmax)
        vh = vmax
    else:
        vh = v
    denom = g.copy_(fmt.sqrt_rn(vh))  # g is no longer needed: reuse its memory
    if inv_bc2_sqrt != 1.0:
        denom.mul_(inv_bc2_sqrt)
    denom.add_(eps)
    torch.div(m, denom, out=t).mul_(step_size)
    p32.sub_(t)


def _rounded_param(dst: torch.Tensor, p32: torch.Tensor, sr_key: int | None, start: int) -> torch.Tensor:
    """p32 in dst's dtype, as the step writes it (nearest even, or stochastic for 16-bit with a key)."""
    if dst.dtype == torch.float32:
        return p32
    if sr_key is not None:
        out = torch.empty_like(dst)
        stochastic_round_(out, p32, sr_key, start)
        return out
    return p32.to(dst.dtype)


def _block_flags_to_elements(ok_blocks: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    return ok_blocks.repeat_interleave(block_size)[:n]


def _finite_blocks(g32: torch.Tensor, block_size: int) -> torch.Tensor:
    """One bool per block of g32 (starting on a block boundary): no NaN/Inf in the block."""
    full, tail = fmt._blocks(g32, block_size)
    ok = torch.isfinite(full).all(dim=1)
    if tail is not None:
        ok = torch.cat([ok, torch.isfinite(tail).all(dim=1)])
    return ok


# ---- the compiled path --------------------------------------------------------------------------
# The same formulas as _update_chunk and format's _decode_rows/_encode_rows, in the same order, on
# (rows, block_size) views of whole blocks. Scalars arrive as one fp32 tensor computed in float64 on
# the host (as the eager path's Python scalars are), so changing lr never recompiles. Inductor's C++
# is built with -ffp-contract=off, so no FMA appears that the spec does not have.

COMPILED_CHUNK_ELEMENTS = 1 << 20  # elements per compiled call: large enough to amortise the call
RECOMPILE_LIMIT = 128


def _decode(codes, absmax, signed: bool, bits: int = 8):
    return fmt.decode_values(codes if bits == 8 else fmt.unpack_nibbles(codes), absmax, signed, bits)


def _encode(x, signed: bool, codes, absmax, ok=None, bits: int = 8, u=0.5):
    """Encode rows of x into codes/absmax; rows where ``ok`` (rows, 1) is False keep their old bytes."""
    q, a = fmt.encode_values(x, signed, bits, u, sqrt=torch.sqrt)  # inductor's sqrt is correctly rounded
    if ok is not None:
        # Select in fp32, then cast once: the graph the 8-bit step's speed was measured with.
        q = torch.where(ok, q, (codes if bits == 8 else fmt.unpack_nibbles(codes)).float())
        a = torch.where(ok[:, 0], a, absmax)
    q = q.to(torch.uint8)
    codes.copy_(q if bits == 8 else fmt.pack_nibbles(q))
    absmax.copy_(a)


def _block_step(p, g, codes: list, absmax: list, k, amsgrad: bool, maximize: bool, clip: bool, ema=None, skip_nonfinite=False,
                bits: int = 8, sr_key=None, v_dither=None):
    """k = [1 - lr*wd, beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / bc1, 1 / sqrt(bc2), grad
    multiplier, clip value, ema momentum, 1 - ema momentum] (fp32). ``sr_key``: None, or int64
    [key, index of the first element] for stochastic rounding of 16-bit weights (``lowbit_adamw.format.rng``).
    ``v_dither``: None (nearest), or int64 [key, offset, index of the first element] of v's dither.
    Returns the number of rows (blocks) skipped for a non-finite gradient (0-d int64)."""
    ok = torch.isfinite(g).all(dim=1, keepdim=True) if skip_nonfinite else None
    g32 = g.float() * k[8]
    if clip:
        g32 = torch.minimum(torch.maximum(g32, -k[9]), k[9])
    if maximize:
        g32 = -g32
    m = _decode(codes[0], absmax[0], True, bits) * k[1] + g32 * k[2]
    v = _decode(codes[1], absmax[1], False, bits) * k[3] + (g32 * g32) * k[4]
    vh = v
    if amsgrad:
        vh = torch.maximum(_decode(codes[2], absmax[2], False, bits), v)
    denom = torch.sqrt(vh) * k[7] + k[5]
    p32 = p.float() * k[0] - k[6] * (m / denom)
    if sr_key is not None:
        idx = (torch.arange(p.numel(), dtype=torch.int64, device=p.device).view(p.shape) + sr_key[1]) & rng.MASK32
        u = (rng.mix32_tensor(idx ^ sr_key[0]) >> 8).to(torch.float32) * (2.0**-24)
        p_new = _stochastic_pick(p32, p.dtype, u)
    else:
        p_new = p32.to(p.dtype)
    if ok is not None:
        p_new = torch.where(ok, p_new, p)
    if ema is not None:
        ema_new = ema * k[10] + p_new.float() * k[11]
        ema.copy_(ema_new if ok is None else torch.where(ok, ema_new, ema))
    p.copy_(p_new)
    u = 0.5
    if v_dither is not None:
        idx = (torch.arange(p.numel(), dtype=torch.int64, device=p.device).view(p.shape) + v_dither[2]) & rng.MASK32
        u = (((rng.mix32_tensor(idx ^ v_dither[0]) + v_dither[1]) & rng.MASK32) >> 8).to(torch.float32) * (2.0**-24)
    _encode(m, True, codes[0], absmax[0], ok, bits)
    _encode(v, False, codes[1], absmax[1], ok, bits, u)
    if amsgrad:
        _encode(vh, False, codes[2], absmax[2], ok, bits, u)
    if ok is None:
        return torch.zeros((), dtype=torch.int64)
    return (~ok).sum()


_compiled: dict = {}
_compiled_variants: set = set()  # variants already compiled (see _compiled_spans)


def compiled_available() -> bool:
    """Whether the compiled CPU step can be used: torch.compile works here and has not failed before."""
    if "ok" not in _compiled:
        import shutil

        _compiled["ok"] = hasattr(torch, "compile") and any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    return _compiled["ok"]


def _compiled_block_step():
    fn = _compiled.get("fn")
    if fn is None:
        # emulate_precision_casts: without it inductor folds p32.to(bf16).float() into p32, and the EMA
        # would average the unrounded weight instead of the weight as stored.
        fn = _compiled["fn"] = torch.compile(_block_step, dynamic=False, fullgraph=True,
                                             options={"emulate_precision_casts": True})
    return fn


def _compiled_spans(param, grad, state, sc: StepScalars, block_size: int, grad_mul: float = 1.0, ema_mom=None,
                    bad_blocks=None, bits: int = 8, sr_key: int | None = None, v_dither=None, index_base: int = 0) -> int:
    """Run the compiled step over the whole blocks of a tensor; return where the eager path resumes
    (the last partial block), or 0 if compiling failed (then everything goes eager from now on)."""
    n = param.numel()
    nfull = n // block_size * block_size
    if nfull == 0:
        return 0
    step_size, inv_bc2_sqrt = sc.corrections(float(state["step"]))
    clip = sc.clip_value != math.inf
    k = torch.tensor([*sc.constants(), step_size, inv_bc2_sqrt, grad_mul, sc.clip_value if clip else 0.0,
                      ema_mom or 0.0, 1.0 - (ema_mom or 0.0)],
                     dtype=torch.float32, device=param.device)
    names = state_names(sc.amsgrad)
    flat_p, flat_g = param.view(-1), grad.reshape(-1)
    fn = _compiled_block_step()
    for start in range(0, nfull, COMPILED_CHUNK_ELEMENTS):
        stop = min(start + COMPILED_CHUNK_ELEMENTS, nfull)
        rows = (stop - start) // block_size
        b0, b1 = start // block_size, stop // block_size
        tensors = (flat_p[start:stop].view(rows, block_size), flat_g[start:stop].view(rows, block_size),
                   [state[nm + "_codes"][fmt.codes_numel(start, bits) : fmt.codes_numel(stop, bits)].view(rows, -1) for nm in names],
                   [state[nm + "_absmax"][b0:b1] for nm in names])
        ema = None if ema_mom is None else state["ema"].view(-1)[start:stop].view(rows, block_size)
        key = None if sr_key is None else torch.tensor([sr_key, index_base + start], dtype=torch.int64, device=param.device)
        dither = None if v_dither is None else torch.tensor([*v_dither, index_base + start], dtype=torch.int64,
                                                            device=param.device)
        # The row count varies from tensor to tensor, the block size does not: one graph per block size.
        for t in (tensors[0], tensors[1], *tensors[2], *tensors[3], *([ema] if ema is not None else [])):
            torch._dynamo.mark_dynamic(t, 0)
        # One graph per (param dtype, block size, flags, rows == 1): a process that mixes many (the
        # tests do) would pass dynamo's default of 8 recompiles, so the limit is raised for our calls
        # that may compile. Only those: the patch costs about 1 ms, more than a small call.
        args = (*tensors, k, sc.amsgrad, sc.maximize, clip, ema, sc.skip_nonfinite, bits, key, dither)
        variant = (param.dtype, grad.dtype, block_size, sc.amsgrad, sc.maximize, clip, ema is not None, sc.skip_nonfinite,
                   rows == 1, param.device.type, bits, key is not None, dither is not None)
        try:
            skipped = None
            if variant in _compiled_variants:
                try:
                    skipped = fn(*args)
                except torch._dynamo.exc.FailOnRecompileLimitHit:
                    _compiled_variants.clear()  # dynamo's caches were reset (torch._dynamo.reset()): compile again
            if skipped is None:
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    skipped = fn(*args)
                _compiled_variants.add(variant)
        except Exception as e:  # no working C++ toolchain, an unsupported platform, ...
            if start:
                raise  # part of the tensor is already updated: not safe to redo eagerly
            import warnings

            _compiled["ok"] = False
            warnings.warn(f"AdamW8bit: torch.compile of the CPU step failed ({type(e).__name__}: {e}); using the eager "
                          "PyTorch step from now on", RuntimeWarning, stacklevel=4)
            return 0
        if bad_blocks is not None and sc.skip_nonfinite:
            bad_blocks.add_(skipped)
    return nfull


def _ema_update(ema: torch.Tensor, written: torch.Tensor, mom: float) -> torch.Tensor:
    """ema * mom + (the weight as stored) * (1 - mom), in the EMA's dtype (fp32; float64 for float64
    weights), as a new tensor."""
    return ema.mul(mom).add_(written.to(ema.dtype) * (1.0 - mom))


def _torch_step_8bit(param: torch.Tensor, grad: torch.Tensor, state: dict, sc: StepScalars, block_size: int,
                     compiled: bool = False, grad_mul: float = 1.0, ema_mom: float | None = None,
                     bad_blocks: torch.Tensor | None = None, bits: int = 8, sr_key: int | None = None,
                     v_dither: tuple[int, int] | None = None, index_base: int = 0) -> None:
    step_size, inv_bc2_sqrt = sc.corrections(float(state["step"]))
    names = state_names(sc.amsgrad)
    flat_p = param.view(-1)
    flat_g = grad.reshape(-1)
    n = flat_p.numel()
    if param.dtype == torch.float32:
        sr_key = None  # stochastic rounding is for 16-bit weights
    first = 0
    if compiled and compiled_available():
        first = _compiled_spans(param, grad, state, sc, block_size, grad_mul, ema_mom, bad_blocks, bits, sr_key, v_dither,
                                index_base)
    for start in range(first, n, fmt.CHUNK_ELEMENTS):
        stop = min(start + fmt.CHUNK_ELEMENTS, n)
        b0, b1 = start // block_size, fmt.num_blocks(stop, block_size)
        g32 = flat_g[start:stop].to(torch.float32, copy=True)
        ok = ok_blocks = None
        if sc.skip_nonfinite:  # step_spec's block rule: bad blocks are computed, then not written
            ok_blocks = _finite_blocks(g32, block_size)
            if bad_blocks is not None:
                bad_blocks.add_((~ok_blocks).sum())
            # On the CPU reading the flags costs nothing, and an all-finite chunk (the usual case)
            # needs no masking; elsewhere (eager CUDA, no Triton) mask always rather than wait for the host.
            if param.device.type != "cpu" or not bool(ok_blocks.all()):
                ok = _block_flags_to_elements(ok_blocks, stop - start, block_size)
            else:
                ok_blocks = None
        moments = []
        for name in names:
            codes = state[name + "_codes"][fmt.codes_numel(start, bits) : fmt.codes_numel(stop, bits)]
            absmax = state[name + "_absmax"][b0:b1]
            buf = torch.empty(stop - start, dtype=torch.float32, device=param.device)
            moments.append((name, codes, absmax, fmt.decode_span(codes, absmax, fmt.is_signed(name), block_size, buf, bits)))
        p_chunk = flat_p[start:stop]
        p32 = p_chunk.to(torch.float32, copy=True)
        vmax = moments[2][3] if sc.amsgrad else None
        _update_chunk(p32, g32, moments[0][3], moments[1][3], vmax, sc, step_size, inv_bc2_sqrt, grad_mul)
        written = _rounded_param(p_chunk, p32, sr_key, index_base + start)
        if ok is not None:
            written = torch.where(ok, written, p_chunk)
        if ema_mom is not None:
            ema = state["ema"].view(-1)[start:stop]
            new_ema = _ema_update(ema, written, ema_mom)
            ema.copy_(new_ema if ok is None else torch.where(ok, new_ema, ema))
        p_chunk.copy_(written)
        u = None if v_dither is None else rng.dither(*v_dither, index_base + start, stop - start, param.device)
        for name, codes, absmax, buf in moments:
            uu = None if fmt.is_signed(name) else u
            if ok is None:
                fmt.encode_span(buf, fmt.is_signed(name), block_size, codes, absmax, bits, uu)
                continue
            new_codes, new_absmax = torch.empty_like(codes), torch.empty_like(absmax)
            fmt.encode_span(buf, fmt.is_signed(name), block_size, new_codes, new_absmax, bits, uu)
            codes.copy_(torch.where(ok[:: 8 // bits], new_codes, codes))  # a byte never spans two blocks
            absmax.copy_(torch.where(ok_blocks, new_absmax, absmax))


def _torch_step_fp32_state(param, grad, state, sc: StepScalars, sr_key: int | None, grad_mul: float = 1.0,
                           index_base: int = 0) -> None:
    """fp32 state for a 16-bit parameter (torch's fused AdamW wants state in the parameter dtype)."""
    step_size, inv_bc2_sqrt = sc.corrections(float(state["step"]))
    flat_p, flat_g = param.view(-1), grad.reshape(-1)
    m_all, v_all = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
    vmax_all = state["max_exp_avg_sq"].view(-1) if sc.amsgrad else None
    for start in range(0, flat_p.numel(), fmt.CHUNK_ELEMENTS):
        sl = slice(start, start + fmt.CHUNK_ELEMENTS)
        p32 = flat_p[sl].float()
        g32 = flat_g[sl].to(torch.float32, copy=True)
        _update_chunk(p32, g32, m_all[sl], v_all[sl], None if vmax_all is None else vmax_all[sl], sc, step_size, inv_bc2_sqrt,
                      grad_mul)
        flat_p[sl].copy_(_rounded_param(flat_p[sl], p32, sr_key, index_base + start))


def effective_grad_muls(grad_muls: list[float] | None, grad_mul_tensor: torch.Tensor | None, n: int) -> list[float]:
    """step_spec's gradient multiplier per tensor as host floats: ``fp32(host) * fp32(device)``, one
    fp32 multiply (the device factor is read back, which costs nothing for CPU tensors)."""
    host = torch.tensor([1.0] * n if grad_muls is None else grad_muls, dtype=torch.float32)
    if grad_mul_tensor is not None:
        host = host * grad_mul_tensor.detach().to(device="cpu", dtype=torch.float32)
    return host.tolist()


def adamw8bit_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    scalars: StepScalars,
    *,
    block_size: int = fmt.DEFAULT_BLOCK_SIZE,
    backend: str = "torch",
    blocks_per_program: int | None = None,
    plan_cache: dict | None = None,
    grad_muls: list[float] | None = None,
    grad_mul_tensor: torch.Tensor | None = None,
    ema_moms: list[float] | None = None,
    bad_blocks: torch.Tensor | None = None,
    bits: int = 8,
    sr_keys: list[int] | None = None,
    v_dithers: list[tuple[int, int]] | None = None,
    index_bases: list[int] | None = None,
) -> None:
    """Update a bucket of parameters with quantized state (``bits`` 8 or 4, see ``format``) in place.
    Every tensor is flat (1-d) in the order its blocks run (see ``lowbit_adamw.format.layout``), and
    ``state["step"]`` is already incremented. All tensors of the bucket share one device and one
    parameter dtype. The gradient multiplier of tensor ``i`` is ``grad_muls[i]`` (default 1) times
    ``grad_mul_tensor[i]`` (fp32, on the device; e.g. a clipping factor computed without a host sync),
    one fp32 multiply. ``ema_moms`` (one float per tensor, or None for no EMA) updates
    ``state["ema"]`` (fp32) from the new weights. ``bad_blocks`` (int32, one per tensor, on the
    parameters' device) accumulates the number of blocks left untouched because their gradient had
    NaN/Inf (``scalars.skip_nonfinite``); nothing is read back. ``sr_keys`` (one ``lowbit_adamw.format.rng``
    key per tensor) drive stochastic rounding of 16-bit weights when ``scalars.stochastic_rounding``.
    ``v_dithers`` (``(rng.dither_key, rng.dither_offset)`` per tensor) drive the rounding of v's codes
    (``lowbit_adamw.format``); None rounds v with u = 1/2. ``index_bases``: per tensor, the index of its
    first element in the whole parameter (a shard's offset), which the random numbers are indexed by.

    ``blocks_per_program`` and ``plan_cache`` only concern the Triton backend: quantization blocks per
    kernel program (a power of two), and a dict the caller keeps so per-tensor tables are built once."""
    if not params:
        return
    if scalars.stochastic_rounding and sr_keys is None:
        raise ValueError("stochastic_rounding needs sr_keys (one lowbit_adamw.format.rng key per tensor)")
    keys = sr_keys if scalars.stochastic_rounding else [None] * len(params)
    if backend in ("torch", "compiled", "cpp"):
        muls = effective_grad_muls(grad_muls, grad_mul_tensor, len(params))
        rest = range(len(params))
        if backend == "cpp":
            from . import cpu_kernel

            fast = [i for i, p in enumerate(params) if cpu_kernel.supports(p, scalars)] if cpu_kernel.available() else []
            if fast:
                sel = lambda xs: None if xs is None else [xs[i] for i in fast]  # noqa: E731
                counts = cpu_kernel.cpu_step(sel(params), sel(grads), sel(states), scalars, block_size=block_size, bits=bits,
                                             grad_muls=sel(muls), ema_moms=sel(ema_moms), sr_keys=sel(keys),
                                             v_dithers=sel(v_dithers), index_bases=sel(index_bases))
                if bad_blocks is not None and scalars.skip_nonfinite:
                    if len(fast) == len(params):
                        bad_blocks += counts.to(bad_blocks.dtype)
                    else:
                        bad_blocks[fast] += counts.to(bad_blocks.dtype)
            # other dtypes, no library: the compiled step
            rest = sorted(set(rest) - set(fast))
        moms = [None] * len(params) if ema_moms is None else ema_moms
        for i in rest:
            _torch_step_8bit(params[i], grads[i], states[i], scalars, block_size, compiled=backend != "torch",
                             grad_mul=muls[i], ema_mom=moms[i], bad_blocks=None if bad_blocks is None else bad_blocks[i],
                             bits=bits, sr_key=keys[i], v_dither=None if v_dithers is None else v_dithers[i],
                             index_base=0 if index_bases is None else index_bases[i])
    elif backend == "triton":
        from .kernel_launch import triton_step_8bit

        triton_step_8bit(
            params, grads, states, scalars, block_size=block_size, blocks_per_program=blocks_per_program,
            plan_cache=plan_cache, grad_muls=grad_muls, grad_mul_tensor=grad_mul_tensor, ema_moms=ema_moms,
            bad_blocks=bad_blocks, bits=bits, sr_keys=keys, v_dithers=v_dithers, index_bases=index_bases,
        )
    else:
        raise ValueError(f"backend must be 'torch', 'compiled', 'cpp' or 'triton', got {backend!r}")


def fp32_state_step(params, grads, states, scalars: StepScalars, *, foreach: bool | None = None, fused: bool | None = None,
                    grad_muls: list[float] | None = None, grad_mul_tensor: torch.Tensor | None = None,
                    ema_moms: list[float] | None = None, bad_tensors: torch.Tensor | None = None,
                    sr_keys: list[int] | None = None, index_bases: list[int] | None = None) -> None:
    """Update parameters that keep full-precision exp_avg/exp_avg_sq (fp32, or float64 for float64
    parameters), each flat in its block order. float32 and float64 parameters go to torch's own fused
    (or foreach) AdamW; 16-bit ones are updated in fp32 by the chunked path above. ``state["step"]`` is
    incremented here (torch's AdamW does it). Gradient multipliers as in :func:`adamw8bit_step`.

    With ``scalars.skip_nonfinite`` a tensor whose gradient has NaN/Inf keeps its parameter and state
    (its step counter advances) and ``bad_tensors`` (int32 per tensor) counts it. On the CPU the flags are
    read on the host (free there); elsewhere every tensor is updated and the bad ones are put back from
    a copy on the device, so nothing waits for the host."""
    if not params:
        return
    n = len(params)
    keys = sr_keys if scalars.stochastic_rounding and sr_keys is not None else [None] * n
    if scalars.skip_nonfinite:
        ok = torch.stack([torch.isfinite(g).all() for g in grads])
        if bad_tensors is not None:
            bad_tensors.add_((~ok).to(bad_tensors.dtype))
        plain = dataclasses.replace(scalars, skip_nonfinite=False)
        kw = dict(foreach=foreach, fused=fused)
        if params[0].device.type == "cpu":
            keep = [i for i, fine in enumerate(ok.tolist()) if fine]
            for i in set(range(n)) - set(keep):
                states[i]["step"] += 1
            sel = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
            if keep:
                fp32_state_step(sel(params), sel(grads), sel(states), plain, grad_muls=sel(grad_muls),
                                grad_mul_tensor=None if grad_mul_tensor is None else grad_mul_tensor[keep],
                                ema_moms=sel(ema_moms), sr_keys=sel(keys), index_bases=sel(index_bases), **kw)
            return
        names = [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ema") if k in states[0]]
        before = [(p.detach().clone(), {k: s[k].clone() for k in names}) for p, s in zip(params, states)]
        fp32_state_step(params, grads, states, plain, grad_muls=grad_muls, grad_mul_tensor=grad_mul_tensor, ema_moms=ema_moms,
                        sr_keys=keys, index_bases=index_bases, **kw)
        for i, (p, s) in enumerate(zip(params, states)):
            p0, s0 = before[i]
            p.copy_(torch.where(ok[i], p, p0))
            for k in names:
                s[k].copy_(torch.where(ok[i], s[k], s0[k]))
        return
    on_cpu = all(p.device.type == "cpu" for p in params)
    if on_cpu or grad_mul_tensor is None:
        muls = effective_grad_muls(grad_muls, grad_mul_tensor, n)
        mul_of = lambda i: muls[i]  # noqa: E731
        scaled = lambda i: muls[i] != 1.0  # noqa: E731
    else:  # a device factor stays on the device: no host sync
        dev = torch.tensor([1.0] * n if grad_muls is None else grad_muls, dtype=torch.float32).to(grad_mul_tensor.device)
        dev = dev * grad_mul_tensor.to(torch.float32)
        mul_of = lambda i: dev[i]  # noqa: E731
        scaled = lambda i: True  # noqa: E731
    # torch's AdamW has no switch for bias correction: without it, everything takes the path below.
    use_torch = lambda p: p.dtype in (torch.float32, torch.float64) and scalars.bias_correction  # noqa: E731
    full = [i for i, p in enumerate(params) if use_torch(p)]
    other = [i for i, p in enumerate(params) if not use_torch(p)]
    for dtype in (torch.float32, torch.float64):
        idx = [i for i in full if params[i].dtype == dtype]
        if not idx:
            continue
        sel = lambda xs: [xs[i] for i in idx]  # noqa: E731
        ps, ss, gs = sel(params), sel(states), sel(grads)
        if any(scaled(i) for i in idx) or scalars.clip_value != math.inf:
            # torch's AdamW has no gradient multiplier or clamp: transform copies (full-precision tensors are the small ones)
            gs = [(g * mul_of(i)).clamp_(-scalars.clip_value, scalars.clip_value) for i, g in zip(idx, gs)]
        # Our step counters live on the CPU (as torch's non-fused AdamW keeps them); torch's fused
        # kernel wants them on the parameter's device, so fused is used for CPU parameters only.
        use_fused = fused
        if fused is None and foreach is None:
            use_fused = on_cpu
        use_fused = bool(use_fused) and on_cpu
        torch_adamw(
            ps,
            gs,
            [s["exp_avg"] for s in ss],
            [s["exp_avg_sq"] for s in ss],
            [s["max_exp_avg_sq"] for s in ss] if scalars.amsgrad else [],
            [s["step"] for s in ss],
            foreach=foreach,
            fused=use_fused,
            amsgrad=scalars.amsgrad,
            beta1=scalars.beta1,
            beta2=scalars.beta2,
            lr=scalars.lr,
            weight_decay=scalars.weight_decay,
            eps=scalars.eps,
            maximize=scalars.maximize,
        )
    for i in other:
        states[i]["step"] += 1
        m = mul_of(i)
        _torch_step_fp32_state(params[i], grads[i], states[i], scalars, keys[i], m if isinstance(m, float) else m.item(),
                               0 if index_bases is None else index_bases[i])
    if ema_moms is not None:
        for p, s, mom in zip(params, states, ema_moms):
            s["ema"].copy_(_ema_update(s["ema"], p, mom))
