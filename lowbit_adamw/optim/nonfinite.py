"""Telling the user about the blocks the non-finite rule left untouched, without waiting for the GPU.

The step returns, per bucket, the number of blocks (or whole fp32-state tensors) it skipped. On the
CPU they are read at once; on a GPU they travel to pinned host memory with a non-blocking copy and
are read at the next eager call (``step()``, ``zero_grad()``, ``state_dict()`` or
``nonfinite_skipped``) once the copy has landed. Under ``torch.compile`` the counts are only queued;
the eager calls read them: a compiled step adds its counts into one running tensor per param group and
device, made before tracing (a list that grew each step would change the graph's guards every step).
Meta tensors carry no values and are not reported.
"""
from __future__ import annotations

import warnings

import torch

MAX_PENDING = 4096  # GPU counts not yet read: bounded even if every copy is still in flight


class NonfiniteReporter:
    def __init__(self):
        self.pending: list[tuple] = []  # (counts, labels, block size or None, event or None)
        # (group, device) -> [counts summed by compiled steps, labels, block size or None] per parameter of the group
        self.compiled: dict[tuple, list] = {}
        self.totals: dict[str, int] = {}

    def __getstate__(self):
        self.report(wait=True)
        return {"pending": [], "compiled": {}, "totals": dict(self.totals)}

    def prepare(self, key: tuple, device: torch.device, labels) -> None:
        """Make the running counts of a param group on a device (eagerly, before a compiled step uses them).
        ``labels()`` gives the group's parameter labels; it is called only the first time, as the step calls
        this for every parameter."""
        if key not in self.compiled and device.type != "meta":
            names = list(labels())
            self.compiled[key] = [torch.zeros(len(names), dtype=torch.int32, device=device), names, [None] * len(names)]

    def add(self, counts: torch.Tensor, labels: tuple[str, ...], block: int | None, key: tuple | None = None,
            positions: list[int] | None = None) -> None:
        """Counts of one bucket. ``key``/``positions``: its param group (see ``prepare``) and the
        parameters' positions in it, used by a compiled step."""
        if counts.device.type == "meta":
            return
        if torch.compiler.is_compiling():
            entry = self.compiled[key]
            entry[0].index_add_(0, torch.tensor(positions, device=counts.device), counts)
            for pos in positions:
                entry[2][pos] = block
            return
        if counts.device.type == "cpu":
            self.pending.append((counts, labels, block, None))
        else:
            from ..step.kernel_launch import device_guard

            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            with device_guard(counts.device):  # the copy and the event on the stream of the counts' own GPU
                host.copy_(counts, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self.pending.append((host, labels, block, event))
        if len(self.pending) > MAX_PENDING:
            self.report(wait=True)

    def report(self, wait: bool, stacklevel: int = 4) -> None:
        """Warn about what the last steps skipped. Counts are read once their copy to the host has
        finished (``wait=False``: never blocks) or after waiting for it (``wait=True``)."""
        for acc, labels, blocks in self.compiled.values():
            if bool(acc.any()):
                counts = acc.to("cpu", copy=True)
                acc.zero_()
                for block in set(blocks):
                    sel = [i for i, b in enumerate(blocks) if b == block]
                    self.pending.append((counts[sel], [labels[i] for i in sel], block, None))
        still = []
        for counts, labels, block, event in self.pending:
            if event is not None and not wait and not event.query():
                still.append((counts, labels, block, event))
                continue
            if event is not None:
                event.synchronize()
            bad = [(label, n) for label, n in zip(labels, counts.tolist()) if n]
            for label, n in bad:
                self.totals[label] = self.totals.get(label, 0) + n
            if bad:
                what = ", ".join(label if block is None else f"{label} ({n} block{'s' if n > 1 else ''} of {block})"
                                 for label, n in bad)
                warnings.warn(f"AdamW8bit: left unchanged where the gradient has NaN or Inf: {what}", RuntimeWarning,
                              stacklevel=stacklevel)
        self.pending = still
