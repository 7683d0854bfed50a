"""The update inside ``backward()``: parameters join a pending bucket as their gradient completes.

Each trainable parameter gets a post-accumulate-grad hook. A parameter whose gradient is complete
(every use summed, weight tying included) joins the pending bucket; the bucket is stepped (one fused
call) when it holds ``bucket_bytes`` of gradients and at the end of backward (an autograd engine
callback), and the gradients it used are freed at once, so only about one bucket plus the largest
gradient is ever alive. The optimizer supplies ``step_params(params)``; this module owns the hooks
and the pending bucket.
"""
from __future__ import annotations

import torch

from ..format import sharding


def check_single_device(p: torch.Tensor, label: str) -> None:
    import torch.distributed as dist

    if sharding.is_dtensor(p) or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise ValueError(f"step_in_backward=True runs on a single device only ({label} is sharded or this process "
                         "is one of several): under FSDP2 or DDP the gradients are reduced after backward. "
                         "Use step_in_backward=False")


class InBackward:
    def __init__(self, step_params, bucket_bytes: int, end_of_update):
        self.step_params = step_params  # called with the list of parameters whose gradients are complete
        self.end_of_update = end_of_update  # called once per backward, after its last bucket
        self.bucket_bytes = bucket_bytes
        self.ready: list[torch.Tensor] = []
        self.ready_bytes = 0
        self.end_queued = False
        self.handles: list = []

    def attach(self, p: torch.Tensor) -> None:
        if p.requires_grad:
            self.handles.append(p.register_post_accumulate_grad_hook(self.gradient_ready))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def gradient_ready(self, p: torch.Tensor) -> None:
        if not self.end_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.end_of_backward)
            self.end_queued = True
        self.ready.append(p)
        self.ready_bytes += p.grad.numel() * p.grad.element_size()
        if self.ready_bytes >= self.bucket_bytes:
            self.step_ready()

    @torch.no_grad()
    def step_ready(self) -> None:
        ready, self.ready, self.ready_bytes = self.ready, [], 0
        if ready:
            self.step_params(ready)
        for p in ready:
            p.grad = None  # freed now, not at zero_grad(): the memory this mode is for

    def end_of_backward(self) -> None:
        self.end_queued = False
        self.step_ready()
        self.end_of_update()
