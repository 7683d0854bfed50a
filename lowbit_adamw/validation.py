"""Checks of what the user passes: hyper-parameters (torch's wording of its errors, so code that
matches torch's messages still matches), param groups, gradients, and the label that names a
parameter in every message.
"""
from __future__ import annotations

import math

import torch

from . import format as fmt
from . import offload as offloading


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
