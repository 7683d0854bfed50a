"""``AdamW8bit``: a drop-in ``torch.optim.AdamW`` whose moments are 8-bit (or 4-bit) blockwise codes."""
from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from typing import Iterable

import torch
from torch import nn

from . import format as fmt
from . import sharding
from .functional import adamw8bit_step, fp32_state_step
from .step_spec import NONFINITE_MODES as _NONFINITE
from .step_spec import StepScalars, state_names

_BACKENDS = ("auto", "torch", "compiled", "cpp", "triton")
_VERSION_KEY = "lowbit_format_version"


def _check_scalar(name, value, low, high=None, high_open=False):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if value < low or (high is not None and (value >= high if high_open else value > high)):
        bound = f"[{low}, {high})" if high_open else (f"[{low}, {high}]" if high is not None else f">= {low}")
        raise ValueError(f"Invalid {name}: {value} (must be in {bound})")


class AdamW8bit(torch.optim.Optimizer):
    r"""AdamW with 8-bit blockwise state (``torch.optim.AdamW`` semantics, decoupled weight decay).

    Args (shared with ``torch.optim.AdamW``, same defaults):
        params, lr=1e-3 (float or 1-element tensor), betas=(0.9, 0.999), eps=1e-8,
        weight_decay=1e-2, amsgrad=False, maximize=False, foreach=None, fused=None (the last two are
        passed to torch's AdamW for the parameters kept in fp32 state).

    Keyword-only:
        bits: width of the moment codes, 8 (default, 2.03 bytes of state per parameter) or 4 (1.06 bytes;
            codes packed two per byte). Per param group too.
        block_size: elements per quantization block (power of two, 64..4096; default 256 at 8 bits and
            128 at 4 bits).
        min_8bit_size: parameters with fewer elements keep fp32 state (default 4096).
        bias_correction: apply Adam's bias correction (MLX calls it ``bias_correction``; default True).
        stochastic_rounding: write 16-bit parameters with stochastic rounding (default False).
        backend: ``"auto"`` (Triton for CUDA tensors when available; on the CPU the C++ step, built at
            first use when a C++ compiler is found, else the torch.compile'd step, else eager PyTorch),
            ``"torch"`` (eager), ``"compiled"``, ``"cpp"`` or ``"triton"``. Also settable with the
            environment variable ``LOWBIT_ADAMW_BACKEND``.
        nonfinite: what a gradient with NaN/Inf does. ``"skip"`` (default): each quantization block
            whose gradient holds NaN/Inf keeps its parameter values and state exactly as they were
            (a tensor in fp32 state: the whole tensor), the rest updates, inside the step's own pass and
            without a host sync; a warning names the tensors (on the CPU at once, on a GPU at the next
            ``step()`` or ``state_dict()``), and ``opt.nonfinite_skipped`` totals them.
            ``"raise"``: a checking pass raises before anything is updated. ``"ignore"``: no check
            (NaN then propagates into that tensor's parameter and state, as in torch).
        fp32_state: parameters, modules or module types whose parameters keep fp32 state
            (e.g. ``fp32_state=[nn.Embedding]`` with ``model=model``, or ``fp32_state=[model.embed]``).
        model: the model to search when ``fp32_state`` names module types.
        step_in_backward: update each parameter during ``backward()``, as soon as its gradient is
            complete, and free the gradient right away, so only a few layers' gradients are ever alive
            (torchtune's ``optimizer_in_bwd``, natively: parameters whose gradients are ready join a
            pending bucket, stepped as one fused call when it reaches ``step_in_backward_bucket_mb`` of
            gradients and at the end of backward). ``step(closure)`` then only runs the closure and
            ``zero_grad()`` does nothing. Single device only; ``max_grad_norm`` and
            ``accumulation_steps > 1`` are refused (they need all gradients at once), and so is
            GradScaler, at its first step. Per-tensor ``clip_norm``/``clip_value``, schedulers, EMA,
            the non-finite rule, weight tying, activation checkpointing and checkpoints all work.
        step_in_backward_bucket_mb: gradient megabytes that trigger a bucket's step (default 64).

    Param groups may set any of the hyper-parameters above plus ``fp32_state=True`` for the whole group.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        *,
        block_size: int | None = None,
        min_8bit_size: int = 4096,
        bits: int = 8,
        bias_correction: bool = True,
        stochastic_rounding: bool = False,
        backend: str | None = None,
        nonfinite: str = "skip",
        fp32_state: Iterable | None = None,
        model: nn.Module | None = None,
        clip_value: float | None = None,
        clip_norm: float | None = None,
        max_grad_norm: float | None = None,
        loss_scale: float | None = None,
        accumulation_steps: int = 1,
        ema_decay: float | None = None,
        ema_overwrite_frequency: int | None = None,
        step_in_backward: bool = False,
        step_in_backward_bucket_mb: float = 64.0,
    ):
        backend = backend or os.environ.get("LOWBIT_ADAMW_BACKEND", "auto")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if max_grad_norm is not None:
            _check_scalar("max_grad_norm", max_grad_norm, 0.0)
        if ema_decay is not None:
            _check_scalar("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
        if ema_overwrite_frequency is not None and (ema_decay is None or not isinstance(ema_overwrite_frequency, int)
                                                    or ema_overwrite_frequency < 1):
            raise ValueError("ema_overwrite_frequency needs ema_decay and must be an int >= 1")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            block_size=block_size,
            bits=bits,
            min_8bit_size=min_8bit_size,
            bias_correction=bias_correction,
            stochastic_rounding=stochastic_rounding,
            fp32_state=False,
            clip_value=clip_value,
            clip_norm=clip_norm,
            loss_scale=loss_scale,
        )
        self._validate_group(defaults)
        self.backend = backend
        self.nonfinite = nonfinite
        self.max_grad_norm = max_grad_norm
        self.accumulation_steps = accumulation_steps
        self.ema_decay = ema_decay
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self._calls = 0  # step() calls, for accumulation
        self._updates = 0  # applied updates, the step a callable lr receives
        self._accum_grad_ids: dict[int, int] = {}
        self._fp32_forced: set[int] = set()
        self._plans: dict[tuple, dict] = defaultdict(dict)  # kernel tables per bucket, see kernel_launch
        self._nonfinite_pending: list[tuple] = []  # (counts, labels, block size or None, event) not yet read, see _report_nonfinite
        self._nonfinite_totals: dict[str, int] = {}
        if step_in_backward:
            _check_scalar("step_in_backward_bucket_mb", step_in_backward_bucket_mb, 0.0)
            if max_grad_norm is not None:
                raise ValueError("step_in_backward=True cannot apply max_grad_norm: a global norm needs every gradient "
                                 "before the first update. Use clip_norm (per tensor) or clip_value, or step_in_backward=False")
            if accumulation_steps > 1:
                raise ValueError("step_in_backward=True updates in every backward, so it cannot accumulate gradients "
                                 "(accumulation_steps > 1): use a larger batch, or step_in_backward=False")
        self.step_in_backward = step_in_backward
        self._bucket_cap = int(step_in_backward_bucket_mb * 2**20)
        self._ready: list[torch.Tensor] = []  # parameters whose gradient is complete and not yet stepped
        self._ready_bytes = 0
        self._end_of_backward_queued = False
        self._grad_hooks: list = []
        super().__init__(params, defaults)
        if fp32_state is not None:
            self.force_fp32_state(*fp32_state, model=model)

    # ---- groups and validation ----------------------------------------------------------------

    @staticmethod
    def _validate_group(group: dict) -> None:
        if not callable(group["lr"]):
            _check_scalar("lr", group["lr"], 0.0)
        for key in ("clip_value", "clip_norm", "loss_scale"):
            if group.get(key) is not None:
                _check_scalar(key, group[key], 0.0)
        if group.get("loss_scale") is not None and group["loss_scale"] == 0:
            raise ValueError("loss_scale must be > 0 (gradients are divided by it)")
        if group.get("clip_value") is not None and group.get("clip_norm") is not None:
            raise ValueError("clip_value and clip_norm are exclusive (as Keras' clipvalue / clipnorm): set one")
        _check_scalar("eps", group["eps"], 0.0)
        _check_scalar("weight_decay", group["weight_decay"], 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_scalar("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        _check_scalar("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        fmt.check_bits(group["bits"])
        if group["block_size"] is not None:  # None (the constructor default): resolved per group by its width
            fmt.check_block_size(group["block_size"])

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict) and param_group.get("block_size", self.defaults["block_size"]) is None:
            param_group = dict(param_group, block_size=fmt.default_block_size(param_group.get("bits", self.defaults["bits"])))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        for i, p in enumerate(group["params"]):
            label = self._label(group, i, p)
            if self.step_in_backward:
                self._check_single_device(p, label)
                if p.requires_grad:
                    self._grad_hooks.append(p.register_post_accumulate_grad_hook(self._gradient_ready))
            if p.is_complex():
                raise TypeError(f"{label}: complex parameters are not supported; optimize torch.view_as_real(param) instead")
            if not p.is_floating_point() or p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"{label}: dtype {p.dtype} is not supported (use float32, bfloat16 or float16)")

    @staticmethod
    def _label(group: dict, index: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        if names:
            return f"parameter '{names[index]}'"
        return f"parameter {index} of its param group (shape {tuple(p.shape)})"

    def force_fp32_state(self, *items, model: nn.Module | None = None) -> None:
        """Keep fp32 state for these parameters, modules, or module types (searched in ``model``).
        Parameters that already have 8-bit state are converted (dequantized) in place."""
        params: list[torch.Tensor] = []
        for item in items:
            if isinstance(item, type) and issubclass(item, nn.Module):
                if model is None:
                    raise ValueError(f"fp32_state names the module type {item.__name__}: pass model= to search it")
                params += [p for mod in model.modules() if isinstance(mod, item) for p in mod.parameters(recurse=False)]
            elif isinstance(item, nn.Module):
                params += list(item.parameters())
            elif isinstance(item, torch.Tensor):
                params.append(item)
            else:
                raise TypeError(f"fp32_state items must be parameters, modules or module types, got {type(item).__name__}")
        for p in params:
            self._fp32_forced.add(id(p))
            state = self.state.get(p)
            if state and "exp_avg_codes" in state:
                group = self._group_of(p)
                for name in fmt.QUANTIZED_MOMENTS:
                    if name + "_codes" in state:
                        codes, absmax = state.pop(name + "_codes"), state.pop(name + "_absmax")
                        full = fmt.dequantize_blockwise(sharding.local(codes).reshape(-1), sharding.local(absmax).reshape(-1),
                                                        fmt.is_signed(name), group["block_size"], group["bits"],
                                                        numel=sharding.local(p).numel())
                        state[name] = sharding.like(p, full.view_as(sharding.local(p)), p.shape)

    def _group_of(self, p):
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("parameter is not in this optimizer")

    def _wants_8bit(self, p: torch.Tensor, group: dict) -> bool:
        return (not group["fp32_state"] and id(p) not in self._fp32_forced and p.numel() >= group["min_8bit_size"]
                and sharding.can_quantize(p, group["block_size"]))

    def _init_state(self, p: torch.Tensor, group: dict, label: str) -> dict:
        if not p.is_contiguous():
            raise ValueError(f"{label} is not contiguous; call .data = param.data.contiguous() before creating the optimizer")
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        names = state_names(group["amsgrad"])
        if self._wants_8bit(p, group):
            block, bits = group["block_size"], group["bits"]
            for name in names:
                # The code of zero; at 4 bits both nibbles of a byte hold it.
                zero = fmt.m_zero_code(bits) * (1 if bits == 8 else 17) if fmt.is_signed(name) else fmt.V_ZERO_CODE
                if sharding.is_dtensor(p):  # rows travel with their codes and scales, so DCP can reshard it (see sharding.py)
                    loc = sharding.local(p)
                    rows = loc.shape[0] if loc.dim() else 0
                    codes_local = loc.shape if bits == 8 else (rows, sharding.row_length(p) // 2)
                    codes = torch.full(codes_local, zero, dtype=torch.uint8, device=loc.device)
                    absmax = torch.zeros(rows, sharding.row_length(p) // block, device=loc.device)
                    state[name + "_codes"] = sharding.like(p, codes, sharding.codes_shape(p, bits))
                    state[name + "_absmax"] = sharding.like(p, absmax, sharding.absmax_shape(p, block))
                else:
                    state[name + "_codes"] = torch.full((fmt.codes_numel(p.numel(), bits),), zero, dtype=torch.uint8, device=p.device)
                    state[name + "_absmax"] = torch.zeros(fmt.num_blocks(p.numel(), block), dtype=torch.float32, device=p.device)
        else:
            dtype = torch.float32
            for name in names:
                state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def _check_grad(self, p, g, label):
        if g.is_sparse:
            raise RuntimeError(f"{label} has a sparse gradient; AdamW8bit does not support sparse gradients (use nn.Embedding(sparse=False) or torch.optim.SparseAdam)")
        if g.device != p.device:
            raise RuntimeError(f"{label} is on {p.device} but its gradient is on {g.device}; move both to one device")
        if g.dtype != p.dtype:
            raise RuntimeError(f"{label} has dtype {p.dtype} but its gradient has dtype {g.dtype}; gradients must match the parameter dtype")
        if g.shape != p.shape:
            raise RuntimeError(f"{label} has shape {tuple(p.shape)} but its gradient has shape {tuple(g.shape)}")

    def _resolve_backend(self, device: torch.device) -> str:
        if self.backend != "auto":
            return self.backend
        if device.type == "cpu":
            from .cpu_kernel import available
            from .functional import compiled_available

            return "cpp" if available() else "compiled" if compiled_available() else "torch"
        if device.type == "cuda":
            from .kernel_launch import triton_available

            if triton_available():
                return "triton"
            if not getattr(self, "_warned_no_triton", False):
                self._warned_no_triton = True
                warnings.warn("AdamW8bit: Triton is not importable, CUDA parameters use the slower PyTorch step "
                              "(pip install triton)", RuntimeWarning, stacklevel=4)
        return "torch"

    # ---- the step ------------------------------------------------------------------------------

    def _finite_mask(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[bool]:
        """nonfinite="raise": one checking pass and one host sync (the default rule needs neither)."""
        grads = [sharding.local(g) for g in grads]
        nonempty = [g for g in grads if g.numel()]
        # min and max of each gradient: NaN propagates through both, +Inf shows in the max and -Inf in the min.
        if nonempty:
            lo, hi = zip(*(torch.aminmax(g) for g in nonempty))
            finite = iter((torch.isfinite(torch.stack(lo)) & torch.isfinite(torch.stack(hi))).tolist())
        else:
            finite = iter([])
        flags = torch.tensor([next(finite) if g.numel() else True for g in grads], dtype=torch.bool)
        # Sharded tensors: raise on every rank or on none, or the ranks part ways in the next collective.
        return sharding.all_ranks_agree_finite(flags, params).tolist()

    def _report_nonfinite(self, wait: bool) -> None:
        """Warn about the blocks the last steps left untouched. Counts are read only once their copy to
        the host has finished (``wait=False``: never blocks) or after waiting for it (``wait=True``)."""
        still = []
        for counts, labels, block, event in self._nonfinite_pending:
            if event is not None and not wait and not event.query():
                still.append((counts, labels, block, event))
                continue
            if event is not None:
                event.synchronize()
            bad = [(label, n) for label, n in zip(labels, counts.tolist()) if n]
            for label, n in bad:
                self._nonfinite_totals[label] = self._nonfinite_totals.get(label, 0) + n
            if bad:
                what = ", ".join(label if block is None else f"{label} ({n} block{'s' if n > 1 else ''} of {block})" for label, n in bad)
                warnings.warn(f"AdamW8bit: left unchanged where the gradient has NaN or Inf: {what}", RuntimeWarning, stacklevel=4)
        self._nonfinite_pending = still

    @property
    def nonfinite_skipped(self) -> dict[str, int]:
        """Per parameter label, how many blocks (or whole fp32-state tensors) were left unchanged for a
        non-finite gradient so far. Reading it waits for the counts of the last step."""
        self._report_nonfinite(wait=True)
        return dict(self._nonfinite_totals)

    # GradScaler's fused path: it sets ``grad_scale`` and ``found_inf`` on the optimizer instead of
    # unscaling the gradients itself; the step unscales inside its single pass and skips on inf.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None):
        if self._nonfinite_pending:
            self._report_nonfinite(wait=False)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if self.step_in_backward and grad_scale is not None:
            raise RuntimeError("step_in_backward=True cannot be used with GradScaler: the update happens during "
                               "backward, before the scaler knows whether the gradients are finite. Use bf16 autocast "
                               "(no scaler), or step_in_backward=False")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_in_backward:
            return loss  # the update already happened inside backward
        if self.accumulation_steps > 1:
            if grad_scale is not None:
                raise RuntimeError("accumulation_steps > 1 with GradScaler: the scale can change between micro-steps. "
                                   "Accumulate in the training loop instead (call scaler.step every N micro-batches)")
            self._calls += 1
            self._check_accumulation()
            if self._calls % self.accumulation_steps:
                return loss  # gradients keep accumulating in .grad; zero_grad() waits for the update
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # an inf/NaN somewhere in the scaled gradients: skip the whole step, as torch's fused AdamW
        base_mul = 1.0 / self.accumulation_steps
        if grad_scale is not None:
            base_mul /= float(grad_scale)
        global_mul = self._global_norm_multiplier(base_mul) if self.max_grad_norm is not None else 1.0
        for group in self.param_groups:
            self._step_group(group, base_mul * global_mul)
        self._finish_update()
        return loss

    def _finish_update(self) -> None:
        self._updates += 1
        self._accum_grad_ids.clear()
        if self.ema_overwrite_frequency and self._updates % self.ema_overwrite_frequency == 0:
            self.copy_ema_to_params()

    @torch.no_grad()
    def copy_ema_to_params(self) -> None:
        """Write the EMA weights into the parameters (Keras: ``finalize_variable_values`` at the end
        of training, or every ``ema_overwrite_frequency`` updates)."""
        if self.ema_decay is None:
            raise RuntimeError("copy_ema_to_params: this optimizer was created without ema_decay")
        for group in self.param_groups:
            for p in group["params"]:
                ema = self.state.get(p, {}).get("ema")
                if ema is not None:
                    p.copy_(ema)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, except between the micro-steps of ``accumulation_steps``: gradients must keep
        summing in ``.grad`` until the update, so it does nothing there. With ``step_in_backward`` the
        gradients are freed as they are used: nothing to do."""
        if self.step_in_backward or (self.accumulation_steps > 1 and self._calls % self.accumulation_steps):
            return
        super().zero_grad(set_to_none=set_to_none)

    # ---- step in backward ------------------------------------------------------------------------

    @staticmethod
    def _check_single_device(p: torch.Tensor, label: str) -> None:
        import torch.distributed as dist

        if sharding.is_dtensor(p) or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise ValueError(f"step_in_backward=True runs on a single device only ({label} is sharded or this process "
                             "is one of several): under FSDP2 or DDP the gradients are reduced after backward. "
                             "Use step_in_backward=False")

    def _gradient_ready(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: ``p.grad`` is complete (all uses summed, weight tying included)."""
        if not self._end_of_backward_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._end_of_backward_queued = True
        self._ready.append(p)
        self._ready_bytes += p.grad.numel() * p.grad.element_size()
        if self._ready_bytes >= self._bucket_cap:
            self._step_ready()

    @torch.no_grad()
    def _step_ready(self) -> None:
        ready, self._ready, self._ready_bytes = self._ready, [], 0
        ids = {id(p) for p in ready}
        for group in self.param_groups:
            if any(id(p) in ids for p in group["params"]):
                self._step_group(group, only=ids)
        for p in ready:
            p.grad = None  # freed now, not at zero_grad(): the memory this mode is for

    def _end_of_backward(self) -> None:
        self._end_of_backward_queued = False
        self._step_ready()
        self._finish_update()

    def _check_accumulation(self) -> None:
        # Accumulation lives in .grad; a new .grad object mid-accumulation means something else
        # (model.zero_grad(), a framework) reset it and the earlier micro-batches are lost.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                seen = self._accum_grad_ids.get(id(p))
                if seen is not None and seen != id(p.grad):
                    raise RuntimeError(
                        "AdamW8bit(accumulation_steps>1): a gradient was reset between micro-steps (model.zero_grad()?). "
                        "Call optimizer.zero_grad() only (it waits for the update), or accumulate in the training loop"
                    )
                self._accum_grad_ids[id(p)] = id(p.grad)

    def _grad_norms(self, grads) -> list[float]:
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        norms = [n.full_tensor() if sharding.is_dtensor(n) else n for n in norms]
        return torch.stack(norms).tolist() if norms else []  # one host sync

    def _global_norm_multiplier(self, base_mul: float) -> float:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        total = math.sqrt(sum((base_mul * n) ** 2 for n in self._grad_norms(grads)))
        # torch.nn.utils.clip_grad_norm_'s rule (Keras' global_clipnorm)
        return min(1.0, self.max_grad_norm / (total + 1e-6))

    def _step_scalars(self, group: dict) -> StepScalars:
        beta1, beta2 = group["betas"]
        lr = group["lr"](self._updates) if callable(group["lr"]) else group["lr"]  # Keras: a schedule or callable
        return StepScalars(
            lr=float(lr),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
            bias_correction=bool(group["bias_correction"]),
            stochastic_rounding=bool(group["stochastic_rounding"]),
            clip_value=math.inf if group.get("clip_value") is None else float(group["clip_value"]),
            skip_nonfinite=self.nonfinite == "skip",
        )

    def _step_group(self, group: dict, base_mul: float = 1.0, only: set | None = None) -> None:
        """Step the group's parameters that have gradients (``only``: just those whose id is in it)."""
        sc = self._step_scalars(group)
        if group.get("loss_scale") is not None:
            base_mul = base_mul / float(group["loss_scale"])
        entries = []
        for i, p in enumerate(group["params"]):
            if p.grad is None or (only is not None and id(p) not in only):
                continue
            label = self._label(group, i, p)
            self._check_grad(p, p.grad, label)
            entries.append((p, p.grad, label))
        if not entries:
            return
        if self.nonfinite == "raise":
            by_device = defaultdict(list)
            for e in entries:
                by_device[e[0].device].append(e)
            for dev_entries in by_device.values():
                ok = self._finite_mask([e[0] for e in dev_entries], [e[1] for e in dev_entries])
                bad = [e[2] for e, fine in zip(dev_entries, ok) if not fine]
                if bad:
                    raise FloatingPointError(f"non-finite gradient (NaN or Inf) in {', '.join(bad)}")

        buckets: dict[tuple, list] = defaultdict(list)
        for p, g, label in entries:
            state = self.state[p]
            if not state:
                state = self._init_state(p, group, label)
            elif sc.amsgrad and "exp_avg_sq_codes" in state and "max_exp_avg_sq_codes" not in state:
                raise RuntimeError(f"{label}: amsgrad was switched on after training started; its state has no max_exp_avg_sq")
            if self.ema_decay is not None and "ema" not in state:  # new state, or a checkpoint saved without EMA
                state["ema"] = p.detach().to(torch.float32, copy=True)  # fp32: 16-bit weights would stall a slow average
            kind = "8bit" if "exp_avg_codes" in state else "fp32"
            # The step runs on rank-local tensors; for plain tensors these are the tensors themselves.
            p, g, state = sharding.local(p), sharding.local(g), sharding.local_state(state)
            if p.numel() == 0:  # an empty shard: nothing to update, but keep step counts equal on all ranks
                state["step"] += 1
                continue
            buckets[(p.device, p.dtype, kind)].append((p, g, state, label))

        for (device, _dtype, kind), items in buckets.items():
            params = [x[0] for x in items]
            grads = [x[1] for x in items]
            states = [x[2] for x in items]
            counts = torch.zeros(len(items), dtype=torch.int32, device=device) if sc.skip_nonfinite else None
            muls = [base_mul] * len(params)
            moms = None
            if self.ema_decay is not None:  # Keras: the first update copies the weights into the average
                moms = [0.0 if float(s["step"]) == 0 else float(self.ema_decay) for s in states]
            if group.get("clip_norm") is not None:  # Keras' clipnorm: each tensor's norm at most clip_norm
                c = float(group["clip_norm"])
                muls = [base_mul * c / max(base_mul * n, c) if n > 0 else base_mul for n in self._grad_norms(grads)]
            if kind == "8bit":
                for s in states:
                    s["step"] += 1
                adamw8bit_step(
                    params, grads, states, sc, block_size=group["block_size"], bits=group["bits"],
                    backend=self._resolve_backend(device),
                    plan_cache=self._plans[(id(group), device, _dtype)], grad_muls=muls, ema_moms=moms, bad_blocks=counts,
                )
            else:
                fp32_state_step(params, grads, states, sc, foreach=group["foreach"], fused=group["fused"], grad_muls=muls,
                                ema_moms=moms, bad_tensors=counts)
            if counts is not None:
                self._defer_nonfinite_report(counts, [x[3] for x in items], group["block_size"] if kind == "8bit" else None)
        if self._nonfinite_pending and all(p[3] is None for p in self._nonfinite_pending):
            self._report_nonfinite(wait=True)  # CPU only: the counts are already on the host

    def _defer_nonfinite_report(self, counts: torch.Tensor, labels: list[str], block: int | None) -> None:
        if counts.device.type == "cpu":
            self._nonfinite_pending.append((counts, labels, block, None))
            return
        from .kernel_launch import device_guard

        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        with device_guard(counts.device):  # the copy and the event on the stream of the counts' own GPU
            host.copy_(counts, non_blocking=True)  # read at the next step, once the copy has landed: no sync now
            event = torch.cuda.Event()
            event.record()
        self._nonfinite_pending.append((host, labels, block, event))

    # ---- state dict ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        self._report_nonfinite(wait=True)
        sd = super().state_dict()
        sd["lowbit_adamw"] = {"format_version": fmt.FORMAT_VERSION, "block_size": self.defaults["block_size"],
                              "bits": self.defaults["bits"]}
        # torch.distributed.checkpoint keeps only "state" and "param_groups": the version rides there too.
        for g in sd["param_groups"]:
            g[_VERSION_KEY] = fmt.FORMAT_VERSION
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by ``state_dict()``. Unlike torch's default, nothing is cast: codes
        stay uint8 and scales fp32 whatever the parameter dtype; tensors move to the parameter's
        device and ``step`` stays a float32 CPU tensor."""
        meta = state_dict.get("lowbit_adamw")
        groups = state_dict.get("param_groups", [])
        if meta is None and groups and all(_VERSION_KEY in g for g in groups):
            meta = {"format_version": groups[0][_VERSION_KEY]}
        if meta is None:
            raise ValueError(
                "this state dict was not saved by lowbit_adamw.AdamW8bit (no 'lowbit_adamw' entry). "
                "For a torch.optim.AdamW state dict use lowbit_adamw.load_torch_adamw_state_dict(optimizer, sd)"
            )
        if meta.get("format_version") not in fmt.READABLE_VERSIONS:
            raise ValueError(
                f"state dict has format version {meta.get('format_version')!r}; this lowbit_adamw reads versions "
                f"{fmt.READABLE_VERSIONS}. Convert it with the lowbit_adamw version that wrote it (to_torch_adamw_state_dict)"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}")
        id_map = {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"param group {i}: state dict has {len(saved['params'])} parameters, this optimizer has {len(group['params'])}")
            saved_bits = saved.get("bits", 8)  # format version 1 is 8-bit
            if saved_bits != group["bits"]:
                raise ValueError(
                    f"param group {i}: state dict holds {saved_bits}-bit moment codes, this optimizer uses bits={group['bits']}; "
                    f"create the optimizer with bits={saved_bits}, or convert the state through "
                    "to_torch_adamw_state_dict / load_torch_adamw_state_dict"
                )
            if saved.get("block_size") != group["block_size"]:
                raise ValueError(
                    f"param group {i}: state dict was saved with block_size={saved.get('block_size')}, this optimizer uses "
                    f"block_size={group['block_size']}; create the optimizer with block_size={saved.get('block_size')}"
                )
            for j, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                id_map[pid] = (p, self._label(group, j, p), group["block_size"], group["bits"])

        new_state = defaultdict(dict)
        for pid, saved_state in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"state dict has state for parameter id {pid}, which no param group lists")
            p, label, block_size, bits = id_map[pid]
            new_state[p] = self._load_param_state(p, saved_state, label, block_size, bits, meta["format_version"])

        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            ng = dict(saved)
            ng.pop(_VERSION_KEY, None)
            ng["params"] = group["params"]
            if "param_names" in group:
                ng["param_names"] = group["param_names"]
            for k, v in self.defaults.items():
                ng.setdefault(k, v)
            new_groups.append(ng)
        self.state = new_state
        self.param_groups = new_groups

    @staticmethod
    def _load_param_state(p, saved: dict, label: str, block_size: int, bits: int = 8, version: int = fmt.FORMAT_VERSION) -> dict:
        out = {}
        for key, value in saved.items():
            if not isinstance(value, torch.Tensor):
                out[key] = value
            elif key == "step":
                out[key] = sharding.local(value).detach().to(device="cpu", dtype=torch.float32).clone()
            else:
                out[key] = value.detach().to(device=p.device, copy=True)  # dtype kept as saved
        for name in fmt.QUANTIZED_MOMENTS:
            codes, absmax = out.get(name + "_codes"), out.get(name + "_absmax")
            if codes is None:
                continue
            if codes.dtype != torch.uint8 or absmax is None or absmax.dtype != torch.float32:
                raise ValueError(f"{label}: {name} must be uint8 codes with float32 absmax in the state dict")
            if codes.numel() != fmt.codes_numel(p.numel(), bits) or absmax.numel() != fmt.num_blocks(p.numel(), block_size):
                raise ValueError(
                    f"{label}: saved {name} has {codes.numel()} code bytes / {absmax.numel()} blocks but the parameter has "
                    f"{p.numel()} elements ({fmt.codes_numel(p.numel(), bits)} bytes of {bits}-bit codes, "
                    f"{fmt.num_blocks(p.numel(), block_size)} blocks of {block_size})"
                )
            if version == 2 and bits == 4 and name == "exp_avg":
                if sharding.is_dtensor(codes) or sharding.is_dtensor(p):
                    raise ValueError(f"{label}: 4-bit state saved by format version 2 (an older m map) can be converted "
                                     "only unsharded: load it into an optimizer off the mesh, then save it again")
                codes, absmax = fmt.m4_codes_from_v2(codes, absmax, p.numel(), block_size)
            if sharding.is_dtensor(p):
                if not sharding.can_quantize(p, block_size):
                    raise ValueError(f"{label}: saved 8-bit {name}, but this sharded parameter's rows ({sharding.row_length(p)} "
                                     f"elements) are not whole blocks of {block_size}; load it with force_fp32_state off the mesh")
                out[name + "_codes"] = sharding.to_param_layout(p, codes, sharding.codes_shape(p, bits))
                out[name + "_absmax"] = sharding.to_param_layout(p, absmax, sharding.absmax_shape(p, block_size))
            else:  # flat v1 layout; a sharded save's (rows, ...) layout is the same bytes in row-major order
                out[name + "_codes"] = sharding.to_param_layout(p, codes, None).reshape(-1)
                out[name + "_absmax"] = sharding.to_param_layout(p, absmax, None).reshape(-1)
        for name in (*fmt.QUANTIZED_MOMENTS, "ema"):  # full-precision tensors shaped like the parameter
            if name in out:
                if out[name].shape != p.shape:
                    raise ValueError(f"{label}: saved {name} has shape {tuple(out[name].shape)}, the parameter {tuple(p.shape)}")
                out[name] = sharding.to_param_layout(p, out[name], p.shape)
        return out
