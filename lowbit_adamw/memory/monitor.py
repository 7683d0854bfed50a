"""MemoryMonitor: per-step optimizer state and peak memory in any training loop (a step hook)."""
from __future__ import annotations

import torch

from torch import nn
from .estimation import _meta
from .report import MemoryReport, MemoryRow
from .state import _tensor_bytes, full_state_causes, optimizer_params, optimizer_state_bytes


class MemoryMonitor:
    """Per-step memory of a training loop. ``MemoryMonitor(optimizer)`` hooks ``optimizer.step``;
    each step records the optimizer state bytes and the peak memory since the previous step (CUDA:
    ``max_memory_allocated``, reset after each step; CPU: weights + grads + state held, since the
    CPU allocator keeps no peak). State an optimizer keeps in host memory (``offload="cpu"``), with
    the pinned buffers of its pipeline, is recorded as ``host_bytes`` and reported in the ``offloaded``
    column, not as device state. ``report()`` returns a ``MemoryReport``; ``write(prefix)`` saves
    ``prefix.json`` and ``prefix.png``."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None, model: nn.Module | None = None, name: str = "run"):
        self.model, self.name, self.history = model, name, []
        self.optimizer = None
        self._hook = None
        if optimizer is not None:
            self.attach(optimizer)

    def attach(self, optimizer):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
        if self._hook is not None:
            self._hook.remove()
        self._hook = self.optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step())
        self._last_update = getattr(self.optimizer, "_updates", None)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _after_step(self):
        updates = getattr(self.optimizer, "_updates", None)
        if updates is not None and updates == self._last_update:
            return  # an accumulation micro-step (or a skipped step): nothing was updated
        self._last_update = updates
        self.record()

    def _held(self, state_bytes: int) -> int:
        params = optimizer_params(self.optimizer)
        held = sum(_tensor_bytes(p) for p in params.values())
        held += sum(_tensor_bytes(p.grad) for p in params.values() if p.grad is not None)
        return held + state_bytes

    def _host_bytes(self, host_state: int) -> int:
        """Offloaded state plus the offload pipeline's pinned weight copies and staging buffers."""
        pinned = getattr(self.optimizer, "offload_host_bytes", None)
        return host_state + (pinned() if pinned else 0)

    def record(self) -> dict:
        # one walk over the state, in its two parts
        on_device, on_host = (optimizer_state_bytes(self.optimizer, where)["total"] for where in ("device", "host"))
        rec = dict(step=len(self.history) + 1, state_bytes=on_device + on_host, host_bytes=self._host_bytes(on_host))
        devs = {p.device.type for p in optimizer_params(self.optimizer).values()}
        if "cuda" in devs:
            rec["peak_bytes"] = torch.cuda.max_memory_allocated()
            rec["allocated_bytes"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            rec["peak_bytes"] = self._held(rec["state_bytes"])
        self.history.append(rec)
        return rec

    def report(self) -> MemoryReport:
        opt = self.optimizer
        trainable = list(optimizer_params(opt).values())
        params = {id(p): p for p in trainable}
        if self.model is not None:
            params.update({id(p): p for p in self.model.parameters()})
        s = optimizer_state_bytes(opt, "device")
        row = MemoryRow(self.name, type(opt).__name__, weights=sum(_tensor_bytes(p) for p in params.values()),
                        grads=sum(_tensor_bytes(p) for p in trainable if p.requires_grad), state_codes=s["codes"],
                        state_scales=s["scales"], state_full=s["full"], state_other=s["other"], state_ema=s["ema"],
                        offloaded=self._host_bytes(optimizer_state_bytes(opt, "host")["total"]), history=list(self.history))
        if self.history and "allocated_bytes" in self.history[-1]:
            row.phase_peaks = {"max_step_peak": max(h["peak_bytes"] for h in self.history)}
        dev = next(iter(params.values())).device.type if params else "cpu"
        meta = _meta(dev)
        steps = getattr(opt, "accumulation_steps", 1)
        causes = full_state_causes(opt)
        if causes:
            meta["full_state_causes"] = causes
        if steps > 1:  # AdamW8bit accumulates in .grad (autograd's own sum): no buffer of its own
            meta["gradient_accumulation"] = dict(steps=steps, extra_bytes=0, where="in .grad (counted under grads)")
        return MemoryReport(self.name, sum(p.numel() for p in params.values()), sum(p.numel() for p in trainable), "measured",
                            [row], meta=meta)

    def write(self, prefix: str) -> tuple[str, str]:
        rep = self.report()
        rep.to_json(prefix + ".json")
        return prefix + ".json", rep.plot(prefix + ".png")

    def close(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
