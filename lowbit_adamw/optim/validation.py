"""Checks of what the user passes: the constructor's options, hyper-parameters (torch's wording of its
errors, so code that matches torch's messages still matches), param groups, gradients, and the label
that names a parameter in every message.
"""
from __future__ import annotations

import math
import os

import torch

from .. import format as fmt
from ..format.step_spec import NONFINITE_MODES
from ..offload import pipeline as offloading
from . import bnb_compat

BACKENDS = ("auto", "torch", "compiled", "cpp", "triton")


def constructor_options(bnb_positional, *, optim_bits, args, min_8bit_size, percentile_clipping, block_wise, is_paged,
                        max_unorm, skip_zeros, differentiable, capturable, decoupled_weight_decay, fused, foreach, backend,
                        nonfinite, accumulation_steps, max_grad_norm, ema_decay, ema_overwrite_frequency, seed,
                        step_in_backward, step_in_backward_bucket_mb, offload) -> dict:
    """``AdamW8bit``'s options beyond a param group's, checked before anything is built: a dict of the
    resolved ``min_8bit_size`` (bitsandbytes' positional form included), ``all_fp32`` (bitsandbytes'
    32-bit state), ``backend`` (``LOWBIT_ADAMW_BACKEND`` when unset) and ``bucket_mb``."""
    if bnb_positional:
        extra = bnb_compat.positional_kwargs(bnb_positional)
        optim_bits = extra.get("optim_bits", optim_bits)
        args = extra.get("args", args)
        min_8bit_size = extra.get("min_8bit_size", min_8bit_size)
    all_fp32 = bnb_compat.check_options(optim_bits, args, percentile_clipping, block_wise, is_paged, max_unorm, skip_zeros)
    if differentiable:
        raise ValueError("differentiable=True is not supported: quantizing the moments is not differentiable. Use "
                         "torch.optim.AdamW(differentiable=True) to differentiate through the step")
    if capturable:
        raise ValueError("capturable=True is not supported: the step uploads per-step tables from the host, which a "
                         "CUDA graph would replay stale. torch.compile(opt.step, fullgraph=True) traces it as one op "
                         "per bucket; leave capturable=False")
    if not decoupled_weight_decay:
        raise ValueError("decoupled_weight_decay=False (Adam's L2 penalty) is not supported: AdamW8bit is AdamW")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    backend = backend or os.environ.get("LOWBIT_ADAMW_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    check_int("accumulation_steps", accumulation_steps, 1)
    check_int("min_8bit_size", min_8bit_size, 0)
    if max_grad_norm is not None:
        check_scalar("max_grad_norm", max_grad_norm, 0.0)
    if ema_decay is not None:
        check_scalar("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
    if ema_overwrite_frequency is not None and (ema_decay is None or not isinstance(ema_overwrite_frequency, int)
                                                or isinstance(ema_overwrite_frequency, bool) or ema_overwrite_frequency < 1):
        raise ValueError("ema_overwrite_frequency needs ema_decay and must be an int >= 1")
    if seed is not None:
        check_int("seed", seed, 0)
    # inf: one bucket, stepped at the end of backward
    bucket_mb = check_scalar("step_in_backward_bucket_mb", step_in_backward_bucket_mb, 0.0, allow_inf=True)
    if step_in_backward:
        if bucket_mb <= 0:
            raise ValueError(f"step_in_backward_bucket_mb must be > 0, got {step_in_backward_bucket_mb!r}")
        if max_grad_norm is not None and offload != "cpu":
            raise ValueError("step_in_backward=True cannot apply max_grad_norm: a global norm needs every gradient "
                             "before the first update. Use clip_norm (per tensor) or clip_value, or step_in_backward=False "
                             "(or offload='cpu', whose CPU steps can wait for the end of backward)")
        if accumulation_steps > 1:
            raise ValueError("step_in_backward=True updates in every backward, so it cannot accumulate gradients "
                             "(accumulation_steps > 1): use a larger batch, or step_in_backward=False")
    return dict(min_8bit_size=min_8bit_size, all_fp32=all_fp32, backend=backend, bucket_mb=bucket_mb)


def check_scalar(name, value, low, high=None, high_open=False, what=None, allow_inf=False):
    """``what``: torch's wording of the error (``Invalid learning rate``), kept so that code matching
    torch's messages still matches."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        value = value.item()
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or value != value
            or (not allow_inf and value in (math.inf, -math.inf))):
        raise ValueError(f"{what or 'Invalid ' + name}: {value!r} ({name} must be a finite real number)")
    if value < low or (high is not None and (value >= high if high_open else value > high)):
        bound = f"[{low}, {high})" if high_open else (f"[{low}, {high}]" if high is not None else f">= {low}")
        raise ValueError(f"{what or 'Invalid ' + name}: {value} ({name} must be in {bound})")
    return value


def check_int(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def validate_group(group: dict) -> None:
    lr = group["lr"]
    if not callable(lr):
        check_scalar("lr", lr, 0.0, what="Invalid learning rate")
    for key in ("clip_value", "clip_norm", "loss_scale"):
        if group.get(key) is not None:
            check_scalar(key, group[key], 0.0)
    if group.get("loss_scale") is not None and group["loss_scale"] == 0:
        raise ValueError("loss_scale must be > 0 (gradients are divided by it)")
    if group.get("clip_value") is not None and group.get("clip_norm") is not None:
        raise ValueError("clip_value and clip_norm are exclusive (as Keras' clipvalue / clipnorm): set one")
    check_scalar("eps", group["eps"], 0.0, what="Invalid epsilon value")
    check_scalar("weight_decay", group["weight_decay"], 0.0, what="Invalid weight_decay value")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i in (0, 1):
        check_scalar(f"betas[{i}]", betas[i], 0.0, 1.0, high_open=True, what=f"Invalid beta parameter at index {i}")
    for key in ("amsgrad", "maximize", "bias_correction", "stochastic_rounding", "fp32_state"):
        if not isinstance(group.get(key, False), (bool, int)) or isinstance(group.get(key), float):
            raise ValueError(f"{key} must be True or False, got {group.get(key)!r}")
    if group.get("differentiable"):
        raise ValueError("differentiable=True is not supported (quantized moments are not differentiable)")
    fmt.check_bits(group["bits"])
    if group["block_size"] is not None:  # None (the constructor default): resolved per group by its width
        fmt.check_block_size(group["block_size"])
    check_int("min_8bit_size", group["min_8bit_size"], 0)
    offloading.check_offload(group.get("offload"))


def label(group: dict, index: int, p: torch.Tensor) -> str:
    names = group.get("param_names")
    if names:
        return f"parameter '{names[index]}'"
    return f"parameter {index} of its param group (shape {tuple(p.shape)})"


def check_grad(p, label: str) -> None:
    g = p.grad
    if g.is_sparse:
        raise RuntimeError(f"{label} has a sparse gradient; AdamW8bit does not support sparse gradients (use nn.Embedding(sparse=False) or torch.optim.SparseAdam)")
    if g.device != p.device:
        raise RuntimeError(f"{label} is on {p.device} but its gradient is on {g.device}; move both to one device")
    if g.dtype != p.dtype:
        raise RuntimeError(f"{label} has dtype {p.dtype} but its gradient has dtype {g.dtype}; gradients must match the parameter dtype")
    if g.shape != p.shape:
        raise RuntimeError(f"{label} has shape {tuple(p.shape)} but its gradient has shape {tuple(g.shape)}")
