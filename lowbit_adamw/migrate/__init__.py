"""Optimizer checkpoints that move between AdamW implementations.

Everything passes through one common form, torch.optim.AdamW's state dict: per parameter ``step`` and
the moments ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad) as float32 tensors shaped like
the parameter (and ``ema``, the weights' average, where AdamW8bit's own conversions kept one), and groups
holding torch's hyper-parameters. Into AdamW8bit (``load_state_dict`` calls
:func:`to_torch_form` when the state dict is not its own):

* torch.optim.AdamW: already in the common form;
* bitsandbytes' AdamW (8-bit blockwise, 8-bit tensor-wise or 32-bit state, paged or not): ``state1`` is
  m and ``state2`` is v; 8-bit codes are decoded with the ``qmap`` each parameter's state carries and its
  ``absmax`` blocks (block size from the number of blocks) or tensor-wide ``max``;
* torchao's AdamW8bit/AdamW4bit/AdamWFp8: the moments are tensor subclasses that dequantize themselves.

Out of AdamW8bit (the ``lowbit-adamw convert`` command, for a checkpoint the user takes to another
optimizer): :func:`lowbit_to_torch` and :func:`lowbit_to_bnb` work from the state dict alone, with the
parameter shapes AdamW8bit saves in ``state_dict()["lowbit_adamw"]["params"]``.
"""
from __future__ import annotations

import math

import torch

from .. import format as fmt
from ..format import layout

TORCH_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
TORCH_GROUP_DEFAULTS = dict(
    amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True
)
BNB_WRAPPED_KEY = "__bnb_optimizer_quant_state__"  # bitsandbytes >= 0.45 nests its quantization tensors under it
BNB_BLOCK_SIZE = 256  # bitsandbytes' blockwise optimizer state
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep 32-bit state


def _bnb_state(s: dict) -> dict:
    if isinstance(s, dict) and BNB_WRAPPED_KEY in s:
        s = {**{k: v for k, v in s.items() if k != BNB_WRAPPED_KEY}, **s[BNB_WRAPPED_KEY]}
    return s


def _is_torchao(v) -> bool:
    return isinstance(v, torch.Tensor) and type(v).__name__.startswith("OptimState") and hasattr(v, "dequantize")


def identify(state_dict: dict) -> str | None:
    """Which optimizer wrote ``state_dict``: "lowbit", "bitsandbytes", "torchao", "torch" or None."""
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
        return None
    if "lowbit_adamw" in state_dict or any("lowbit_format_version" in g for g in state_dict["param_groups"]):
        return "lowbit"
    states = [_bnb_state(s) for s in state_dict.get("state", {}).values() if isinstance(s, dict)]
    if any("state1" in s for s in states) or any("optim_bits" in g for g in state_dict["param_groups"]):
        return "bitsandbytes"
    if any(_is_torchao(v) for s in states for v in s.values()):
        return "torchao"
    if all("betas" in g for g in state_dict["param_groups"]) and all(
        set(s) <= {"step", *fmt.QUANTIZED_MOMENTS, "ema"} for s in states  # ema: to_torch_adamw_state_dict keeps it
    ):
        return "torch"
    return None


def _bnb_decode(codes: torch.Tensor, qmap: torch.Tensor, s: dict, which: str, label: str) -> torch.Tensor:
    values = qmap.float().cpu()[codes.cpu().long()].reshape(-1)
    n = values.numel()
    if f"absmax{which}" in s:
        absmax = s[f"absmax{which}"].float().cpu().reshape(-1)
        blocks = absmax.numel()
        size = next((b for b in (2 ** k for k in range(6, 21)) if math.ceil(n / b) == blocks), None)
        if size is None:
            raise ValueError(f"{label}: {blocks} absmax blocks do not tile {n} elements in a power-of-two block size")
        values = values * absmax.repeat_interleave(size)[:n]
    elif f"max{which}" in s:
        values = values * s[f"max{which}"].float().cpu().reshape(-1)[0]
    else:
        raise ValueError(f"{label}: 8-bit state{which} has neither absmax{which} nor max{which}")
    return values.reshape(codes.shape)


def torch_groups(groups: list) -> list:
    out = []
    for g in groups:
        ng = dict(TORCH_GROUP_DEFAULTS)
        ng.update({k: g[k] for k in TORCH_GROUP_KEYS if k in g})
        ng["betas"] = tuple(ng["betas"]) if "betas" in ng else (0.9, 0.999)
        ng["params"] = list(g["params"])
        if "param_names" in g:
            ng["param_names"] = list(g["param_names"])
        out.append(ng)
    return out


def step_tensor(step) -> torch.Tensor:
    """A saved step count (tensor or number) as torch's: a float32 0-d CPU tensor of its own."""
    return step.detach().float().cpu().reshape(()).clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step))


def to_torch_form(state_dict: dict) -> tuple[dict, str]:
    """(the common form of a torch, bitsandbytes or torchao AdamW state dict, a sentence saying what was converted)."""
    kind = identify(state_dict)
    if kind not in ("torch", "bitsandbytes", "torchao"):
        raise ValueError("this state dict was not saved by lowbit_adamw.AdamW8bit (no 'lowbit_adamw' entry), nor by "
                         "torch.optim.AdamW, bitsandbytes' AdamW or torchao's AdamW, which load_state_dict converts")
    state, kinds = {}, set()
    for pid, raw in state_dict.get("state", {}).items():
        s, label = _bnb_state(raw), f"state of parameter {pid}"
        out = {"step": step_tensor(s.get("step", 0))}
        if kind == "bitsandbytes":
            for which, name in (("1", "exp_avg"), ("2", "exp_avg_sq")):
                x = s.get("state" + which)
                if x is None:
                    continue
                if x.dtype == torch.uint8:
                    if f"qmap{which}" not in s:
                        raise ValueError(f"{label}: 8-bit state{which} without its qmap{which}")
                    out[name] = _bnb_decode(x, s[f"qmap{which}"], s, which, label)
                    kinds.add("8-bit")
                else:
                    out[name] = x.detach().float().cpu().clone()
                    kinds.add("32-bit")
            if "exp_avg_sq" not in out:
                raise ValueError(f"{label}: bitsandbytes state with one moment (state1 only) is not AdamW's")
        else:
            for name in (*fmt.QUANTIZED_MOMENTS, "ema"):
                if name in s:
                    v = s[name]
                    if _is_torchao(v):
                        kinds.add(type(v).__name__)
                        v = v.dequantize()
                    out[name] = v.detach().float().cpu().clone()
        state[pid] = out
    groups = torch_groups(state_dict["param_groups"])
    n = len(state)
    what = {
        "torch": f"a torch.optim.AdamW state dict: {n} parameters' moments quantized",
        "bitsandbytes": f"a bitsandbytes AdamW state dict ({', '.join(sorted(kinds)) or 'no'} state): {n} parameters' moments "
                        "decoded with the qmaps and scales they carry and re-encoded (bitsandbytes-only settings dropped)",
        "torchao": f"a torchao AdamW state dict ({', '.join(sorted(kinds)) or 'full-precision'} moments): {n} parameters' "
                   "moments dequantized and re-encoded",
    }[kind]
    return {"state": state, "param_groups": groups}, what


def _saved_params(sd: dict) -> list[dict]:
    params = sd.get("lowbit_adamw", {}).get("params")
    if params is None:
        raise ValueError("this AdamW8bit state dict does not record its parameters' shapes (saved by an older lowbit-adamw): "
                         "convert it with the optimizer live, lowbit_adamw.to_torch_adamw_state_dict(optimizer)")
    return params


def lowbit_to_torch(sd: dict) -> dict:
    """An AdamW8bit state dict as torch.optim.AdamW's: quantized moments decoded to their parameter's shape
    (complex for a complex parameter), everything else copied as it is (torch's loader casts state to the
    parameter's dtype and device). Works from the state dict alone, with the parameter shapes it records."""
    params = _saved_params(sd)
    block_of = {pid: (g["block_size"], g["bits"]) for g in sd["param_groups"] for pid in g["params"]}
    state = {}
    for pid, s in sd["state"].items():
        info = params[pid]
        out = {"step": s["step"].clone()}
        for name in fmt.QUANTIZED_MOMENTS:
            if name + "_codes" in s:
                block_size, bits = block_of[pid]
                shape = list(info["shape"]) + ([2] if info.get("complex") else [])  # layout.real_view's shape
                order = s["element_order"].tolist() if "element_order" in s else None
                flat = fmt.dequantize_blockwise(s[name + "_codes"], s[name + "_absmax"], fmt.is_signed(name), block_size,
                                                bits, numel=math.prod(shape))
                x = layout.from_order(flat, shape, order).contiguous()
                out[name] = torch.view_as_complex(x) if info.get("complex") else x
            elif name in s:
                out[name] = s[name].clone()
        if "ema" in s:  # torch's AdamW ignores it, but it must not be dropped on the way
            out["ema"] = s["ema"].clone()
        state[pid] = out
    return {"state": state, "param_groups": torch_groups(sd["param_groups"])}


def lowbit_to_bnb(sd: dict, min_8bit_size: int = BNB_MIN_8BIT_SIZE) -> dict:
    """An AdamW8bit state dict as bitsandbytes' AdamW8bit's: 8-bit blockwise state (its dynamic maps, blocks
    of 256) for parameters of at least ``min_8bit_size`` elements, 32-bit state for the others, as
    bitsandbytes itself would hold them. Needs bitsandbytes (its maps and quantizer)."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise ImportError("converting to bitsandbytes needs bitsandbytes installed (pip install bitsandbytes)") from e
    torch_sd = lowbit_to_torch(sd)
    if any(g.get("amsgrad") for g in torch_sd["param_groups"]):
        raise ValueError("bitsandbytes' AdamW has no amsgrad; convert with --to torch")
    qmaps = {"1": bnbf.create_dynamic_map(signed=True), "2": bnbf.create_dynamic_map(signed=False)}
    state = {}
    for pid, s in torch_sd["state"].items():
        out = {"step": int(s["step"].item())}
        for which, name in (("1", "exp_avg"), ("2", "exp_avg_sq")):
            x = s[name].detach().float().cpu()  # bitsandbytes keeps its state fp32 and does not cast it on load
            if x.numel() < min_8bit_size:
                out["state" + which] = x.clone()
                continue
            codes, qstate = bnbf.quantize_blockwise(x.contiguous(), code=qmaps[which], blocksize=BNB_BLOCK_SIZE)
            out["state" + which], out["qmap" + which], out["absmax" + which] = codes, qmaps[which].clone(), qstate.absmax.float()
        state[pid] = out
    groups = []
    for g in torch_sd["param_groups"]:
        groups.append({k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "params")} | {"amsgrad": False})
    return {"state": state, "param_groups": groups}
