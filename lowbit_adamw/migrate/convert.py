"""Switch optimizers mid-run: AdamW8bit state (8- or 4-bit) <-> torch.optim.AdamW state (dequantize / quantize)."""
from __future__ import annotations

import copy

import torch

from .. import format as fmt
from ..format import layout
from ..optim import placement
from ..optim.checkpoint import META_KEY, ORDER_KEY
from . import TORCH_GROUP_KEYS, identify, lowbit_to_torch, step_tensor


def to_torch_adamw_state_dict(optimizer) -> dict:
    """A state dict that ``torch.optim.AdamW`` over the same parameters loads with ``load_state_dict``.
    8-bit moments are dequantized to the parameter's shape (torch's loader casts them to the parameter
    dtype, as it does for any AdamW state); ``lowbit-adamw convert`` writes the same from the file."""
    return lowbit_to_torch(optimizer.state_dict())


def load_torch_adamw_state_dict(optimizer, torch_state_dict: dict) -> None:
    """Load a ``torch.optim.AdamW`` state dict into an AdamW8bit over the same parameters: moments of
    parameters that get 8-bit state are quantized, the others are kept in fp32. Hyper-parameters come
    from the torch state dict; the AdamW8bit-only settings (block size, ...) stay as they are.

    A state dict of another kind is not read as torch's: AdamW8bit's own loads as it is, bitsandbytes' and
    torchao's go through the converter ``optimizer.load_state_dict`` uses (with its warning), and one of no
    known kind is refused with the list of kinds that load."""
    if identify(torch_state_dict) != "torch":
        optimizer.load_state_dict(torch_state_dict)
        return
    optimizer.load_state_dict(from_torch_adamw(optimizer, torch_state_dict))


def from_torch_adamw(optimizer, torch_state_dict: dict) -> dict:
    """The AdamW8bit state dict (for ``optimizer``) that holds a ``torch.optim.AdamW`` state dict's state."""
    sd = torch_state_dict
    if len(sd["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"torch state dict has {len(sd['param_groups'])} param groups, the optimizer {len(optimizer.param_groups)}")
    groups, id_to_param = [], {}
    for i, (tg, g) in enumerate(zip(sd["param_groups"], optimizer.param_groups)):
        if len(tg["params"]) != len(g["params"]):
            raise ValueError(f"param group {i}: torch state dict has {len(tg['params'])} parameters, the optimizer {len(g['params'])}")
        ng = {k: v for k, v in g.items() if k != "params"}
        ng.update({k: copy.deepcopy(tg[k]) for k in TORCH_GROUP_KEYS if k in tg})
        ng["params"] = list(tg["params"])
        groups.append(ng)
        id_to_param.update({pid: (p, g) for pid, p in zip(tg["params"], g["params"])})
    state = {}
    for pid, s in sd["state"].items():
        p, g = id_to_param[pid]
        out = {}
        if "step" in s:  # a state without one is refused by the loader, whatever it holds
            out["step"] = step_tensor(s["step"])
        names = [n for n in fmt.QUANTIZED_MOMENTS if n in s]
        if placement.wants_8bit(optimizer, p, g):
            for name in names:
                flat = layout.logical_to_flat(s[name].to(p.device), p)
                codes, absmax = fmt.quantize_blockwise(flat, fmt.is_signed(name), g["block_size"], g["bits"])
                out[name + "_codes"], out[name + "_absmax"] = codes, absmax
            if layout.element_order(p) is not None:  # the codes follow p's storage order (lowbit_adamw.optim.checkpoint)
                out[ORDER_KEY] = torch.tensor(layout.element_order(p), dtype=torch.int64)
        else:
            for name in names:
                out[name] = s[name].to(device=p.device, dtype=placement.full_state_dtype(p)).reshape(p.shape).clone()
        if "ema" in s:
            out["ema"] = s["ema"].to(device=p.device, dtype=placement.full_state_dtype(p)).reshape(p.shape).clone()
        state[pid] = out
    new_sd = optimizer.state_dict()
    new_sd["state"], new_sd["param_groups"] = state, groups
    # The run continues where the other optimizer stopped: the update count (a callable lr's argument,
    # the EMA phase) is the largest per-parameter step.
    steps = [int(s["step"].item()) for s in state.values() if "step" in s]
    if steps:
        new_sd[META_KEY] = dict(new_sd[META_KEY], updates=max(steps))
    return new_sd
