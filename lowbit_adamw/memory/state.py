"""What optimizer state costs: bytes held by a live optimizer, and bytes an optimizer would hold for
given parameter shapes (lowbit's own rows from AdamW8bit's decisions on meta tensors)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..format.sharding import is_dtensor
from .catalog import OPTIMIZERS, STATE_KINDS


def _named_leaves(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, plain tensor) pairs behind ``t``: tensor subclasses such as torchao's OptimState8bit
    are unpacked, each part named ``name.part``."""
    if type(t) is torch.Tensor or type(t) is nn.Parameter or not hasattr(t, "__tensor_flatten__"):
        return [(name, t)]
    parts = t.__tensor_flatten__()[0]
    return [leaf for n in parts if isinstance(getattr(t, n), torch.Tensor) for leaf in _named_leaves(f"{name}.{n}", getattr(t, n))]


def _kind(key: str, leaf: torch.Tensor) -> str:
    if key == "ema":
        return "ema"
    if leaf.dtype in (torch.uint8, torch.int8):
        return "codes"
    if key == "step" or "qmap" in key:
        return "other"  # step counters and code tables
    if "absmax" in key or key.endswith("scale"):
        return "scales"
    return "full"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_params(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """The tensors an optimizer updates, by id: those in its param groups, and those it holds state for.
    DeepSpeed's ZeRO-3 puts a rank's flat partition into a group's ``params`` only for the length of its
    ``step`` and empties the list after, so between steps its partitions are found through the state alone."""
    params = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    params.update({id(p): p for p in optimizer.state if isinstance(p, torch.Tensor) and id(p) not in params})
    return params


def _offloaded(optimizer: torch.optim.Optimizer) -> set[int]:
    """ids of the parameters whose state the optimizer keeps in host memory, away from their device:
    AdamW8bit's ``offload="cpu"`` groups (lowbit_adamw.optim.placement.state_device), on a CPU-only machine
    too, where the CPU stands in for the device."""
    return {id(p) for group in optimizer.param_groups if group.get("offload") == "cpu" for p in group["params"]}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, where: str = "all") -> dict[str, int]:
    """Bytes of every tensor an optimizer holds in its state, by kind: ``codes`` (8-bit), ``scales``
    (block scales), ``full`` (unquantized moments: fp32, or the parameter dtype for torch AdamW on
    16-bit weights), ``other`` (step counters, code tables) and ``total``. A tensor shared by several
    parameters (bitsandbytes' code tables) counts once; a DTensor counts its local shard (this rank).
    ``where``: ``"all"``, ``"device"`` (beside the parameters) or ``"host"`` (offloaded to host memory)."""
    if where not in ("all", "device", "host"):
        raise ValueError(f"where must be 'all', 'device' or 'host', got {where!r}")
    host = _offloaded(optimizer) if where != "all" else set()
    out = dict.fromkeys(STATE_KINDS, 0)
    seen = set()
    for param, state in optimizer.state.items():
        if where != "all" and (id(param) in host) != (where == "host"):
            continue
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if is_dtensor(value):  # what this rank holds
                value = value.to_local()
            for name, t in _named_leaves(key, value):
                if t.device.type != "meta":
                    ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
                    if ident in seen:
                        continue
                    seen.add(ident)
                out[_kind(name, t)] += _tensor_bytes(t)
    out["total"] = sum(out[k] for k in STATE_KINDS)
    return out


def full_state_causes(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """For an ``AdamW8bit``: why the tensors with full-precision moments have them, as
    ``{cause: {"tensors": n, "bytes": state bytes on this rank}}`` with the causes of
    ``lowbit_adamw.optim.placement.full_state_cause`` (``"shard_rows"``: FSDP2 shards whose rows are not whole
    blocks), and ``"loaded"`` for state that came that way from a checkpoint. Empty for other optimizers."""
    if not hasattr(optimizer, "_fp32_forced"):
        return {}
    from ..optim import placement

    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    # A tensor in no group (ZeRO-3 between steps, see optimizer_params) is judged by the groups' placement options
    # when they all agree; its group cannot be told otherwise.
    options = {tuple(g.get(k) for k in ("fp32_state", "min_8bit_size", "block_size")) for g in optimizer.param_groups}
    shared = optimizer.param_groups[0] if len(options) == 1 else None
    out: dict[str, dict[str, int]] = {}
    for p, state in optimizer.state.items():
        group = group_of.get(id(p), shared)
        if "exp_avg" not in state or group is None:
            continue
        cause = placement.full_state_cause(optimizer, p, group) or "loaded"
        row = out.setdefault(cause, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                v = state[key]
                row["bytes"] += _tensor_bytes(v.to_local() if is_dtensor(v) else v)
    order = placement.FULL_STATE_CAUSES + ("loaded",)
    return {cause: out[cause] for cause in order if cause in out}


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


@dataclass
class ParamSpec:
    """What the estimate needs of one trainable parameter: a meta tensor (shape, dtype) and its role."""

    name: str
    meta: torch.Tensor
    embedding: bool


def param_specs(model: nn.Module, dtype: torch.dtype | None = None) -> list[ParamSpec]:
    """Meta-tensor stand-ins for ``model``'s trainable parameters; the model itself is not touched."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [ParamSpec(n, torch.empty(p.shape, dtype=dtype or p.dtype, device="meta"), id(p) in emb) for n, p in _trainable(model)]


def estimate_state_bytes(name: str, specs: list[ParamSpec]) -> dict[str, int]:
    """Optimizer state the optimizer ``name`` (a key of ``OPTIMIZERS``) would hold for these parameters."""
    out = dict.fromkeys(STATE_KINDS, 0)
    if name.startswith("lowbit"):
        from ..optim import placement
        from ..optimizer import AdamW8bit

        kw = dict(amsgrad=name.endswith("amsgrad"), bits=4 if name.startswith("lowbit_4bit") else 8)
        if name.endswith("emb32"):
            kw["fp32_state"] = [s.meta for s in specs if s.embedding]
        opt = AdamW8bit([s.meta for s in specs], **kw)
        group = opt.param_groups[0]
        for p, s in zip(group["params"], specs):
            placement.init_state(opt, p, group)  # the optimizer's own decisions, on meta tensors
        out = optimizer_state_bytes(opt)
        out.pop("total")
    elif name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    else:
        for s in specs:
            n, size = s.meta.numel(), s.meta.element_size()
            if name in ("adamw", "adamw_fused"):  # exp_avg and exp_avg_sq like the parameter, one fp32 step tensor
                out["full"] += 2 * n * size
                out["other"] += 4
            elif name == "bnb_8bit":  # 8-bit from 4096 elements, blocks of 256; fp32 below; step is an int
                if n < 4096:
                    out["full"] += 2 * n * 4
                else:
                    out["codes"] += 2 * n
                    out["scales"] += 2 * 4 * math.ceil(n / 256)
            elif name == "torchao_8bit":  # 8-bit only if >= 4096 and divisible by 256; a 256-entry table per moment
                if n >= 4096 and n % 256 == 0:
                    out["codes"] += 2 * n
                    out["scales"] += 2 * 4 * (n // 256)
                    out["other"] += 2 * 256 * 4
                else:
                    out["full"] += 2 * n * size
                out["other"] += 4
            elif name == "torchao_4bit":  # 4-bit (packed) only if >= 4096 and divisible by 128; a 16-entry table per moment
                if n >= 4096 and n % 128 == 0:
                    out["codes"] += n
                    out["scales"] += 2 * 4 * (n // 128)
                    out["other"] += 2 * 16 * 4
                else:
                    out["full"] += 2 * n * size
                out["other"] += 4
        if name == "bnb_8bit" and any(s.meta.numel() >= 4096 for s in specs):
            out["other"] += 2 * 256 * 4  # two code tables shared by every 8-bit tensor
    out["total"] = sum(out[k] for k in STATE_KINDS)
    return out
