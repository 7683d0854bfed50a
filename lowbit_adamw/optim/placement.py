"""What state a parameter gets and where it lives: 8-bit (or 4-bit) codes or full-precision moments,
on the parameter's device or in host memory (``offload="cpu"``), and the re-encodings when that
changes (``fp32_state`` forced later, a group's ``bits``/``block_size`` changed, a checkpoint saved on
the other side). Functions of the optimizer (``opt``): it owns the state, these decide its form.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from .. import format as fmt
from ..format import layout, sharding
from ..format.step_spec import state_names

QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)


def full_state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of full-precision moments: float64 (complex128) for float64 (complex128) parameters,
    else float32 (complex64 for complex64), whatever a 16-bit parameter's dtype."""
    if p.dtype in (torch.float64, torch.complex128, torch.complex64):
        return p.dtype
    return torch.float32


def force_fp32_state(opt, *items, model: nn.Module | None = None) -> None:
    """Keep fp32 state for these parameters, modules, or module types (searched in ``model``).
    Parameters that already have 8-bit state are converted (dequantized) in place.

    The choice is also remembered by where each parameter lives (its module and attribute name) when that
    is known: a module or module type names it, and a bare parameter is looked up in ``model`` when given.
    A parameter that replaces it there later (accelerate's FSDP2 swaps sharded parameters into the modules
    and into the optimizer after construction) keeps the choice (``follows_fp32_choice``)."""
    params: list[torch.Tensor] = []
    modules: list[nn.Module] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, nn.Module):
            if model is None:
                raise ValueError(f"fp32_state names the module type {item.__name__}: pass model= to search it")
            found = [mod for mod in model.modules() if isinstance(mod, item)]
            params += [p for mod in found for p in mod.parameters(recurse=False)]
            modules += found
        elif isinstance(item, nn.Module):
            params += list(item.parameters())
            modules += list(item.modules())
        elif isinstance(item, torch.Tensor):
            params.append(item)
            if model is not None:
                modules += [mod for mod in model.modules() if any(q is item for q in mod._parameters.values())]
        else:
            raise TypeError(f"fp32_state items must be parameters, modules or module types, got {type(item).__name__}")
    chosen = {id(p) for p in params}
    for mod in modules:
        for name, q in mod._parameters.items():
            if q is not None and id(q) in chosen:
                opt._fp32_slots.append((weakref.ref(mod), name, id(q)))
    for p in params:
        opt._fp32_forced[p] = True
        state = opt.state.get(p)
        if state and "exp_avg_codes" in state:
            dequantize_state(opt, p, state)


def follows_fp32_choice(opt, p: torch.Tensor) -> bool:
    """Whether ``p`` took the place of a parameter chosen for fp32 state, in the module attribute that
    held it (see ``force_fp32_state``); if so it is chosen itself from now on. Only parameters the
    optimizer was not built with are looked up, once each, when their state is created."""
    if not opt._fp32_slots or id(p) in opt._built_ids:
        return False
    for ref, name, _ in opt._fp32_slots:
        mod = ref()
        if mod is not None and mod._parameters.get(name) is p:
            opt._fp32_forced[p] = True
            return True
    return False


def dequantize_state(opt, p, state) -> None:
    bits, block = opt._layouts.get(p, (group_of(opt, p)["bits"], group_of(opt, p)["block_size"]))
    loc = layout.real_view(sharding.local(p))
    order = layout.element_order(sharding.local(p))
    for name in fmt.QUANTIZED_MOMENTS:
        if name + "_codes" in state:
            codes, absmax = state.pop(name + "_codes"), state.pop(name + "_absmax")
            flat = fmt.dequantize_blockwise(sharding.local(codes).reshape(-1), sharding.local(absmax).reshape(-1),
                                            fmt.is_signed(name), block, bits, numel=loc.numel())
            full = torch.empty_like(sharding.local(p), dtype=full_state_dtype(p), device=flat.device)
            layout.real_view(full).copy_(layout.from_order(flat, loc.shape, order))
            state[name] = sharding.like(p, full, p.shape)
    opt._layouts.pop(p, None)


def group_of(opt, p):
    for g in opt.param_groups:
        if any(q is p for q in g["params"]):
            return g
    raise KeyError("parameter is not in this optimizer")


FULL_STATE_CAUSES = ("dtype", "fp32_state", "min_8bit_size", "shard_rows")  # in the order full_state_cause asks


def full_state_cause(opt, p: torch.Tensor, group: dict, min_size: int | None = None) -> str | None:
    """Why ``p`` gets full-precision state, or None if it gets 8-bit (4-bit) codes: ``"dtype"`` (float64,
    complex128), ``"fp32_state"`` (the group's flag, or chosen: ``force_fp32_state``), ``"min_8bit_size"``
    (too small), ``"shard_rows"`` (a DTensor whose rows are not whole blocks, or not sharded by rows:
    ``format.sharding.can_quantize``)."""
    if p.dtype not in QUANTIZABLE_DTYPES:
        return "dtype"
    if group["fp32_state"] or p in opt._fp32_forced or follows_fp32_choice(opt, p):
        return "fp32_state"
    min_size = opt._min_size_override.get(p, group["min_8bit_size"]) if min_size is None else min_size
    if layout.real_view(p).numel() < min_size:
        return "min_8bit_size"
    if not sharding.can_quantize(p, group["block_size"]):
        return "shard_rows"
    return None


def wants_8bit(opt, p: torch.Tensor, group: dict, min_size: int | None = None) -> bool:
    return full_state_cause(opt, p, group, min_size) is None


def state_device(p: torch.Tensor, group: dict) -> torch.device:
    """Where the state of ``p`` lives: host memory for an offloaded group, else beside the parameter."""
    return torch.device("cpu") if group.get("offload") == "cpu" else sharding.local(p).device


def place_state(p: torch.Tensor, group: dict, state: dict) -> None:
    """State written on one side (a checkpoint, or the group's ``offload`` changed) moves to the other
    as it is: the bytes are the same wherever they live."""
    if sharding.is_dtensor(p):
        return
    dev = state_device(p, group)
    # Every tensor of a state moves together: the first one tells (this runs for every parameter each step).
    for k, v in state.items():
        if k != "step" and isinstance(v, torch.Tensor):
            if v.device == dev:
                return
            break
    else:
        return
    for k, v in state.items():
        if k != "step" and isinstance(v, torch.Tensor) and v.device != dev:
            state[k] = v.to(dev)


def init_state(opt, p: torch.Tensor, group: dict) -> dict:
    state = opt.state[p]
    dev = state_device(p, group)
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    names = state_names(group["amsgrad"])
    cause = full_state_cause(opt, p, group)
    if cause is None:
        block, bits = group["block_size"], group["bits"]
        numel = layout.real_view(sharding.local(p)).numel()
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
                state[name + "_codes"] = torch.full((fmt.codes_numel(numel, bits),), zero, dtype=torch.uint8, device=dev)
                state[name + "_absmax"] = torch.zeros(fmt.num_blocks(numel, block), dtype=torch.float32, device=dev)
        opt._layouts[p] = (bits, block)
    else:
        if cause == "min_8bit_size" and sharding.can_quantize(p, group["block_size"]):  # only its size keeps it fp32
            opt._small_fp32.append((layout.real_view(sharding.local(p)).numel(), group["bits"], group["block_size"]))
        elif cause == "shard_rows":
            opt._sharded_fp32.append((layout.real_view(sharding.local(p)).numel(), group["bits"], group["block_size"],
                                      sharding.largest_row_block(p, group["block_size"])))
        for name in names:
            state[name] = torch.zeros_like(p, dtype=full_state_dtype(p), memory_format=torch.preserve_format,
                                           device=dev)
    return state


def ema_state(p: torch.Tensor, device=None) -> torch.Tensor:
    # fp32 (16-bit weights would stall a slow average); float64/complex weights keep their own dtype
    ema = torch.empty_like(p, dtype=full_state_dtype(p), device=device or p.device)
    return ema.copy_(p.detach())


def convert_if_relaid(opt, p, group, state, label) -> None:
    """A group whose ``bits`` or ``block_size`` changed after its state was written: re-encode the
    state for the new layout (dequantize with the old, quantize with the new) instead of reading old
    codes with the new layout."""
    if "exp_avg_codes" not in state:
        return
    old = opt._layouts.get(p)
    new = (group["bits"], group["block_size"])
    if old is None or old == new:
        return
    if sharding.is_dtensor(p):
        raise ValueError(f"{label}: the group's bits/block_size changed from {old} to {new} after training started; "
                         "a sharded state cannot be re-encoded in place. Restore the group's settings")
    warnings.warn(f"AdamW8bit: {label}: the group's (bits, block_size) changed from {old} to {new}; its state is "
                  "re-encoded (one extra rounding)", UserWarning, stacklevel=5)
    numel = layout.real_view(p).numel()
    for name in fmt.QUANTIZED_MOMENTS:
        if name + "_codes" in state:
            flat = fmt.dequantize_blockwise(state[name + "_codes"], state[name + "_absmax"], fmt.is_signed(name), old[1],
                                            old[0], numel=numel)
            state[name + "_codes"], state[name + "_absmax"] = fmt.quantize_blockwise(flat, fmt.is_signed(name), new[1], new[0])
    opt._layouts[p] = new
