"""What optimizer state costs: bytes held, by kind."""
from __future__ import annotations

import torch


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor in the optimizer state, by kind: ``codes`` (8-bit), ``scales`` (block
    absmax), ``fp32`` (full-precision moments), ``other`` (step counters, ...), and ``total``."""
    out = {"codes": 0, "scales": 0, "fp32": 0, "other": 0}
    for state in optimizer.state.values():
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            nbytes = t.numel() * t.element_size()
            if key.endswith("_codes") or t.dtype == torch.uint8:
                out["codes"] += nbytes
            elif key.endswith("_absmax") or key in ("state1_absmax", "qmap1"):
                out["scales"] += nbytes
            elif key == "step" or t.numel() == 1:
                out["other"] += nbytes
            else:
                out["fp32"] += nbytes
    out["total"] = sum(out.values())
    return out
