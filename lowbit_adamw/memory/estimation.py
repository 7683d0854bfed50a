"""The estimate: weights, gradients and optimizer state from parameter shapes alone."""
from __future__ import annotations

import datetime
import platform
from typing import Iterable

import torch
from torch import nn

from .catalog import DEFAULT_OPTIMIZERS, OPTIMIZERS
from .models import load_model
from .report import MemoryReport, MemoryRow
from .state import _tensor_bytes, estimate_state_bytes, param_specs


def _meta(device) -> dict:
    return dict(device=str(device), torch=torch.__version__, machine=platform.machine(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                date=datetime.date.today().isoformat())


def _model_name(spec) -> str:
    return spec if isinstance(spec, str) else type(spec).__name__


def estimate(model: str | nn.Module, optimizers: Iterable[str] = DEFAULT_OPTIMIZERS, dtype: torch.dtype | None = None) -> MemoryReport:
    """Weights, gradients and optimizer state for ``model`` (a name or config.json path, built on the
    meta device, or a module, which is only read). ``dtype`` prices the weights in that dtype (e.g. bf16)."""
    module = load_model(model)
    everything = {id(p): p for p in module.parameters()}
    specs = param_specs(module, dtype)
    wsize = torch.empty(0, dtype=dtype).element_size() if dtype else None
    weights = sum(p.numel() * (wsize or p.element_size()) for p in everything.values())
    grads = sum(_tensor_bytes(s.meta) for s in specs)
    rows = []
    for name in optimizers:
        st = estimate_state_bytes(name, specs)
        rows.append(MemoryRow(name, OPTIMIZERS[name], weights=weights, grads=grads, state_codes=st["codes"],
                              state_scales=st["scales"], state_full=st["full"], state_other=st["other"], state_ema=st["ema"]))
    some = next(iter(everything.values()))
    return MemoryReport(_model_name(model), sum(p.numel() for p in everything.values()), sum(s.meta.numel() for s in specs),
                        "estimate", rows, meta=dict(dtype=str(dtype or some.dtype)))
