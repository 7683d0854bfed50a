"""The step of one bucket as a PyTorch custom op (``torch.ops.lowbit_adamw.step_``), mutating its inputs.

``torch.compile`` of ``optimizer.step()`` then sees one opaque op per bucket instead of tracing into
the C++ library (ctypes), the Triton launcher's host tables or the eager loops, so
``torch.compile(opt.step, fullgraph=True)`` traces with no graph break, and the op gives the bits the
eager call gives (it is the same code). Everything per step that is host work happens inside:
incrementing the step counters, bias corrections, stochastic-rounding keys, flat views of the
tensors in the order their blocks run (``lowbit_adamw.format.layout``), the backend call, and copies back
for parameters with gaps.

The optimizer calls it through ``call_step_``, which in plain eager code runs the op's body without
the dispatcher (same code, same bits, the same version-counter bumps and profiler name): the
dispatcher's Python layers cost about as much per tensor as a small tensor's whole step.

The op defers signal handlers (SIGINT's ``KeyboardInterrupt``, and any Python handler of any signal; see
``interrupts_deferred``) until its writes are done: an interrupted training loop leaves every tensor of a
bucket either wholly before or wholly after the step, never with weights written and codes not, on
every backend (the C++ step is one call Python cannot interrupt; the eager step is many).

Arguments (one bucket: one device, one parameter dtype, one kind of state):
    params, grads   the parameters and their gradients, as the optimizer holds them (rank-local).
    state           per parameter, in order: 8-bit kind: m codes, m scales, v codes, v scales,
                    (amsgrad: vmax codes, vmax scales), (EMA: ema); full-precision kind: exp_avg,
                    exp_avg_sq, (amsgrad: max_exp_avg_sq), (EMA: ema).
    steps           per parameter, its ``state["step"]`` (incremented here).
    tensor_ids      per parameter, its position in the optimizer (the random numbers' stream).
    index_bases     per parameter, the flat index of its first local element in the whole parameter
                    (a shard's offset, 0 unsharded), so that the random numbers do not depend on sharding.
    grad_mul_tensor optional fp32 per parameter (device), times ``grad_muls``: step_spec's multiplier.
    hyper           lr (or lr_tensor, a 1-element tensor read here), beta1, beta2, eps, weight_decay,
                    clip_value (inf: off).
    flags           amsgrad, maximize, bias_correction, stochastic_rounding, skip_nonfinite.
Returns int32 per parameter: blocks (8-bit kind) or whole tensors (full-precision kind) skipped for a
non-finite gradient.
"""
from __future__ import annotations

import _signal
import contextlib
import itertools
import math
import signal
import threading
from typing import Optional

import torch
from torch.utils import _python_dispatch

from ..format import layout, rng, sharding
from ..format.step_spec import StepScalars, state_names
from .functional import adamw8bit_step, fp32_state_step

KIND_QUANTIZED = "quantized"
KIND_FULL = "full"
_PLAN_CACHES: dict[int, dict] = {}  # Triton launch tables, per (optimizer, group, device, dtype) id
_next_cache_id = itertools.count(1)


def new_cache_id() -> int:
    return next(_next_cache_id)


def plan_cache(cache_id: int) -> dict:
    return _PLAN_CACHES.setdefault(cache_id, {})


def drop_plan_caches(ids) -> None:
    for i in ids:
        _PLAN_CACHES.pop(i, None)


_CATCHABLE: tuple[int, ...] | None = None


def _catchable_signals() -> tuple[int, ...]:
    global _CATCHABLE
    if _CATCHABLE is None:
        uncatchable = {getattr(signal, n) for n in ("SIGKILL", "SIGSTOP") if hasattr(signal, n)}
        _CATCHABLE = tuple(int(s) for s in signal.valid_signals() if s not in uncatchable)
    return _CATCHABLE


@contextlib.contextmanager
def interrupts_deferred():
    """Signal handlers wait until the block is done: SIGINT whatever its handler, and every other signal
    with a Python handler (a handler may raise anything, KeyboardInterrupt included, and Python runs it
    between any two operations). Then each signal received is raised again, once, for the handler that
    was in place: a Python handler runs, the C default acts, an ignored signal stays ignored. Only the
    main thread runs Python signal handlers, so elsewhere there is nothing to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum, frame):
        received.append(signum)

    hooked: dict[int, object] = {}
    try:
        for sig in _catchable_signals():
            # _signal.getsignal, not signal.getsignal: the latter wraps each answer in an enum (24 us a scan, 1.3 here)
            handler = _signal.getsignal(sig)
            if callable(handler) or (sig == signal.SIGINT and handler == signal.SIG_DFL):
                _signal.signal(sig, record)
                hooked[sig] = handler
    except (ValueError, TypeError, OSError):  # pragma: no cover - a platform without these signals
        for sig, handler in hooked.items():
            _signal.signal(sig, handler)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in hooked.items():
            _signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


def state_per_param(kind: str, amsgrad: bool, ema: bool) -> tuple[str, ...]:
    """The state keys, in the order ``state`` lists them for each parameter."""
    if kind == KIND_QUANTIZED:
        names = tuple(n + sfx for n in state_names(amsgrad) for sfx in ("_codes", "_absmax"))
    else:
        names = state_names(amsgrad)
    return names + (("ema",) if ema else ())


def _flat_views(p, g, state: dict, element_state: tuple[str, ...]):
    """(flat p, flat g, flat state dict, write-back or None) in the order the blocks run."""
    p, g = layout.real_view(p), layout.real_view(g)
    if p.is_contiguous() and g.is_contiguous() and p.shape == g.shape:  # the common case, checked cheaply
        flat = {}
        for k, v in state.items():
            if k not in element_state:  # codes, scales (flat already) and the step count (0-d, read as a number)
                flat[k] = v if v.dim() <= 1 else v.view(-1)
            elif v.is_contiguous() and v.shape == p.shape:
                flat[k] = v.view(-1)
            else:
                break
        else:
            return p if p.dim() == 1 else p.view(-1), g if g.dim() == 1 else g.view(-1), flat, None
    if layout.is_dense(p):
        fp = layout.memory_order_view(p)
        fg = layout.memory_order_view(g) if layout.is_dense(g) and layout.same_layout(p, g) else \
            layout.memory_order_view(torch.empty_like(p).copy_(g))
        flat = {}
        for k, v in state.items():
            if k in element_state:
                v = layout.real_view(v)
                if not layout.same_layout(p, v):
                    raise RuntimeError(f"state {k!r} is not laid out like its parameter (strides {v.stride()} vs {p.stride()})")
                flat[k] = layout.memory_order_view(v)
            else:
                flat[k] = v.view(-1)
        return fp, fg, flat, None
    copy = p.contiguous()  # a parameter with gaps: step a contiguous copy, write it back
    flat = {k: (layout.real_view(v).reshape(-1) if k in element_state else v.view(-1)) for k, v in state.items()}
    return copy.view(-1), g.reshape(-1), flat, (p, copy)


def _step_body(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: list[torch.Tensor],
    steps: list[torch.Tensor],
    grad_mul_tensor: Optional[torch.Tensor],
    grad_muls: list[float],
    ema_moms: list[float],  # the EMA decay per parameter (0 on its first update), or empty without EMA
    tensor_ids: list[int],
    index_bases: list[int],
    kind: str,
    backend: str,
    lr: float,
    lr_tensor: Optional[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_value: float,
    amsgrad: bool,
    maximize: bool,
    bias_correction: bool,
    stochastic_rounding: bool,
    skip_nonfinite: bool,
    block_size: int,
    bits: int,
    seed: int,
    foreach: Optional[bool],
    fused: Optional[bool],
    cache_id: int,
) -> torch.Tensor:
    n = len(params)
    device = params[0].device
    if lr_tensor is not None:
        lr = check_lr(lr_tensor, "lr")
    counts = torch.zeros(n, dtype=torch.int32, device=device)
    ema = len(ema_moms) > 0
    names = state_per_param(kind, amsgrad, ema)
    per = len(names)
    if len(state) != n * per or len(grads) != n or len(steps) != n:
        raise ValueError(f"lowbit_adamw::step_: {n} params need {n} grads, {n} steps and {n * per} state tensors "
                         f"({', '.join(names)} each), got {len(grads)}, {len(steps)}, {len(state)}")
    sc = StepScalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                     bias_correction=bias_correction, stochastic_rounding=stochastic_rounding, clip_value=clip_value,
                     skip_nonfinite=skip_nonfinite)
    element_state = ("ema",) if kind == KIND_QUANTIZED else (*state_names(amsgrad), "ema")
    if ema:  # Keras: a tensor's first update copies the weights into the average (momentum 0)
        ema_moms = [0.0 if float(s) == 0 else float(m) for s, m in zip(steps, ema_moms)]
    fps, fgs, fstates, backs = [], [], [], []
    for i in range(n):
        st = dict(zip(names, state[i * per:(i + 1) * per]))
        st["step"] = steps[i]
        fp, fg, fs, back = _flat_views(params[i], grads[i], st, element_state)
        fps.append(fp)
        fgs.append(fg)
        fstates.append(fs)
        if back is not None:
            backs.append(back)
    with interrupts_deferred():
        if kind == KIND_QUANTIZED:
            try:  # one call each, not one in-place add and one read per tensor
                stacked = torch.stack(steps)
            except RuntimeError:  # mixed devices or shapes: nothing was written yet, so one by one
                stacked = None
            if stacked is not None:
                step_counts = [int(s) for s in (stacked + 1).tolist()]
                torch._foreach_add_(steps, 1)
            else:
                for s in steps:
                    s += 1
                step_counts = [int(s.item()) for s in steps]
            keys = None
            if stochastic_rounding:
                keys = [rng.tensor_key(seed, rng.STREAM_WEIGHTS, t, s) for t, s in zip(tensor_ids, step_counts)]
            dithers = [(rng.dither_key(seed, t), rng.dither_offset(s)) for t, s in zip(tensor_ids, step_counts)]
            adamw8bit_step(fps, fgs, fstates, sc, block_size=block_size, bits=bits, backend=backend,
                           plan_cache=plan_cache(cache_id), grad_muls=list(grad_muls), grad_mul_tensor=grad_mul_tensor,
                           ema_moms=list(ema_moms) if ema else None, bad_blocks=counts if skip_nonfinite else None, sr_keys=keys,
                           v_dithers=dithers, index_bases=list(index_bases))
        else:
            keys = None
            if stochastic_rounding:  # after torch's increment, the step the update is for
                keys = [rng.tensor_key(seed, rng.STREAM_WEIGHTS, t, int(s.item()) + 1) for t, s in zip(tensor_ids, steps)]
            fp32_state_step(fps, fgs, fstates, sc, foreach=foreach, fused=fused, grad_muls=list(grad_muls),
                            grad_mul_tensor=grad_mul_tensor, ema_moms=list(ema_moms) if ema else None,
                            bad_tensors=counts if skip_nonfinite else None, sr_keys=keys, index_bases=list(index_bases))
        for p, copy in backs:
            layout.real_view(p).copy_(copy)
    return counts


step_ = torch.library.custom_op("lowbit_adamw::step_", mutates_args=("params", "state", "steps"))(_step_body)


def call_step_(params: list[torch.Tensor], grads: list[torch.Tensor], state: list[torch.Tensor], steps: list[torch.Tensor],
               *rest) -> torch.Tensor:
    """``step_(params, grads, state, steps, *rest)`` as the optimizer calls it. In plain eager code (not
    compiling, no torch function or dispatch mode active, plain tensors) the op's body runs directly and
    the versions of the tensors it mutates are bumped, as the op's ADInplaceOrView kernel does: the
    dispatcher's Python layers (autograd, version bump, backend wrapper) convert the whole argument list
    at each layer, about 7 us per tensor of the bucket, as long as a small tensor's whole step. The same
    code runs either way, so the bits are the same."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or _python_dispatch._get_current_dispatch_mode() is not None
            or not all(type(t) in sharding.PLAIN_TENSOR_TYPES for t in itertools.chain(params, grads))):
        return step_(params, grads, state, steps, *rest)
    for mutated in (params, state, steps):
        torch.autograd.graph.increment_version(mutated)
    with torch.no_grad():  # as the op's autograd layer runs it (an offload worker thread has grad mode on)
        if torch._C._autograd._profiler_enabled():  # the op's name in a profile, as the dispatcher records it
            with torch.profiler.record_function("lowbit_adamw::step_"):
                return _step_body(params, grads, state, steps, *rest)
        return _step_body(params, grads, state, steps, *rest)


@step_.register_fake
def _(params, grads, state, steps, grad_mul_tensor, grad_muls, ema_moms, tensor_ids, index_bases, kind, backend, lr, lr_tensor, beta1, beta2, eps,
      weight_decay, clip_value, amsgrad, maximize, bias_correction, stochastic_rounding, skip_nonfinite, block_size, bits, seed,
      foreach, fused, cache_id):
    return params[0].new_empty(len(params), dtype=torch.int32)


@torch.library.custom_op("lowbit_adamw::clip_multipliers", mutates_args=())
def clip_multipliers(grads: list[torch.Tensor], params: list[torch.Tensor], quantized: list[bool], block_sizes: list[int],
                     skip_nonfinite: bool, host_muls: list[float], max_grad_norm: Optional[float],
                     clip_norms: list[float]) -> torch.Tensor:
    """``lowbit_adamw.step.clipping``'s device multipliers (fp32, one per gradient, on the first gradient's
    device), as an op so that a compiled step computes them with the same kernels as an eager one (an
    inductor reduction would sum in another order). ``clip_norms``: per tensor, inf for none. The
    gradients are flat in block order."""
    from . import clipping

    dev = grads[0].device
    norms = torch.stack([clipping.applied_norms([g], [p], [q], [bs], skip_nonfinite)[0].to(dev)
                         for g, p, q, bs in zip(grads, params, quantized, block_sizes)])
    host = torch.tensor(host_muls, dtype=torch.float32).to(dev)
    return clipping.multipliers(norms, host, max_grad_norm, [None if math.isinf(c) else c for c in clip_norms])


@clip_multipliers.register_fake
def _(grads, params, quantized, block_sizes, skip_nonfinite, host_muls, max_grad_norm, clip_norms):
    return grads[0].new_empty(len(grads), dtype=torch.float32)


def check_lr(lr: torch.Tensor, where: str) -> float:
    """A tensor learning rate as a float: one element, finite, >= 0 (else ValueError naming ``where``)."""
    if lr.numel() != 1:
        raise ValueError(f"{where}: Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    value = float(lr)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: lr is {value}; a learning rate must be finite and >= 0")
    return value


def clip_value_arg(clip_value) -> float:
    return math.inf if clip_value is None else float(clip_value)
