"""AdamW8bit's state dict: what it holds beside torch's, and everything checked on the way back in.

Saved (``state_dict``): torch's ``{"state", "param_groups"}`` (state_dict hooks run as in torch), plus

* ``"lowbit_adamw"``: ``{"format_version", "block_size", "bits", "updates", "calls", "seed"}``. ``updates``
  is the number of applied updates (a callable ``lr`` receives it, ``ema_overwrite_frequency`` counts
  it), ``calls`` the ``step()`` calls (the phase of ``accumulation_steps``), ``seed`` the seed of the
  counter-based random numbers (``lowbit_adamw.format.rng``): with these a resumed run continues exactly.
* in every param group, ``lowbit_format_version`` and ``lowbit_run`` (the same counters), because
  ``torch.distributed.checkpoint`` keeps only ``state`` and ``param_groups``; a callable ``lr`` is saved
  as the number it gives at the saved update count, with ``lowbit_lr="callable"``, and on load the
  loading optimizer's own callable is kept (a function would not load with ``weights_only=True``);
* per parameter whose blocks run in a non-row-major order (a dense tensor with permuted strides, e.g.
  ``channels_last``), ``element_order``: the dim order of its storage (int64), so that a checkpoint
  loads into a parameter of another layout (the state is re-encoded in the new order, with a warning).

Loaded (``load_state_dict``): torch's load_state_dict pre- and post-hooks run; then every value is
checked before anything is replaced: format version, group and parameter counts, code width and block
size per group, code and scale dtypes and sizes, scales finite and non-negative, ``step`` finite and
non-negative (a Python number becomes a tensor, as torch does), group hyper-parameters valid, and every
parameter state that has a ``step`` complete: all the moments its form needs (codes and scales of m and
v, or full-precision ``exp_avg``/``exp_avg_sq``; ``max_exp_avg_sq`` too with amsgrad), never a mix of
the two forms. Full-precision moments (and the EMA) are shaped like their parameter, finite, v >= 0,
and of the state's dtype (``placement.full_state_dtype``). A failure is a ``ValueError`` naming the
parameter (group, index, state id) and the key, raised before anything is replaced.

One cast is made, with a warning: full-precision moments saved in another floating dtype of the same
kind (real or complex) take the state's dtype, float64 rounded to nearest as ``torch.optim.AdamW``'s own
loader does (it casts silently), 16-bit widened exactly; they are checked for finiteness after the cast.
Nothing else is cast: codes stay uint8 and scales fp32 whatever the parameter dtype; tensors move to the
parameter's device.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict

import torch

from .. import format as fmt
from ..format import layout, sharding
from ..format.step_spec import state_names
from . import placement

VERSION_KEY = "lowbit_format_version"
RUN_KEY = "lowbit_run"
LR_KEY = "lowbit_lr"  # "callable": the group's lr is a function, saved as the value it gives now
META_KEY = "lowbit_adamw"
ORDER_KEY = "element_order"


def run_counters(opt) -> dict:
    return {"updates": int(opt._updates), "calls": int(opt._calls), "seed": int(opt.seed)}


def state_dict(opt, base_state_dict) -> dict:
    """``base_state_dict``: torch's ``Optimizer.state_dict`` of ``opt`` (hooks already applied)."""
    sd = base_state_dict
    counters = run_counters(opt)
    sd[META_KEY] = {"format_version": fmt.FORMAT_VERSION, "block_size": opt.defaults["block_size"],
                    "bits": opt.defaults["bits"], **counters, "params": _param_records(opt)}
    for g, live in zip(sd["param_groups"], opt.param_groups):
        g[VERSION_KEY] = fmt.FORMAT_VERSION
        g[RUN_KEY] = dict(counters)
        if callable(live["lr"]):  # a function does not load with weights_only=True; the loading optimizer has its own
            g["lr"] = float(live["lr"](opt._updates))
            g[LR_KEY] = "callable"
    # Parameters whose blocks follow a permuted storage order say so (see module doc).
    index = 0
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            order = layout.element_order(sharding.local(p))
            st = sd["state"].get(index)
            if order is not None and st is not None and any(k.endswith("_codes") for k in st):
                sd["state"][index] = dict(st, **{ORDER_KEY: torch.tensor(order, dtype=torch.int64)})
            index += 1
    return sd


def _param_records(opt) -> list[dict]:
    """Per saved parameter index, its logical shape and dtype: what lowbit_adamw.migrate needs to write the
    state for another optimizer from the file alone (the ``lowbit-adamw convert`` command)."""
    records, seen = [], set()
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                records.append({"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "complex": p.is_complex()})
    return records


# What a user can do with a parameter state that does not load: its moments start again from zero.
_RESTART = "delete this parameter's entry from the state dict's 'state' to start its moments from zero"


def _bad(label: str, what: str) -> ValueError:
    return ValueError(f"state dict: {label}: {what}")


def _check_step(step, label):
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise _bad(label, f"step must hold one number, got shape {tuple(step.shape)}")
        value = float(sharding.local(step).detach().reshape(-1)[0]) if step.device.type != "meta" else 0.0
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        value = float(step)
    else:
        raise _bad(label, f"step must be a number or a tensor, got {type(step).__name__}")
    if not math.isfinite(value) or value < 0:
        raise _bad(label, f"step is {value}; it must be finite and >= 0")
    return torch.tensor(value, dtype=torch.float32)


def _check_scales(absmax: torch.Tensor, label: str, name: str, bits: int, version: int) -> None:
    """Scales are finite; negative only where the format gives the sign bit a meaning (version 4: the
    4-bit m map's side, the 8-bit v map)."""
    local = sharding.local(absmax)
    if local.device.type == "meta" or local.numel() == 0:
        return
    signed_ok = version >= 4 and (fmt.is_signed(name) == (bits == 4))
    bad = ~torch.isfinite(local) if signed_ok else ~torch.isfinite(local) | (local < 0)
    if bool(bad.any()):
        raise _bad(label, f"{name}_absmax has {int(bad.sum())} scale(s) that are NaN, infinite"
                          f"{'' if signed_ok else ' or negative'}; the checkpoint is corrupt (a block scale is the largest "
                          "|value| of its block)")


def load_param_state(opt, p, saved: dict, label: str, block_size: int, bits: int, version: int, device=None,
                     amsgrad: bool = False, casts: list | None = None) -> dict:
    """``device``: where the state lives (host memory for an offloaded group; default the parameter's).
    ``amsgrad``: the loaded group's; ``casts`` collects the moments cast to the state's dtype (see module doc)."""
    out = {}
    saved = dict(saved)
    saved_order = saved.pop(ORDER_KEY, None)
    target = torch.device(device or p.device)
    for key, value in saved.items():
        if key == "step":
            out[key] = _check_step(value, label)
        elif not isinstance(value, torch.Tensor):
            out[key] = value
        elif value.device.type == "meta" and target.type != "meta":
            raise _bad(label, f"saved {key} is a meta tensor (a shape without values); save the state dict from an "
                              "optimizer whose state holds real tensors")
        else:
            out[key] = value.detach().to(device=target, copy=True)  # dtype kept as saved (checked below)
    if "step" not in out and any(isinstance(v, torch.Tensor) for v in out.values()):
        raise _bad(label, "the state has moments but no 'step'")
    numel = layout.real_view(sharding.local(p)).numel() if not sharding.is_dtensor(p) else layout.real_view(p).numel()
    for name in fmt.QUANTIZED_MOMENTS:
        codes, absmax = out.get(name + "_codes"), out.get(name + "_absmax")
        if codes is None and absmax is None:
            continue
        if codes is None or absmax is None or codes.dtype != torch.uint8 or absmax.dtype != torch.float32:
            raise _bad(label, f"{name} must be uint8 codes with float32 absmax")
        if codes.numel() != fmt.codes_numel(numel, bits) or absmax.numel() != fmt.num_blocks(numel, block_size):
            raise _bad(label,
                       f"saved {name} has {codes.numel()} code bytes / {absmax.numel()} blocks but the parameter has "
                       f"{numel} elements ({fmt.codes_numel(numel, bits)} bytes of {bits}-bit codes, "
                       f"{fmt.num_blocks(numel, block_size)} blocks of {block_size})")
        _check_scales(absmax, label, name, bits, version)
        if version == 2 and bits == 4 and name == "exp_avg":
            if sharding.is_dtensor(codes) or sharding.is_dtensor(p):
                raise _bad(label, "4-bit state saved by format version 2 (an older m map) can be converted only unsharded: "
                                  "load it into an optimizer off the mesh, then save it again")
            codes, absmax = fmt.m4_codes_from_v2(codes, absmax, numel, block_size)
        if sharding.is_dtensor(p):
            if not sharding.can_quantize(p, block_size):
                raise _bad(label, f"saved 8-bit {name}, but this sharded parameter's rows ({sharding.row_length(p)} "
                                  f"elements) are not whole blocks of {block_size}; load it with force_fp32_state off the mesh")
            out[name + "_codes"] = sharding.to_param_layout(p, codes, sharding.codes_shape(p, bits))
            out[name + "_absmax"] = sharding.to_param_layout(p, absmax, sharding.absmax_shape(p, block_size))
        else:  # flat v1 layout; a sharded save's (rows, ...) layout is the same bytes in row-major order
            out[name + "_codes"] = sharding.to_param_layout(p, codes, None).reshape(-1)
            out[name + "_absmax"] = sharding.to_param_layout(p, absmax, None).reshape(-1)
    _reorder_codes(p, out, saved_order, label, block_size, bits)
    for name in (*fmt.QUANTIZED_MOMENTS, "ema"):  # full-precision tensors shaped like the parameter
        if name in out:
            value = out[name]
            if value.shape != p.shape:
                raise _bad(label, f"saved {name} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")
            value = _full_precision(p, value, label, name, casts)
            value = sharding.to_param_layout(p, value, p.shape)
            if not sharding.is_dtensor(p) and layout.is_dense(p) and not layout.same_layout(p, value):
                value = torch.empty_like(p, dtype=value.dtype).copy_(value)  # the step walks both in p's storage order
            out[name] = value
    _check_complete(out, label, bits, amsgrad)
    return out


def _full_precision(p, value: torch.Tensor, label: str, name: str, casts: list | None) -> torch.Tensor:
    """A saved full-precision moment (or EMA) of the state's dtype and finite (see module doc)."""
    want = placement.full_state_dtype(p)
    if not (value.is_floating_point() or value.is_complex()):
        raise _bad(label, f"saved {name} has dtype {value.dtype}; moments are floating point ({want} for this parameter)")
    if value.dtype != want:
        if value.is_complex() != want.is_complex:
            raise _bad(label, f"saved {name} has dtype {value.dtype} but this {p.dtype} parameter keeps {want} moments; "
                              "a checkpoint of a real parameter does not load into a complex one, nor the reverse")
        if casts is not None:
            casts.append(f"{label}: {name} {str(value.dtype).removeprefix('torch.')} -> {str(want).removeprefix('torch.')}")
        value = value.to(want)
    local = sharding.local(value)
    if local.device.type == "meta" or local.numel() == 0:
        return value
    bad = ~torch.isfinite(local)
    what = "NaN or infinite"
    if name in fmt.QUANTIZED_MOMENTS and not fmt.is_signed(name):  # second moments: squares, never negative
        bad |= (torch.view_as_real(local) < 0).any(-1) if local.is_complex() else local < 0
        what = "NaN, infinite or negative (a second moment is a mean of squares)"
    if bool(bad.any()):
        raise _bad(label, f"saved {name} has {int(bad.sum())} value(s) that are {what}; the checkpoint is corrupt. Load an "
                          f"earlier one, or {_RESTART}")
    return value


def _check_complete(out: dict, label: str, bits: int, amsgrad: bool) -> None:
    """A state with a step holds every moment of one form (see module doc)."""
    if "step" not in out:
        return
    quantized = [n for n in fmt.QUANTIZED_MOMENTS if n + "_codes" in out]
    fix = f"the checkpoint is incomplete or was edited. Load a complete one, or {_RESTART}"
    if not quantized and not any(n in out for n in fmt.QUANTIZED_MOMENTS):
        raise _bad(label, f"the state has a step but no moments (neither {bits}-bit 'exp_avg_codes'... nor full-precision "
                          f"'exp_avg'...); {fix}")
    if quantized:
        mixed = [n for n in fmt.QUANTIZED_MOMENTS if n in out]
        if mixed:
            raise _bad(label, f"the state holds {bits}-bit {', '.join(quantized)} and full-precision {', '.join(mixed)}; "
                              f"a parameter's moments are all of one form: {fix}")
    for name in state_names(amsgrad):
        key = name + "_codes" if quantized else name
        if key not in out:
            form = f"{bits}-bit codes and scales" if quantized else "full-precision moment"
            why = " (its param group has amsgrad=True; a run saved without amsgrad loads with amsgrad=False)" \
                if name == "max_exp_avg_sq" else ""
            raise _bad(label, f"the state has a step but no {key!r} ({name}'s {form}){why}; {fix}")


def _reorder_codes(p, out: dict, saved_order, label: str, block_size: int, bits: int) -> None:
    """Re-encode 8-bit state saved for another storage order of the parameter (see module doc)."""
    if sharding.is_dtensor(p) or not any(n + "_codes" in out for n in fmt.QUANTIZED_MOMENTS):
        return
    old = None if saved_order is None else [int(d) for d in saved_order.tolist()]
    if old == list(range(len(old or []))):
        old = None
    new = layout.element_order(p)
    if old == new:
        return
    warnings.warn(f"AdamW8bit: {label}'s state was saved for another memory layout of the parameter; its 8-bit moments "
                  "are re-encoded for this one (one extra rounding)", UserWarning, stacklevel=5)
    shape = layout.real_view(p).shape
    for name in fmt.QUANTIZED_MOMENTS:
        if name + "_codes" not in out:
            continue
        flat = fmt.dequantize_blockwise(out[name + "_codes"], out[name + "_absmax"], fmt.is_signed(name), block_size, bits,
                                        numel=int(torch.Size(shape).numel()))
        logical = layout.from_order(flat, shape, old)
        codes, absmax = fmt.quantize_blockwise(layout.to_order(logical, new).contiguous(), fmt.is_signed(name), block_size, bits)
        out[name + "_codes"], out[name + "_absmax"] = codes, absmax


def _load_label(group: dict, gi: int, j: int, p, pid) -> str:
    """Where a loaded state goes, as a user finds it in both the optimizer and the state dict."""
    names = group.get("param_names")
    name = f"'{names[j]}', " if names else ""
    return f"param group {gi}, parameter {j} ({name}shape {tuple(p.shape)}; state dict key {pid!r})"


def saved_meta(state_dict: dict) -> dict | None:
    """The run and format entries of an AdamW8bit state dict, or None for a state dict of another optimizer
    (``lowbit_adamw.migrate`` converts those). A dict that ``torch.distributed.checkpoint`` kept to
    ``state`` and ``param_groups`` has them in its groups."""
    meta = state_dict.get(META_KEY)
    groups = state_dict.get("param_groups", [])
    if meta is None and groups and all(VERSION_KEY in g for g in groups):
        meta = {"format_version": groups[0][VERSION_KEY]}
        if RUN_KEY in groups[0]:
            meta.update(groups[0][RUN_KEY])
    return meta


def load_state_dict(opt, state_dict: dict) -> None:
    """Load an AdamW8bit state dict into ``opt``: checked first, replaced whole (see module doc)."""
    meta = saved_meta(state_dict)
    if meta is None:
        raise ValueError("not an AdamW8bit state dict (no 'lowbit_adamw' entry): AdamW8bit.load_state_dict converts "
                         "torch's, bitsandbytes' and torchao's")
    version = meta.get("format_version")
    if version not in fmt.READABLE_VERSIONS:
        raise ValueError(
            f"state dict has format version {version!r}; this lowbit_adamw reads versions "
            f"{fmt.READABLE_VERSIONS}. Convert it with the lowbit_adamw version that wrote it (to_torch_adamw_state_dict)"
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer has {len(opt.param_groups)}")
    id_map = {}
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"param group {i}: state dict has {len(saved['params'])} parameters, this optimizer has "
                             f"{len(group['params'])}")
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
        amsgrad = saved.get("amsgrad", opt.defaults["amsgrad"])
        for j, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            id_map[pid] = (p, _load_label(group, i, j, p, pid), group["block_size"], group["bits"], placement.state_device(p, group), amsgrad)

    new_state = defaultdict(dict)
    layouts = {}
    casts: list[str] = []
    for pid, saved_state in state_dict["state"].items():
        if pid not in id_map:
            raise ValueError(f"state dict has state for parameter id {pid}, which no param group lists")
        p, label, block_size, bits, device, amsgrad = id_map[pid]
        new_state[p] = load_param_state(opt, p, saved_state, label, block_size, bits, version,
                                        None if sharding.is_dtensor(p) else device, amsgrad=bool(amsgrad), casts=casts)
        if any(k.endswith("_codes") for k in new_state[p]):
            layouts[p] = (bits, block_size)

    new_groups = []
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        ng = {k: v for k, v in saved.items() if k not in (VERSION_KEY, RUN_KEY, LR_KEY)}
        if saved.get(LR_KEY) == "callable" and callable(group["lr"]):
            ng["lr"] = group["lr"]
        ng["params"] = group["params"]
        if "param_names" in group:
            ng["param_names"] = group["param_names"]
        for k, v in opt.defaults.items():
            ng.setdefault(k, v)
        try:
            opt._validate_group(ng)
        except (ValueError, TypeError) as e:
            raise ValueError(f"state dict: param group {i}: {e}") from None
        new_groups.append(ng)
    counters = {k: meta[k] for k in ("updates", "calls", "seed") if k in meta}
    for k, v in counters.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"state dict: lowbit_adamw.{k} must be a non-negative int, got {v!r}")

    if casts:
        warnings.warn(f"AdamW8bit.load_state_dict cast {len(casts)} saved full-precision tensor(s) to the state's dtype "
                      f"({'; '.join(casts[:3])}{'; ...' if len(casts) > 3 else ''}): float64 rounds to float32 as "
                      "torch.optim.AdamW's loader does, 16-bit widens exactly", UserWarning, stacklevel=5)
    opt.state = new_state
    opt.param_groups = new_groups
    opt._layouts = layouts
    opt._updates = counters.get("updates", opt._updates)
    opt._calls = counters.get("calls", opt._calls)
    opt.seed = counters.get("seed", opt.seed)
