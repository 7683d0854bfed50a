"""``AdamW8bit``: a drop-in ``torch.optim.AdamW`` whose moments are 8-bit (or 4-bit) blockwise codes.

The class coordinates, as torch's ``adamw.py`` does: it owns the param groups and the state and
dispatches each bucket of tensors to one call of ``torch.ops.lowbit_adamw.step_`` (``lowbit_adamw.step.ops``).
The other concerns live in their own modules, a layer each (``lowbit_adamw``'s docstring draws them):
the update in ``format.step_spec`` and ``step.functional``, memory order in ``format.layout``, clipping
norms in ``step.clipping``; checks of the user's input in ``optim.validation``, the form and place of each
parameter's state in ``optim.placement``, the state dict and its format versions in ``optim.checkpoint``,
the step inside backward in ``optim.in_backward``, non-finite reports in ``optim.nonfinite``,
bitsandbytes' calling conventions in ``optim.bnb_compat``; state in host memory in ``offload`` (the
pipeline and the buckets into it); another optimizer's state dict converted on load by ``migrate``.

A step has two phases. First everything is computed and checked without writing anything: every
group's hyper-parameters (a callable ``lr`` is called here, and NaN or negative values are refused
naming the group), the gradients (sparse, dtype, shape), ``nonfinite="raise"``'s check, state for new
parameters, the clipping multipliers. Then the buckets run; each is one op call that defers
signal handlers (``KeyboardInterrupt``) until its writes are done. An exception in the first phase leaves every
parameter and state tensor as it was.
"""
from __future__ import annotations

import math
import warnings
import weakref
from collections import defaultdict
from typing import Iterable

import torch
from torch import nn

from . import format as fmt
from . import migrate
from .format import layout, sharding
from .migrate import convert
from .offload.steps import OffloadSteps
from .optim import bnb_compat, checkpoint, notices, placement, validation
from .optim.in_backward import InBackward, check_single_device
from .optim.nonfinite import NonfiniteReporter
from .optim.placement import QUANTIZABLE_DTYPES
from .step import clipping, ops

SUPPORTED_DTYPES = QUANTIZABLE_DTYPES + (torch.float64, torch.complex128)
# Attributes a copy of the optimizer (deepcopy, pickle, torch.save) must carry besides torch's
# defaults/state/param_groups; the rest is rebuilt by _init_runtime.
_PERSISTENT = ("backend", "nonfinite", "max_grad_norm", "accumulation_steps", "ema_decay", "ema_overwrite_frequency",
               "step_in_backward", "_bucket_bytes", "seed", "_calls", "_updates", "_fp32_forced", "_min_size_override",
               "_layouts", "_reporter")


class AdamW8bit(torch.optim.Optimizer):
    r"""AdamW with 8-bit blockwise state (``torch.optim.AdamW`` semantics, decoupled weight decay).

    Args (shared with ``torch.optim.AdamW``, same defaults; everything after ``amsgrad`` is keyword-only,
    as in torch):
        params, lr=1e-3 (float, 1-element tensor, or a callable of the update count), betas=(0.9, 0.999)
        (floats or 1-element tensors), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
        foreach=None, fused=None (the last two go to torch's AdamW for the parameters kept in full-precision
        state), capturable=False, differentiable=False (True is refused: see the README).

    bitsandbytes' calls: a 7th to 9th positional argument is bitsandbytes' ``optim_bits``, ``args``,
    ``min_8bit_size``; ``optim_bits``, ``is_paged``, ``percentile_clipping``, ``block_wise``, ``max_unorm``,
    ``skip_zeros`` are taken by name, and ``GlobalOptimManager`` overrides are honoured (``lowbit_adamw.optim.bnb_compat``).

    Keyword-only:
        bits: width of the moment codes, 8 (default, 2.03 bytes of state per parameter) or 4 (1.06 bytes;
            codes packed two per byte). Per param group too.
        block_size: elements per quantization block (power of two, 64..4096; default 256 at 8 bits and
            128 at 4 bits).
        min_8bit_size: parameters with fewer elements keep fp32 state (default 4096).
        bias_correction: apply Adam's bias correction (MLX calls it ``bias_correction``; default True).
        stochastic_rounding: write 16-bit parameters with stochastic rounding (default False), from
            counter-based random numbers (``lowbit_adamw.format.rng``) that every backend computes alike.
        seed: the seed of those numbers (default: ``torch.initial_seed()``, so ``torch.manual_seed``
            makes runs repeatable without drawing from torch's generator); saved in the state dict.
        backend: ``"auto"`` (Triton for CUDA tensors when available; on the CPU the C++ step, built at
            first use when a C++ compiler is found, else the torch.compile'd step, else eager PyTorch),
            ``"torch"`` (eager), ``"compiled"``, ``"cpp"`` or ``"triton"``. Also settable with the
            environment variable ``LOWBIT_ADAMW_BACKEND``.
        nonfinite: what a gradient with NaN/Inf does. ``"skip"`` (default): each quantization block
            whose gradient holds NaN/Inf keeps its parameter values and state exactly as they were
            (a tensor in fp32 state: the whole tensor), the rest updates, inside the step's own pass and
            without a host sync; such blocks do not count in ``max_grad_norm``/``clip_norm``; a warning
            names the tensors and ``opt.nonfinite_skipped`` totals them. ``"raise"``: a checking pass
            over every group raises before anything is updated. ``"ignore"``: no check (NaN then
            propagates into that tensor's parameter and state, as in torch).
        fp32_state: parameters, modules or module types whose parameters keep fp32 state
            (e.g. ``fp32_state=[nn.Embedding]`` with ``model=model``, or ``fp32_state=[model.embed]``).
            A choice made through a module (or a parameter found in ``model``) also holds for a parameter
            swapped into that module attribute later, as accelerate's FSDP2 does.
        model: the model to search when ``fp32_state`` names module types (or parameters, to follow them).
        clip_value, clip_norm, max_grad_norm, loss_scale, accumulation_steps, ema_decay,
        ema_overwrite_frequency: see the README (Keras/MLX options).
        step_in_backward: update each parameter during ``backward()``, as soon as its gradient is
            complete, and free the gradient right away (``lowbit_adamw.optim.in_backward``). Single device
            only; ``max_grad_norm`` and ``accumulation_steps > 1`` are refused (they need all gradients
            at once), and so is GradScaler, at its first step.
        step_in_backward_bucket_mb: gradient megabytes that trigger a bucket's step (default 64); also
            the size of the buckets an offloaded step moves to the host at a time.
        offload: ``None`` (default) or ``"cpu"``: the state of CUDA parameters lives in host memory and
            the C++ step runs there, overlapped with backward under ``step_in_backward``
            (``lowbit_adamw.offload.pipeline``). Per param group too. With ``step_in_backward``, ``max_grad_norm``
            is allowed here: the gradients go down during backward and the CPU steps wait for its end.
            CPU parameters go through the same pipeline with the CPU standing in for the device.

    Param groups may set any of the hyper-parameters above plus ``fp32_state=True`` for the whole group.
    Parameters: float32, bfloat16, float16 and complex64 get quantized state; float64 and complex128
    keep full-precision state in their own dtype (as torch's AdamW). Any layout: dense tensors with any
    strides (``channels_last``) are stepped in memory order and keep their layout.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *bnb_positional,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = True,
        block_size: int | None = None,
        min_8bit_size: int = 4096,
        bits: int = 8,
        bias_correction: bool = True,
        stochastic_rounding: bool = False,
        seed: int | None = None,
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
        offload: str | None = None,
        optim_bits: int | None = None,
        args=None,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
    ):
        opts = validation.constructor_options(
            bnb_positional, optim_bits=optim_bits, args=args, min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, is_paged=is_paged, max_unorm=max_unorm,
            skip_zeros=skip_zeros, differentiable=differentiable, capturable=capturable,
            decoupled_weight_decay=decoupled_weight_decay, fused=fused, foreach=foreach, backend=backend, nonfinite=nonfinite,
            accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm, ema_decay=ema_decay,
            ema_overwrite_frequency=ema_overwrite_frequency, seed=seed, step_in_backward=step_in_backward,
            step_in_backward_bucket_mb=step_in_backward_bucket_mb, offload=offload)
        min_8bit_size, all_fp32, backend, bucket_mb = (opts[k] for k in ("min_8bit_size", "all_fp32", "backend", "bucket_mb"))
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
            capturable=False, differentiable=False, fused=fused, decoupled_weight_decay=True,
            block_size=block_size, bits=bits, min_8bit_size=min_8bit_size, bias_correction=bias_correction,
            stochastic_rounding=stochastic_rounding, fp32_state=bool(all_fp32), clip_value=clip_value, clip_norm=clip_norm,
            loss_scale=loss_scale, offload=offload,
        )
        self._validate_group(dict(defaults, block_size=block_size or fmt.default_block_size(bits)))
        self.backend = backend
        self.nonfinite = nonfinite
        self.max_grad_norm = max_grad_norm
        self.accumulation_steps = accumulation_steps
        self.ema_decay = ema_decay
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.step_in_backward = bool(step_in_backward)
        self._bucket_bytes = int(min(bucket_mb, 2.0**40) * 2**20)
        self.seed = (torch.initial_seed() & 0xFFFFFFFF) if seed is None else seed
        self._calls = 0  # step() calls, for accumulation
        self._updates = 0  # applied updates, the step a callable lr receives
        self._fp32_forced: dict = {}  # parameter -> True (keyed by the tensor, so copies of the optimizer map it)
        self._min_size_override: dict = {}  # parameter -> min_8bit_size (bitsandbytes' per-parameter overrides)
        self._layouts: dict = {}  # parameter -> (bits, block_size) its quantized state was written with
        self._reporter = NonfiniteReporter()
        self._init_runtime()
        super().__init__(params, defaults)
        for p, config in bnb_compat.manager_overrides(self.param_groups).items():
            if config.get("optim_bits") == 32:
                self._fp32_forced[p] = True
            if "min_8bit_size" in config:
                self._min_size_override[p] = validation.check_int("min_8bit_size (GlobalOptimManager override)", config["min_8bit_size"], 0)
        if fp32_state is not None:
            self.force_fp32_state(*fp32_state, model=model)
        self._built_ids = self._built_layouts()

    def _init_runtime(self) -> None:
        """What a copy of the optimizer rebuilds instead of copying: caches, hooks, pending buckets."""
        self._cache_ids: dict = {}  # (group index, device, dtype) -> id of its Triton plan cache (lowbit_adamw.step.ops)
        self._resolved_backends: dict = {}  # device -> the backend "auto" (or the choice) means there
        weakref.finalize(self, ops.drop_plan_caches, self._cache_ids.values())
        self._in_backward = InBackward(self._step_in_backward_params, getattr(self, "_bucket_bytes", 64 << 20),
                                       self._finish_update) if self.step_in_backward else None
        self._warned_no_triton = False
        self._has_dtensors = True  # any DTensor parameter (set at each step; state lists unwrap them only then)
        self._label_cache: dict = {}  # id(group) -> (its params list, length, names, labels): see _labels_of
        self._position_cache: dict = {}  # id(group) -> (ids of its params, param -> positions): see _positions
        self._offload = OffloadSteps(self)  # the offloaded buckets' pipelines (lowbit_adamw.offload.steps)
        self._small_fp32: list = []  # (numel, bits, block_size) of new fp32 state kept only for min_8bit_size
        self._small_said = False
        self._lost_said = False  # notices.say_fp32_choices_lost
        self._sharded_fp32: list = []  # (local numel, bits, block_size, a block that would fit) of shards kept fp32
        self._sharded_said = False
        # (weakref to module, attribute, id of the parameter there) for each fp32_state choice whose home is known:
        # placement.follows_fp32_choice (a copy does not follow: it holds its own parameters)
        self._fp32_slots: list = []
        self._built_ids = self._built_layouts()  # the parameters it was built with (a copy: the copy's own)

    # ---- copies: deepcopy, pickle, torch.save ----------------------------------------------------

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["lowbit_adamw"] = {k: getattr(self, k) for k in _PERSISTENT}
        return state

    def __setstate__(self, state: dict) -> None:
        extra = state.pop("lowbit_adamw", None)
        super().__setstate__(state)
        if extra is None:  # pickled by torch's base class (an older lowbit_adamw): the defaults of a fresh optimizer
            extra = dict(backend="auto", nonfinite="skip", max_grad_norm=None, accumulation_steps=1, ema_decay=None,
                         ema_overwrite_frequency=None, step_in_backward=False, _bucket_bytes=64 << 20, seed=0, _calls=0,
                         _updates=0, _fp32_forced={}, _min_size_override={}, _layouts={}, _reporter=NonfiniteReporter())
        for k, v in extra.items():
            setattr(self, k, v)
        if isinstance(self._reporter, dict):  # NonfiniteReporter's own getstate
            r = NonfiniteReporter()
            r.totals = dict(self._reporter.get("totals", {}))
            self._reporter = r
        self._init_runtime()
        if self.step_in_backward:
            for group in self.param_groups:
                for p in group["params"]:
                    self._in_backward.attach(p)

    # ---- groups and validation (lowbit_adamw.optim.validation) -------------------------------------------

    _validate_group = staticmethod(validation.validate_group)
    _label = staticmethod(validation.label)

    def add_param_group(self, param_group: dict) -> None:
        """As torch's; the group (its hyper-parameters and parameters) is checked before it is kept, so
        a refused group leaves the optimizer as it was."""
        if isinstance(param_group, dict) and param_group.get("block_size", self.defaults["block_size"]) is None:
            param_group = dict(param_group, block_size=fmt.default_block_size(param_group.get("bits", self.defaults["bits"])))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
            for i, p in enumerate(group["params"]):
                label = self._label(group, i, p)
                if p.dtype not in SUPPORTED_DTYPES:
                    raise TypeError(f"{label}: dtype {p.dtype} is not supported (use float32, bfloat16, float16, float64 "
                                    "or a complex type)")
                if self.step_in_backward:
                    check_single_device(p, label)
                if self._offload.defers_clipping() and group.get("offload") != "cpu":
                    raise ValueError(f"{label}: step_in_backward=True with max_grad_norm needs offload='cpu' in every param "
                                     "group (only the offloaded CPU steps can wait for the end of backward)")
                if group.get("offload") and (sharding.is_dtensor(p) or p.device.type not in ("cuda", "cpu")):
                    raise ValueError(f"{label}: offload='cpu' takes CUDA parameters (or CPU ones, through the CPU stand-in), "
                                     f"not {'a sharded one' if sharding.is_dtensor(p) else p.device.type}; leave offload=None "
                                     "for this param group")
            self._check_aliasing()
        except Exception:
            self.param_groups.pop()
            raise
        if self.step_in_backward:
            for p in group["params"]:
                self._in_backward.attach(p)

    def _positions(self, group: dict) -> dict:
        """Each parameter of ``group`` -> every position it is listed at, in order. Kept per group and
        rebuilt when its list changes (compared by identity, in C): a step in backward asks once per bucket."""
        params = group["params"]
        ids = tuple(map(id, params))
        hit = self._position_cache.get(id(group))
        if hit is None or hit[0] != ids:
            where: dict = {}
            for i, p in enumerate(params):
                where.setdefault(p, []).append(i)
            live = {id(g) for g in self.param_groups}
            self._position_cache = {k: v for k, v in self._position_cache.items() if k in live}
            hit = self._position_cache[id(group)] = (ids, where)
        return hit[1]

    def _listed(self, group: dict, only) -> list:
        """(position, param) for each listing in ``group`` of the parameters in ``only`` (all of them
        for None), in list order: each call costs the bucket, not the model."""
        if only is None:
            return list(enumerate(group["params"]))
        where = self._positions(group)
        return sorted(((i, p) for p in only if p in where for i in where[p]), key=lambda item: item[0])

    def _labels_of(self, group: dict) -> list[str]:
        """Every parameter's label in ``group``, built once (the step needs them for each parameter,
        every step) and again only when the group's parameter list or names change."""
        params, names = group["params"], group.get("param_names")
        hit = self._label_cache.get(id(group))
        if hit is None or hit[0] is not params or hit[1] != len(params) or hit[2] is not names:
            hit = (params, len(params), names, [self._label(group, i, p) for i, p in enumerate(params)])
            self._label_cache[id(group)] = hit
        return hit[3]

    def force_fp32_state(self, *items, model: nn.Module | None = None) -> None:
        """Keep fp32 state for these parameters, modules, or module types (searched in ``model``).
        Parameters that already have 8-bit state are converted (dequantized) in place."""
        placement.force_fp32_state(self, *items, model=model)

    def offload_host_bytes(self) -> int:
        """Pinned host memory the offload pipelines hold (the weight copies and staging buffers); the
        state itself is in ordinary host memory (see ``lowbit_adamw.memory``)."""
        return self._offload.host_bytes()

    def _check_aliasing(self) -> None:
        """Two parameters that share memory would be updated at once by the step's threads (and twice):
        refused. The same tensor twice is what torch warns about and steps twice; that is done in order."""
        entries = [(g, i, p) for g in self.param_groups for i, p in enumerate(g["params"])]
        pairs = layout.overlapping_pairs([sharding.local(p) for _, _, p in entries])
        if pairs:
            a, b = pairs[0]
            raise ValueError(
                f"{self._label(entries[a][0], entries[a][1], entries[a][2])} and "
                f"{self._label(entries[b][0], entries[b][1], entries[b][2])} are views of the same memory: the optimizer "
                "would update the shared elements twice. Optimize the tensor they are views of, or give each its own storage")

    def _resolve_backend(self, device: torch.device) -> str:
        if self.backend != "auto":
            return self.backend
        if device.type == "cpu":
            from .step.cpu_kernel import available
            from .step.functional import compiled_available

            return "cpp" if available() else "compiled" if compiled_available() else "torch"
        if device.type == "cuda":
            from .step.kernel_launch import triton_available

            if triton_available():
                return "triton"
            if not self._warned_no_triton:
                self._warned_no_triton = True
                warnings.warn("AdamW8bit: Triton is not importable, CUDA parameters use the slower PyTorch step "
                              "(pip install triton)", RuntimeWarning, stacklevel=4)
        return "torch"

    # ---- the step ------------------------------------------------------------------------------

    @property
    def nonfinite_skipped(self) -> dict[str, int]:
        """Per parameter label, how many blocks (or whole fp32-state tensors) were left unchanged for a
        non-finite gradient so far. Reading it waits for the counts of the last step."""
        self._reporter.report(wait=True)
        return dict(self._reporter.totals)

    # GradScaler's fused path: it sets ``grad_scale`` and ``found_inf`` on the optimizer instead of
    # unscaling the gradients itself; the step unscales inside its single pass and skips on inf.
    _step_supports_amp_scaling = True

    def _group_scalars(self, index: int, group: dict) -> dict:
        """The group's hyper-parameters for this step, as Python numbers, checked (phase one). A tensor
        ``lr`` is handed to the op as the tensor (``lr_tensor``), so a scheduler that fills it in place
        never changes a compiled graph; it is checked here when not compiling, else by the op."""
        beta1, beta2 = group["betas"]
        lr, lr_tensor = group["lr"], None
        if callable(lr):  # Keras: a schedule or callable learning rate, called with the number of updates
            lr = lr(self._updates)
            where = f"param group {index}: its lr callable returned {lr!r} at update {self._updates}"
            if isinstance(lr, torch.Tensor):
                if lr.numel() != 1:
                    raise ValueError(f"{where}; it must return one number")
                lr = lr.item()
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
                raise ValueError(f"{where}; a learning rate must be finite and >= 0")
        elif isinstance(lr, torch.Tensor):
            lr_tensor, lr = lr, 0.0
            if not torch.compiler.is_compiling():
                ops.check_lr(lr_tensor, f"param group {index}")
        return dict(lr=float(lr), lr_tensor=lr_tensor, beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), clip_value=ops.clip_value_arg(group.get("clip_value")),
                    amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
                    bias_correction=bool(group["bias_correction"]), stochastic_rounding=bool(group["stochastic_rounding"]),
                    skip_nonfinite=self.nonfinite == "skip")

    def _step_scalars(self, group: dict):
        """The group's hyper-parameters for this step as a ``StepScalars`` (what the backends take)."""
        from .format.step_spec import StepScalars

        sc = self._group_scalars(self._group_index(group), group)
        lr_tensor = sc.pop("lr_tensor")
        return StepScalars(**dict(sc, lr=float(lr_tensor) if lr_tensor is not None else sc["lr"]))

    def _init_group(self, group, only, params, grads, labels, tensor_ids):
        """Phase one for a group: new state, EMA buffers, re-encoding of state whose width or block size
        the group changed; collects the parameters that have gradients. (torch.compile runs a method of
        this name eagerly, with the real tensors, instead of tracing it.)"""
        gi = self._group_index(group)
        base_id = sum(len(g["params"]) for g in self.param_groups[:gi])
        positions = self._positions(group)  # a tensor listed twice keeps its first position (its random streams)
        group_labels = self._labels_of(group)
        prepared = set()  # (device, dtype) pairs whose backend, plan cache and counts are set up for this group
        for i, p in self._listed(group, only):
            if p.grad is None:
                continue
            label = group_labels[i]
            state = self.state[p]
            if not state:
                state = placement.init_state(self, p, group)
            else:
                placement.place_state(p, group, state)
                placement.convert_if_relaid(self, p, group, state, label)
            if group["amsgrad"] and "exp_avg_sq_codes" in state and "max_exp_avg_sq_codes" not in state:
                raise RuntimeError(f"{label}: amsgrad was switched on after training started; its state has no max_exp_avg_sq")
            if group["amsgrad"] and "exp_avg_sq" in state and "max_exp_avg_sq" not in state:
                raise RuntimeError(f"{label}: amsgrad was switched on after training started; its state has no max_exp_avg_sq")
            if self.ema_decay is not None and "ema" not in state:  # new state, or a checkpoint saved without EMA
                state["ema"] = placement.ema_state(p, placement.state_device(p, group)) if not sharding.is_dtensor(p) else \
                    sharding.like(p, placement.ema_state(sharding.local(p)), p.shape)
            params.append(p)
            grads.append(p.grad)
            labels.append(label)
            tensor_ids.append(base_id + positions[p][0])
            local = sharding.local(p)
            if (local.device, local.dtype) in prepared:
                continue
            prepared.add((local.device, local.dtype))
            dev = local.device
            if (self.backend, str(dev)) not in self._resolved_backends:
                self._resolved_backends[(self.backend, str(dev))] = self._resolve_backend(dev)
            self._cache_id(gi, dev, local.dtype)
            self._reporter.prepare((gi, str(dev)), dev, lambda: group_labels)
        if group is self.param_groups[-1]:
            notices.say_small_fp32(self)
            notices.say_sharded_fp32(self)
            notices.say_fp32_choices_lost(self)

    def _built_layouts(self) -> dict:
        """id of each listed parameter -> its group's (bits, block_size): what the lost-choice notice prices."""
        return {id(p): (g["bits"], g["block_size"]) for g in getattr(self, "param_groups", ()) for p in g["params"]}

    def _listed_ids(self) -> frozenset:
        return frozenset(id(p) for g in getattr(self, "param_groups", ()) for p in g["params"])

    def _group_index(self, group) -> int:
        for i, g in enumerate(self.param_groups):
            if g is group:
                return i
        raise KeyError("param group is not in this optimizer")

    def _state_list(self, states: list[dict], kind: str, amsgrad: bool) -> list[torch.Tensor]:
        """The state tensors of ``states``, parameter by parameter in ``ops.state_per_param`` order."""
        names = ops.state_per_param(kind, amsgrad, self.ema_decay is not None)
        if not self._has_dtensors:
            return [s[k] for s in states for k in names]
        return [sharding.local(s[k]) for s in states for k in names]

    def _cache_id(self, index: int, device, dtype) -> int:
        key = (index, str(device), str(dtype))
        if key not in self._cache_ids:
            self._cache_ids[key] = ops.new_cache_id()
        return self._cache_ids[key]

    def _check_all_finite(self, groups_params) -> None:
        """nonfinite="raise": one checking pass over every group's gradients before anything is updated."""
        entries = [(p, label) for params, labels in groups_params for p, label in zip(params, labels)]
        by_device = defaultdict(list)
        for p, label in entries:
            by_device[p.device].append((p, label))
        for dev_entries in by_device.values():
            grads = [sharding.local(p.grad) for p, _ in dev_entries]
            nonempty = [g for g in grads if g.numel()]
            finite = iter([])
            if nonempty:  # min and max: NaN propagates through both, +Inf shows in the max and -Inf in the min
                lo, hi = zip(*(torch.aminmax(layout.real_view(g)) for g in nonempty))
                finite = iter((torch.isfinite(torch.stack(lo)) & torch.isfinite(torch.stack(hi))).tolist())
            flags = torch.tensor([next(finite) if g.numel() else True for g in grads], dtype=torch.bool)
            # Sharded tensors: raise on every rank or on none, or the ranks part ways in the next collective.
            flags = sharding.all_ranks_agree_finite(flags, [p for p, _ in dev_entries]).tolist()
            bad = [label for (_, label), fine in zip(dev_entries, flags) if not fine]
            if bad:
                raise FloatingPointError(f"non-finite gradient (NaN or Inf) in {', '.join(bad)}; nothing was updated")

    @torch.no_grad()
    def step(self, closure=None):
        compiling = torch.compiler.is_compiling()
        if not compiling and self._reporter.pending:
            self._reporter.report(wait=False)
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
            if not compiling:
                self._check_accumulation(self._calls + 1)
            self._calls += 1
            if self._calls % self.accumulation_steps:
                return loss  # gradients keep accumulating in .grad; zero_grad() waits for the update
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # an inf/NaN somewhere in the scaled gradients: skip the whole step, as torch's fused AdamW
        base_mul = 1.0 / self.accumulation_steps
        if grad_scale is not None:
            base_mul /= float(grad_scale)
        self._step_params(None, base_mul)
        self._finish_update()
        return loss

    def _step_params(self, only, base_mul: float = 1.0) -> None:
        """Both phases over the parameters with gradients (``only``: a set of them, for the step in backward)."""
        # Phase one: nothing is written until everything is computed and checked.
        scalars = [self._group_scalars(i, g) for i, g in enumerate(self.param_groups)]
        listed = [self._listed(g, only) for g in self.param_groups]
        self._has_dtensors = any(sharding.is_dtensor(p) for members in listed for _, p in members)
        collected = []
        for group, members in zip(self.param_groups, listed):
            # Eagerly the group's labels are built once; a traced step builds them while tracing (the cache
            # is a dict keyed by id(group), which dynamo would guard on).
            group_labels = None if torch.compiler.is_compiling() else self._labels_of(group)
            for i, p in members:
                if p.grad is not None:
                    validation.check_grad(p, group_labels[i] if group_labels is not None else self._label(group, i, p))
        if self.nonfinite == "raise":
            probe = [([p for _, p in members if p.grad is not None],
                      [self._label(g, i, p) for i, p in members if p.grad is not None])
                     for g, members in zip(self.param_groups, listed)]
            self._check_all_finite(probe)
        for group in self.param_groups:
            params, grads, labels, tensor_ids = [], [], [], []
            self._init_group(group, only, params, grads, labels, tensor_ids)
            collected.append((params, grads, labels, tensor_ids))
        bases = [sum(len(g["params"]) for g in self.param_groups[:i]) for i in range(len(self.param_groups))]
        work = []  # (group index, kind, device, dtype, round, [entry indices]) per bucket
        entries = []  # (group index, param, grad, label, tensor id, kind)
        for gi, (group, (params, grads, labels, tensor_ids)) in enumerate(zip(self.param_groups, collected)):
            seen: dict = {}
            buckets: dict = {}
            for p, g, label, tid in zip(params, grads, labels, tensor_ids):
                kind = ops.KIND_QUANTIZED if "exp_avg_codes" in self.state[p] else ops.KIND_FULL
                rnd = seen.get(p, 0)  # the same tensor twice: a second, later round (torch steps it twice)
                seen[p] = rnd + 1
                key = (kind, p.device, p.dtype, rnd)
                buckets.setdefault(key, []).append(len(entries))
                entries.append((gi, p, g, label, tid, kind, tid - bases[gi]))  # the last: its position in the group
            for key in sorted(buckets, key=lambda k: k[3]):
                work.append((gi, key, buckets[key]))
        if not entries:
            return
        deferring = self._offload.defers_clipping()
        multiplier = None
        if deferring:
            self._offload.defer_norms(entries, base_mul)
        elif self._clips():
            multiplier = self._clip_multipliers(entries, base_mul)
        # Phase two: one op per bucket.
        for gi, (kind, _dev, _dtype, _rnd), idx in work:
            group, sc = self.param_groups[gi], scalars[gi]
            ps = [entries[i][1] for i in idx]
            local_ps = [sharding.local(p) for p in ps] if self._has_dtensors else ps
            nonempty = [j for j, lp in enumerate(local_ps) if lp.numel() > 0 and lp.device.type != "meta"]
            if len(nonempty) < len(ps):
                for j, lp in enumerate(local_ps):
                    # An empty shard: nothing to update, but keep step counts equal on all ranks. Meta tensors
                    # hold no values: only the count moves (the op's meta kernel is its shape function).
                    if lp.numel() == 0 or lp.device.type == "meta":
                        self.state[ps[j]]["step"] += 1
                if not nonempty:
                    continue
                sel = [idx[j] for j in nonempty]
                ps = [ps[j] for j in nonempty]
            else:
                sel = idx
            if group.get("offload") == "cpu":
                if _rnd:  # the same tensor listed twice: its first round must land on the host copy first
                    self._offload.drain()
                self._offload.bucket(gi, kind, ps, sel, entries, multiplier, sc, base_mul)
                continue
            report = self._run_bucket(gi, kind, ps, [sharding.local(p) for p in ps], [sharding.local(entries[i][2]) for i in sel],
                                      None if multiplier is None else multiplier[sel], sel, entries, sc, local_ps[nonempty[0]].device,
                                      base_mul)
            if report is not None:
                self._reporter.add(*report[:3], key=report[3], positions=report[4])
        if not torch.compiler.is_compiling() and self._reporter.pending and all(p[3] is None for p in self._reporter.pending):
            self._reporter.report(wait=True)  # CPU only: the counts are already on the host

    def _run_bucket(self, gi, kind, ps, local_ps, local_grads, multiplier, sel, entries, sc, device, base_mul):
        """One op call for a bucket; ``local_ps``/``local_grads`` are the tensors it steps (the parameters,
        or their host copies when offloaded), ``device`` where that happens. Returns the non-finite
        report's arguments, or None."""
        group = self.param_groups[gi]
        quantized = kind == ops.KIND_QUANTIZED
        states = [self.state[p] for p in ps]
        host_mul = base_mul / float(group["loss_scale"]) if group.get("loss_scale") is not None else base_mul
        counts = ops.call_step_(
            local_ps, local_grads,
            self._state_list(states, kind, sc["amsgrad"]), [s["step"] for s in states],
            multiplier, [host_mul] * len(ps),
            [] if self.ema_decay is None else [float(self.ema_decay)] * len(ps), [entries[i][4] for i in sel],
            [sharding.flat_offset(p) for p in ps],
            kind, self._resolved_backends[(self.backend, str(device))] if quantized else "torch",
            sc["lr"], sc["lr_tensor"], sc["beta1"], sc["beta2"], sc["eps"], sc["weight_decay"], sc["clip_value"], sc["amsgrad"],
            sc["maximize"], sc["bias_correction"], sc["stochastic_rounding"], sc["skip_nonfinite"],
            int(group["block_size"]), int(group["bits"]), int(self.seed), group["foreach"], group["fused"],
            self._cache_ids[(gi, str(device), str(local_ps[0].dtype))],
        )
        if not sc["skip_nonfinite"]:
            return None
        return (counts, tuple(entries[i][3] for i in sel), int(group["block_size"]) if quantized else None,
                (gi, str(ps[0].device)), [entries[i][6] for i in sel])

    # ---- offload (lowbit_adamw.offload.pipeline) -----------------------------------------------------------

    def _clips(self) -> bool:
        return self.max_grad_norm is not None or any(g.get("clip_norm") is not None for g in self.param_groups)

    def _clip_multipliers(self, entries, base_mul: float) -> torch.Tensor:
        """The device multiplier of every entry (``lowbit_adamw.step.clipping``, through ``ops.clip_multipliers``)."""
        flat, params, quantized, blocks, host, clip_norms = self._clip_inputs(entries, base_mul)
        if any(sharding.is_dtensor(p) for p in params):  # the norms all-reduce over the mesh: not inside an op
            dev = flat[0].device
            norms = torch.stack([clipping.applied_norms([f], [p], [q], [b], self.nonfinite == "skip")[0].to(dev)
                                 for f, p, q, b in zip(flat, params, quantized, blocks)])
            return clipping.multipliers(norms, torch.tensor(host, dtype=torch.float32).to(dev), self.max_grad_norm,
                               [None if math.isinf(c) else c for c in clip_norms])
        return ops.clip_multipliers(flat, [sharding.local(p) for p in params], quantized, blocks, self.nonfinite == "skip",
                                    host, self.max_grad_norm, clip_norms)

    def _clip_inputs(self, entries, base_mul: float):
        """Per entry: its gradient flat in block order, parameter, quantized?, block size, host multiplier, clip_norm."""
        flat, params, quantized, blocks, host, clip_norms = [], [], [], [], [], []
        for gi, p, g, _label, _tid, kind, _pos in entries:
            group = self.param_groups[gi]
            lp, lg = layout.real_view(sharding.local(p)), layout.real_view(sharding.local(g))
            if layout.is_dense(lp):
                lg = layout.memory_order_view(lg if layout.is_dense(lg) and layout.same_layout(lp, lg)
                                              else torch.empty_like(lp).copy_(lg))
            flat.append(lg.reshape(-1))
            params.append(p)
            quantized.append(kind == ops.KIND_QUANTIZED)
            blocks.append(int(group["block_size"]))
            loss_scale = group.get("loss_scale")
            host.append(base_mul / float(loss_scale) if loss_scale is not None else base_mul)
            clip_norms.append(math.inf if group.get("clip_norm") is None else float(group["clip_norm"]))
        return flat, params, quantized, blocks, host, clip_norms

    def _finish_update(self) -> None:
        if self._offload.pipelines:  # (a plain dict test, so a fullgraph compiled step without offload does not break here)
            self._offload.drain()
        self._updates += 1
        if self.ema_overwrite_frequency and self._updates % self.ema_overwrite_frequency == 0:
            self.copy_ema_to_params()

    def _check_accumulation(self, call: int) -> None:
        # Accumulation lives in .grad; a new .grad object mid-accumulation means something else
        # (model.zero_grad(), a framework) reset it and the earlier micro-batches are lost.
        seen = getattr(self, "_accum_grad_ids", None)
        if seen is None or call % self.accumulation_steps == 1 or self.accumulation_steps == 1:
            seen = self._accum_grad_ids = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                before = seen.get(id(p))
                if before is not None and before != id(p.grad):
                    raise RuntimeError(
                        "AdamW8bit(accumulation_steps>1): a gradient was reset between micro-steps (model.zero_grad()?). "
                        "Call optimizer.zero_grad() only (it waits for the update), or accumulate in the training loop"
                    )
                seen[id(p)] = id(p.grad)

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

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, except between the micro-steps of ``accumulation_steps``: gradients must keep
        summing in ``.grad`` until the update, so it does nothing there. With ``step_in_backward`` the
        gradients it steps are freed as they are used; what it clears is what backward left, such as
        the gradients a parameter gathered before ``add_param_group`` gave it to this optimizer (the
        plain loop's ``zero_grad`` clears those too)."""
        if self._reporter.pending:
            self._reporter.report(wait=False)
        if not self.step_in_backward and self.accumulation_steps > 1 and self._calls % self.accumulation_steps:
            return
        super().zero_grad(set_to_none=set_to_none)

    # ---- step in backward ------------------------------------------------------------------------

    def _step_in_backward_params(self, ready: list[torch.Tensor]) -> None:
        self._step_params(set(ready))

    # ---- state dict ----------------------------------------------------------------------------

    @torch._disable_dynamo
    def state_dict(self) -> dict:
        """torch's state dict plus ``lowbit_adamw.optim.checkpoint``'s entries; torch's state_dict post-hooks
        see the whole of it."""
        self._offload.drain()
        self._reporter.report(wait=True)
        post, self._optimizer_state_dict_post_hooks = self._optimizer_state_dict_post_hooks, type(
            self._optimizer_state_dict_post_hooks)()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post
        sd = checkpoint.state_dict(self, sd)
        for hook in post.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by ``state_dict()`` (``lowbit_adamw.optim.checkpoint``: every value is
        checked before anything is replaced). torch's load_state_dict pre- and post-hooks run. Unlike
        torch's, nothing is cast: codes stay uint8 and scales fp32 whatever the parameter dtype;
        tensors move to the parameter's device and ``step`` is a float32 CPU tensor."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if checkpoint.saved_meta(state_dict) is None:  # another optimizer's: converted (lowbit_adamw.migrate)
            torch_form, what = migrate.to_torch_form(state_dict)  # refuses a state dict it does not know
            checkpoint.load_state_dict(self, convert.from_torch_adamw(self, torch_form))
            warnings.warn(f"AdamW8bit.load_state_dict converted {what} (a one-time rounding to this optimizer's "
                          f"{self.defaults['bits']}-bit state)", stacklevel=4)
        else:
            checkpoint.load_state_dict(self, state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
