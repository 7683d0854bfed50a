"""Host side of the fused Triton step: per-bucket tables, cached across steps, and one launch.

Per-tensor host work (offsets of params and state buffers, program counts) is cached in a plan keyed
by the tensors' addresses and sizes; it is rebuilt only when a tensor is reallocated. What changes
every step, grad addresses (``zero_grad(set_to_none=True)`` frees them) and bias corrections, goes up
in one small int64 tensor.
"""
from __future__ import annotations

import os

import torch

from . import format as fmt
from .functional import StepScalars, state_names

# Elements per program on a GPU: large enough to hide memory latency, small enough for many programs
# per SM. Tests under the interpreter use bigger programs (LOWBIT_ADAMW_BLOCKS_PER_PROGRAM).
GPU_ELEMENTS_PER_PROGRAM = 2048


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reason(p: torch.Tensor) -> str | None:
    """Why the kernel cannot take this parameter, or None."""
    if p.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it is on {p.device}; the Triton kernel runs on CUDA (or on the CPU under TRITON_INTERPRET=1)"
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"its dtype {p.dtype} is not float32, bfloat16 or float16"
    if not p.is_contiguous():
        return "it is not contiguous"
    return None


def default_blocks_per_program(block_size: int) -> int:
    env = os.environ.get("LOWBIT_ADAMW_BLOCKS_PER_PROGRAM")
    if env:
        bpp = int(env)
        if bpp < 1 or bpp & (bpp - 1):
            raise ValueError(f"LOWBIT_ADAMW_BLOCKS_PER_PROGRAM must be a power of two, got {bpp}")
        return bpp
    return max(1, GPU_ELEMENTS_PER_PROGRAM // block_size)


def _offsets(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """(base tensor, element offset of each tensor from it). All share one dtype and device."""
    base = min(tensors, key=lambda t: t.data_ptr())
    size = base.element_size()
    offs = []
    for t in tensors:
        delta = t.data_ptr() - base.data_ptr()
        if delta % size:  # cannot happen for tensors of one dtype; guards against odd storage views
            raise RuntimeError(f"tensor address {t.data_ptr():#x} is not aligned to its dtype")
        offs.append(delta // size)
    return base, offs


class _Plan:
    def __init__(self, params, states, names, block_size, bpp):
        device = params[0].device
        cols = [params] + [[s[n + suffix] for s in states] for n in names for suffix in ("_codes", "_absmax")]
        bases, offsets = [], []
        for tensors in cols:
            base, offs = _offsets(tensors)
            bases.append(base)
            offsets.append(offs)
        while len(bases) < 7:  # no amsgrad: the vmax slots are never read; any tensor of the dtype will do
            bases.append(bases[len(bases) - 2])
            offsets.append([0] * len(params))
        if "ema" in states[0]:
            ema_base, ema_offs = _offsets([s["ema"] for s in states])
        else:  # never read (EMA off): any fp32 tensor will do
            ema_base, ema_offs = bases[2], [0] * len(params)
        numels = [p.numel() for p in params]
        table = torch.tensor([list(row) + [n, e] for row, n, e in zip(zip(*offsets), numels, ema_offs)], dtype=torch.int64)
        self.ema_base = ema_base
        progs = [fmt.num_blocks(fmt.num_blocks(n, block_size), bpp) for n in numels]
        starts = [0]
        for c in progs:
            starts.append(starts[-1] + c)
        self.bases = bases  # p, mc, ma, vc, va, xc, xa
        self.tensor_table = table.to(device)
        self.prog_start = torch.tensor(starts, dtype=torch.int32).to(device)
        self.num_programs = starts[-1]
        self.num_tensors = len(params)


def _plan_key(params, states, names, block_size, bpp):
    ptrs = tuple(p.data_ptr() for p in params)
    sptrs = tuple(s[n + x].data_ptr() for s in states for n in names for x in ("_codes", "_absmax"))
    sptrs += tuple(s["ema"].data_ptr() for s in states if "ema" in s)
    return (ptrs, sptrs, tuple(p.numel() for p in params), params[0].dtype, block_size, bpp, len(names))


def _float_bits(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(torch.int32).to(torch.int64)


def triton_step_8bit(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    sc: StepScalars,
    *,
    block_size: int,
    blocks_per_program: int | None = None,
    skip: torch.Tensor | None = None,
    plan_cache: dict | None = None,
    generator: torch.Generator | None = None,
    grad_muls: list[float] | None = None,
    ema_moms: list[float] | None = None,
) -> None:
    """One fused launch over the bucket. ``skip`` (bool per tensor, on the device) leaves chosen
    tensors untouched without a host sync."""
    from lowbit_adamw.kernels import launch_adamw8bit

    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return
    grad_muls = [1.0] * len(params) if grad_muls is None else list(grad_muls)
    if len(keep) != len(params):
        params, grads, states = [params[i] for i in keep], [grads[i] for i in keep], [states[i] for i in keep]
        skip = None if skip is None else skip[keep]
        grad_muls = [grad_muls[i] for i in keep]
        ema_moms = None if ema_moms is None else [ema_moms[i] for i in keep]
    for p in params:
        reason = unsupported_reason(p)
        if reason:
            raise RuntimeError(f"the Triton step cannot take a parameter of shape {tuple(p.shape)}: {reason}. Use backend='torch'")
    bpp = blocks_per_program or default_blocks_per_program(block_size)
    names = state_names(sc.amsgrad)
    key = _plan_key(params, states, names, block_size, bpp)
    cache = plan_cache if plan_cache is not None else {}
    plan = cache.get(key)
    if plan is None:
        cache.clear()  # one live plan per bucket: old addresses are stale once anything moved
        plan = _Plan(params, states, names, block_size, bpp)
        cache[key] = plan

    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    g_base, g_offs = _offsets(grads)
    corr = [sc.corrections(float(s["step"])) for s in states]
    step_table = torch.stack(
        [
            torch.tensor(g_offs, dtype=torch.int64),
            _float_bits([c[0] for c in corr]),
            _float_bits([c[1] for c in corr]),
            torch.zeros(len(params), dtype=torch.int64),
            _float_bits(grad_muls),
            _float_bits(ema_moms or [0.0] * len(params)),
        ],
        dim=1,
    ).to(params[0].device)
    if skip is not None:
        step_table[:, 3] = skip.to(torch.int64)
    seed = 0
    if sc.stochastic_rounding:
        # From torch's CPU generator, so torch.manual_seed makes runs repeatable.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    b = plan.bases
    scalars = (1.0 - sc.lr * sc.weight_decay, sc.beta1, 1.0 - sc.beta1, sc.beta2, 1.0 - sc.beta2, sc.eps)
    launch_adamw8bit(
        (b[0], g_base, b[1], b[2], b[3], b[4], b[5], b[6], plan.ema_base),
        plan.tensor_table,
        step_table,
        plan.prog_start,
        plan.num_tensors,
        plan.num_programs,
        scalars,
        block_size=block_size,
        blocks_per_program=bpp,
        amsgrad=sc.amsgrad,
        maximize=sc.maximize,
        stochastic=sc.stochastic_rounding,
        seed=seed,
        clip_value=sc.clip_value,
        ema=ema_moms is not None,
    )
