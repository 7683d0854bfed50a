"""The optimizer's side of ``offload="cpu"``: its buckets into ``lowbit_adamw.offload.pipeline``'s pipelines.

``OffloadSteps`` belongs to one ``AdamW8bit``. For an offloaded bucket it splits the gradients into
pieces of at most ``step_in_backward_bucket_mb``, stages each piece down and queues its CPU step (the
optimizer's own ``_run_bucket`` on the host copies), and at the end of the update joins them and hands
their non-finite counts to the reporter. With ``step_in_backward`` and ``max_grad_norm`` the global
norm is known only at the end of backward: each gradient's norm is taken on the device before it is
freed, the pieces wait on the host, and their steps are queued once the multipliers are known, stacked
in the order the on-device step stacks them so that the norm sums alike.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch

from ..step import clipping
from . import pipeline as offloading

STREAMING_STAGING_BUFFERS = 2  # one piece stepping on the host while the next one goes down


class OffloadSteps:
    def __init__(self, opt):
        self.opt = weakref.proxy(opt)  # the optimizer owns this; no cycle keeps it alive
        self.pipelines: dict = {}  # device -> OffloadPipeline, made at first use
        self.norms: dict = {}  # (group, position) -> (device norm, host multiplier, clip_norm), deferred clipping

    def defers_clipping(self) -> bool:
        """In backward with max_grad_norm (offload only): the global norm is known at the end of backward."""
        return self.opt.step_in_backward and self.opt.max_grad_norm is not None

    def pipeline(self, device: torch.device):
        key = str(device)
        if key not in self.pipelines:
            weights = offloading.arena_bytes([q for g in self.opt.param_groups if g.get("offload") == "cpu"
                                              for q in g["params"] if q.device == device])
            pipe = offloading.OffloadPipeline(device, staging_limit=None if self.defers_clipping() else STREAMING_STAGING_BUFFERS,
                                              weight_bytes=weights)
            weakref.finalize(self, pipe.close)
            self.pipelines[key] = pipe
        return self.pipelines[key]

    def defer_norms(self, entries, base_mul: float) -> None:
        """Each gradient's norm now, on the device, before it is freed; the multipliers at the end."""
        flat, params, quantized, blocks, host, clip_norms = self.opt._clip_inputs(entries, base_mul)
        for e, f, p, q, b, h, c in zip(entries, flat, params, quantized, blocks, host, clip_norms):
            norm = clipping.applied_norms([f], [p], [q], [b], self.opt.nonfinite == "skip")[0]
            self.norms[(e[0], e[6])] = (norm, h, c)

    def _multipliers(self) -> dict:
        """(group, position) -> host multiplier, from every norm of this backward."""
        keys = sorted(self.norms)
        if not keys:
            return {}
        norms = [self.norms[k] for k in keys]
        dev = norms[0][0].device
        values = clipping.multipliers(torch.stack([n.to(dev) for n, _, _ in norms]),
                                      torch.tensor([h for _, h, _ in norms], dtype=torch.float32).to(dev), self.opt.max_grad_norm,
                                      [None if math.isinf(c) else c for _, _, c in norms]).cpu()
        self.norms = {}
        return {k: values[i:i + 1] for i, k in enumerate(keys)}

    @torch._disable_dynamo  # a worker thread and host buffers: run eagerly inside a compiled step
    def bucket(self, gi, kind, ps, sel, entries, multiplier, sc, base_mul: float) -> None:
        """Stage the bucket's gradients down in pieces and queue each piece's CPU step (or keep it for
        the end of backward, when deferring)."""
        opt = self.opt
        host = torch.device("cpu")
        if (opt.backend, "cpu") not in opt._resolved_backends:
            opt._resolved_backends[(opt.backend, "cpu")] = opt._resolve_backend(host)
        opt._cache_id(gi, host, ps[0].dtype)
        pipe = self.pipeline(ps[0].device)
        deferring = self.defers_clipping()
        pieces, piece, size = [], [], 0
        for j, i in enumerate(sel):
            g = entries[i][2]
            nbytes = g.numel() * g.element_size()
            if piece and size + nbytes > opt._bucket_bytes:
                pieces.append(piece)
                piece, size = [], 0
            piece.append(j)
            size += nbytes
        pieces.append(piece)
        for piece in pieces:
            pps, psel = [ps[j] for j in piece], [sel[j] for j in piece]
            staged = pipe.stage(pps, [entries[i][2] for i in psel], None if multiplier is None else multiplier[psel])
            step = functools.partial(opt._run_bucket, gi, kind, pps, sel=psel, entries=entries, sc=sc, device=host,
                                     base_mul=base_mul)
            if deferring:
                pipe.defer(staged, (step, [(entries[i][0], entries[i][6]) for i in psel]))
            else:
                pipe.submit(staged, lambda hp, hg, hm, step=step: step(local_ps=hp, local_grads=hg, multiplier=hm))

    @torch._disable_dynamo
    def drain(self) -> None:
        """Join the CPU steps in flight (deferred ones first get their clipping multipliers) and report."""
        for pipe in self.pipelines.values():
            if pipe.deferred:
                muls = self._multipliers()

                def bind(item, muls=muls):
                    step, keys = item
                    mul = torch.cat([muls[k] for k in keys])
                    return lambda hp, hg, _hm: step(local_ps=hp, local_grads=hg, multiplier=mul)

                pipe.release_deferred(bind)
            for report in pipe.drain():
                if report is not None:
                    self.opt._reporter.add(*report[:3], key=report[3], positions=report[4])

    def host_bytes(self) -> int:
        return sum(p.host_bytes() for p in self.pipelines.values())
