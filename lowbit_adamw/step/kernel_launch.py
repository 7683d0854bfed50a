"""Host side of the fused Triton step: per-bucket tables, cached across steps, and at most two launches.

Per-tensor host work (offsets of params and state buffers, program counts) is cached in a plan keyed
by the tensors' addresses and sizes; it is rebuilt only when a tensor is reallocated. What changes
every step, grad addresses (``zero_grad(set_to_none=True)`` frees them) and bias corrections, goes up
in one small int64 tensor.

A bucket is split in two by alignment: tensors whose buffers all start on 16-element boundaries and
whose size is a multiple of 16 (every ordinary allocation of a weight matrix) go to the vectorized
variant of the kernel; the rest (views at odd offsets, odd sizes) to the general one. Both variants
compute the same bits.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .. import format as fmt
from ..format.step_spec import StepScalars, state_names

# Chosen from `python benchmarks/kernel_report.py --sweep` (static figures, see the README). NVIDIA:
# 2048 elements per program in 4 warps is 16 elements per thread, so every per-element buffer moves in
# 128-bit accesses (8-bit codes too), with 122 registers on sm_90, no spills and 25% occupancy: about
# 49 KB of loads in flight per SM, over twice what the memory latency needs. The runner-up, 1024 in
# 4 warps, has 50% occupancy but 64-bit code accesses. AMD (64-wide wavefronts): 4 wavefronts give 8
# elements per thread (dwordx4 for 16-bit weights, dwordx2 for codes), 56 VGPRs and 8 waves per SIMD;
# 2 wavefronts would give dwordx4 codes but the general variant then spills. Override with
# LOWBIT_ADAMW_BLOCKS_PER_PROGRAM and LOWBIT_ADAMW_NUM_WARPS; `benchmarks/gpu_kernel_check.py --sweep`
# times the alternatives on a GPU.
GPU_ELEMENTS_PER_PROGRAM = 2048
GPU_NUM_WARPS = 4
ROCM_NUM_WARPS = 4
ALIGN_ELEMENTS = 16  # per-element buffers: 16 elements is 16 bytes of codes, 64 of fp32
ALIGN_BYTES = 16  # one scale per block: 16-byte aligned is enough for 128-bit loads of BPP >= 4 scales


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


def _env_power_of_two(name: str) -> int | None:
    env = os.environ.get(name)
    if not env:
        return None
    value = int(env)
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def default_blocks_per_program(block_size: int) -> int:
    return _env_power_of_two("LOWBIT_ADAMW_BLOCKS_PER_PROGRAM") or max(1, GPU_ELEMENTS_PER_PROGRAM // block_size)


def default_num_warps(rocm: bool | None = None) -> int:
    """Warps (wavefronts on ROCm) per program; ``rocm=None``: whichever GPU torch was built for."""
    if rocm is None:
        rocm = torch.version.hip is not None
    return _env_power_of_two("LOWBIT_ADAMW_NUM_WARPS") or (ROCM_NUM_WARPS if rocm else GPU_NUM_WARPS)


def device_guard(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current CUDA device, so a bucket on
    cuda:1 launched while cuda:0 is current would hand the kernel foreign pointers (device_map="auto")."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table on ``device`` without waiting for the GPU: a plain ``.to(cuda)`` from pageable
    memory synchronises the stream, a non-blocking copy from pinned memory does not (torch's pinned
    allocator keeps the buffer until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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


def _elements_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % (ALIGN_ELEMENTS * t.element_size()) == 0


def _state_columns(states, names) -> list[list[torch.Tensor]]:
    return [[s[n + suffix] for s in states] for n in names for suffix in ("_codes", "_absmax")]


def is_aligned(param: torch.Tensor, grad: torch.Tensor, state: dict, names) -> bool:
    """Whether one tensor may go to the vectorized variant (see the kernel's ALIGNED facts)."""
    if param.numel() % ALIGN_ELEMENTS:
        return False
    per_element = [param, grad, *(state[n + "_codes"] for n in names)] + ([state["ema"]] if "ema" in state else [])
    return all(_elements_aligned(t) for t in per_element) and all(
        state[n + "_absmax"].data_ptr() % ALIGN_BYTES == 0 for n in names)


class _Plan:
    def __init__(self, params, states, names, block_size, bpp, slots, aligned):
        device = params[0].device
        cols = [params] + _state_columns(states, names)
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
        rows = [list(row) + [n, e, slot] for row, n, e, slot in zip(zip(*offsets), numels, ema_offs, slots)]
        self.ema_base = ema_base
        progs = [fmt.num_blocks(fmt.num_blocks(n, block_size), bpp) for n in numels]
        starts = [0]
        for c in progs:
            starts.append(starts[-1] + c)
        self.bases = bases  # p, mc, ma, vc, va, xc, xa
        self.aligned = aligned
        with device_guard(device):
            self.tensor_table = upload(torch.tensor(rows, dtype=torch.int64), device)
            self.prog_start = upload(torch.tensor(starts, dtype=torch.int32), device)
        self.num_programs = starts[-1]
        self.num_tensors = len(params)


def _plan_key(params, states, names, block_size, bpp, slots):
    ptrs = tuple(p.data_ptr() for p in params)
    sptrs = tuple(t.data_ptr() for col in _state_columns(states, names) for t in col)
    sptrs += tuple(s["ema"].data_ptr() for s in states if "ema" in s)
    return (ptrs, sptrs, tuple(p.numel() for p in params), params[0].dtype, block_size, bpp, len(names), tuple(slots))


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
    grad_muls: list[float] | None = None,
    grad_mul_tensor: torch.Tensor | None = None,
    ema_moms: list[float] | None = None,
    bad_blocks: torch.Tensor | None = None,
    num_warps: int | None = None,
    force_general: bool = False,
    bits: int = 8,
    sr_keys: list[int] | None = None,
    v_dithers: list[tuple[int, int]] | None = None,
    index_bases: list[int] | None = None,
) -> None:
    """The fused step over a bucket: one launch per alignment class (at most two). ``skip`` (bool per
    tensor, on the device) leaves chosen tensors untouched without a host sync. ``bad_blocks`` (int32
    per tensor, on the device) receives the blocks skipped for a non-finite gradient (sc.skip_nonfinite).
    ``grad_mul_tensor`` (fp32 per tensor, on the device) multiplies each host multiplier on the device,
    so a clipping factor never waits for the host. ``sr_keys``: the stochastic-rounding keys.
    ``force_general`` sends every tensor to the general variant (tests)."""
    from ..kernels import launch_adamw8bit

    if not params:
        return
    device = params[0].device
    for p in params:
        reason = unsupported_reason(p)
        if reason:
            raise RuntimeError(f"the Triton step cannot take a parameter of shape {tuple(p.shape)}: {reason}. Use backend='torch'")
    bpp = blocks_per_program or default_blocks_per_program(block_size)
    warps = num_warps or default_num_warps()
    names = state_names(sc.amsgrad)
    muls = [1.0] * len(params) if grad_muls is None else list(grad_muls)
    moms = ema_moms or [0.0] * len(params)
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    cache = plan_cache if plan_cache is not None else {}
    if bad_blocks is None:
        bad_blocks = torch.zeros(len(params), dtype=torch.int32, device=device)

    classes: dict[bool, list[int]] = {True: [], False: []}
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        if p.numel():
            classes[not force_general and is_aligned(p, g, s, names)].append(i)
    keys = [0] * len(params) if sr_keys is None else [0 if k is None else int(k) for k in sr_keys]
    live_keys = set()
    with device_guard(device):
        for aligned, idx in classes.items():
            if not idx:
                continue
            ps, gs, ss = [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx]
            key = _plan_key(ps, ss, names, block_size, bpp, idx) + (bits,)
            plan = cache.get(key)
            if plan is None:
                plan = cache[key] = _Plan(ps, ss, names, block_size, bpp, idx, aligned)
            live_keys.add(key)
            g_base, g_offs = _offsets(gs)
            corr = [sc.corrections(float(s["step"])) for s in ss]
            step_table = torch.stack(
                [
                    torch.tensor(g_offs, dtype=torch.int64),
                    _float_bits([c[0] for c in corr]),
                    _float_bits([c[1] for c in corr]),
                    torch.zeros(len(idx), dtype=torch.int64),
                    _float_bits([muls[i] for i in idx]),
                    _float_bits([moms[i] for i in idx]),
                    _float_bits([1.0 - moms[i] for i in idx]),
                    torch.tensor([keys[i] for i in idx], dtype=torch.int64),
                    torch.tensor([0 if v_dithers is None else v_dithers[i][0] for i in idx], dtype=torch.int64),
                    torch.tensor([0 if v_dithers is None else v_dithers[i][1] for i in idx], dtype=torch.int64),
                    torch.full((len(idx),), int(v_dithers is not None), dtype=torch.int64),
                    torch.tensor([0 if index_bases is None else index_bases[i] for i in idx], dtype=torch.int64),
                ],
                dim=1,
            )
            step_table = upload(step_table, device)
            if skip is not None:
                step_table[:, 3] = skip[idx].to(torch.int64)
            if grad_mul_tensor is not None:  # step_spec: fp32(host) * fp32(device), one multiply, on the device
                host_mul = step_table[:, 4].to(torch.int32).view(torch.float32)
                dev_mul = grad_mul_tensor.to(device=device, dtype=torch.float32)[idx]
                step_table[:, 4] = (host_mul * dev_mul).view(torch.int32).to(torch.int64)
            b = plan.bases
            launch_adamw8bit(
                (b[0], g_base, b[1], b[2], b[3], b[4], b[5], b[6], plan.ema_base),
                plan.tensor_table, step_table, plan.prog_start, plan.num_tensors, plan.num_programs, sc.constants(),
                bad_blocks,
                block_size=block_size, blocks_per_program=bpp, amsgrad=sc.amsgrad, maximize=sc.maximize,
                stochastic=sc.stochastic_rounding, clip_value=sc.clip_value, ema=ema_moms is not None,
                skip_nonfinite=sc.skip_nonfinite, aligned=aligned, num_warps=warps, bits=bits,
                m4_table=(fmt.M4_LEVELS, fmt.M4_BOUNDS),
            )
    for key in [k for k in cache if k not in live_keys]:  # old addresses are stale once anything moved
        del cache[key]
