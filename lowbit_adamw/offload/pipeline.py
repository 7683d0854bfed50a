"""Optimizer state in host memory (``offload="cpu"``): the C++ step runs on the host while the device
goes on with backward.

For an offloaded parameter the codes, scales, EMA and step count live in ordinary host memory (the
CPU step is their only reader), and the host keeps a copy of the weights in one pinned arena. One
step of a bucket of parameters:

1. device to host, on a side stream: the gradients into a reused pinned staging buffer (and the
   device clipping multipliers, when clipping is on); the device gradients may be freed at once.
2. a worker thread waits for that copy, runs the bucket's fused CPU step (``ops.step_``, the same op
   and bits as on the device) on the host weights, gradients and state,
3. and copies the updated host weights up into the parameters on another side stream.
At the end of the step (or of backward, with ``step_in_backward``) the worker is joined and the
compute stream waits for the last upload: the next use of the weights waits for their copy, not the
whole device for everything.

Why the host keeps the weights (2 B/param of pinned host RAM for bf16 weights) instead of the
weights travelling down with the gradients: per step that saves 2 B/param of device-to-host
transfer, 14 GB for a 7B model, about 0.55 s at the 25 GB/s of a PCIe 4.0 x16 link, against 14 GB
of host RAM that a 7B run on a 16 GiB card can spare (the 8-bit state is 14 GB more; 32 GiB holds
both). The host copy is refreshed from the parameter whenever the parameter changed outside the
optimizer (``model.load_state_dict``, ``copy_ema_to_params``, a user's in-place edit): torch counts
every in-place write in ``tensor._version``, and the version after our own upload is recorded.

Everything device-specific is behind ``Transport``: ``CudaTransport`` (side streams, events,
pinned memory) and ``StandInTransport``, with which CPU parameters go through the same buffers,
worker thread and completion events (the copies are plain ones), so the pipeline is tested on
machines without a GPU and held to the on-device step bit for bit.
"""
from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.utils.weak import WeakIdKeyDictionary

OFFLOAD_CHOICES = (None, "cpu")
ALIGN = 64  # bytes: each arena slice starts on a cache line (the C++ step's vector loads)
ARENA_CHUNK_BYTES = 256 << 20


def check_offload(value, where: str = "offload") -> None:
    if value not in OFFLOAD_CHOICES:
        raise ValueError(f"{where} must be None or 'cpu', got {value!r}")


class StandInTransport:
    """The CPU standing in for the device: copies happen at once, events are already complete."""

    device_type = "cpu"

    def host_bytes(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def to_host(self, dsts, srcs):
        for d, s in zip(dsts, srcs):
            d.copy_(s)
        return None

    def to_device(self, dsts, srcs, after=None):
        for d, s in zip(dsts, srcs):
            d.copy_(s)
        return None

    def host_wait(self, event) -> None:
        pass

    def device_wait(self, event) -> None:
        pass


class CudaTransport:
    """Side streams for each direction; pinned host memory registered in large chunks."""

    device_type = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self.down = torch.cuda.Stream(device)  # device -> host
        self.up = torch.cuda.Stream(device)  # host -> device

    def host_bytes(self, nbytes: int) -> torch.Tensor:
        # torch's pinned allocator rounds every block up to a power of two; registering an ordinary
        # allocation pins exactly what is asked (a 1.05 GB embedding would otherwise take 2 GiB).
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            cudart = torch.cuda.cudart()
            registered = nbytes > 0 and int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0
        except (AttributeError, RuntimeError, TypeError):
            registered = False
        if registered and buf.is_pinned():  # non_blocking copies from it are asynchronous
            # Unregistered when the buffer goes: the arena and the staging pool hold it as long as any view is used.
            weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
            return buf
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def to_host(self, dsts, srcs):
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.down):
            self.down.wait_stream(compute)  # the gradients (and weights) are final at this point of the compute stream
            for d, s in zip(dsts, srcs):
                d.copy_(s, non_blocking=True)
                s.record_stream(self.down)  # freeing the device tensor now must not reuse it before the copy
            event = torch.cuda.Event()
            event.record(self.down)
        return event

    def to_device(self, dsts, srcs, after=None):
        with torch.cuda.device(self.device), torch.cuda.stream(self.up):  # the worker thread's device is its own
            if after is not None:
                self.up.wait_event(after)
            for d, s in zip(dsts, srcs):
                d.copy_(s, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.up)
        return event

    def host_wait(self, event) -> None:
        if event is not None:
            event.synchronize()

    def device_wait(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


def transport_for(device: torch.device):
    if device.type == "cuda":
        return CudaTransport(device)
    if device.type == "cpu":
        return StandInTransport()
    raise ValueError(f"offload='cpu' supports CUDA parameters (and CPU ones, through the CPU stand-in), not {device.type}")


def arena_bytes(tensors) -> int:
    """What ``HostArena.tensor_like`` takes for these tensors."""
    return sum(-(-max(t.numel() * t.element_size(), 1) // ALIGN) * ALIGN for t in tensors)


def _slice_as(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A view of the uint8 ``buf`` with ``like``'s dtype, shape and strides (dense layouts keep their
    memory order; a tensor with gaps gets a contiguous one)."""
    n = like.numel()
    flat = buf[: n * like.element_size()].view(like.dtype)
    from ..format import layout

    if layout.is_dense(like):
        return flat.as_strided(like.shape, like.stride())
    return flat.view(like.shape)


class HostArena:
    """A bump allocator over large pinned chunks: one allocation per chunk, not per tensor.
    ``expected``: the bytes the caller will ask for in all, so a small model takes no 256 MiB chunk."""

    def __init__(self, transport, expected: int | None = None):
        self.transport = transport
        self.expected = expected
        self.chunks: list[torch.Tensor] = []
        self.used = 0  # bytes taken from the last chunk
        self.reserved = 0

    def tensor_like(self, like: torch.Tensor) -> torch.Tensor:
        nbytes = like.numel() * like.element_size()
        need = -(-max(nbytes, 1) // ALIGN) * ALIGN
        if not self.chunks or self.used + need > self.chunks[-1].numel():
            chunk = ARENA_CHUNK_BYTES if self.expected is None else min(ARENA_CHUNK_BYTES, self.expected - self.reserved)
            self.chunks.append(self.transport.host_bytes(max(need, chunk)))
            self.reserved += self.chunks[-1].numel()
            self.used = 0
        buf = self.chunks[-1][self.used:self.used + need]
        self.used += need
        return _slice_as(buf, like)


class _Staging:
    """Reused pinned buffers for gradients on their way down; ``limit`` of them at most in flight
    (None: as many as needed, when every bucket must wait for the end of backward)."""

    def __init__(self, transport, limit: int | None):
        self.transport = transport
        self.limit = limit
        self.free: list[torch.Tensor] = []
        self.count = 0
        self.lock = threading.Lock()
        self.reserved = 0

    def take(self, nbytes: int, wait_oldest) -> torch.Tensor:
        while True:
            with self.lock:
                fits = [b for b in self.free if b.numel() >= nbytes]
                if fits:
                    buf = min(fits, key=lambda b: b.numel())
                    self.free.remove(buf)
                    return buf
                if self.limit is None or self.count < self.limit:
                    self.count += 1
                    size = -(-nbytes // (1 << 20)) << 20
                    self.reserved += size
                    return self.transport.host_bytes(size)
                if self.free:  # all too small: give one back and make a larger one
                    small = self.free.pop()
                    self.count -= 1
                    self.reserved -= small.numel()
                    continue
            wait_oldest()

    def give_back(self, buf: torch.Tensor) -> None:
        with self.lock:
            self.free.append(buf)


class Mirror:
    """The host side of one offloaded parameter: its weights (in the arena) and the version of the
    device tensor they equal."""

    __slots__ = ("weights", "version", "ptr")

    def __init__(self, weights):
        self.weights = weights
        self.version = None
        self.ptr = None


class OffloadPipeline:
    """Buckets in flight for one device: staged down, stepped on a worker thread, copied up."""

    def __init__(self, device: torch.device, staging_limit: int | None = 2, weight_bytes: int | None = None):
        self.transport = transport_for(device)
        self.arena = HostArena(self.transport, weight_bytes)
        self.staging = _Staging(self.transport, staging_limit)
        self.mirrors = WeakIdKeyDictionary()  # parameter -> Mirror (tensors compare by identity here)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-adamw-offload")
        self.pending: list[Future] = []
        self.last_upload = None
        self.deferred: list = []  # buckets staged and waiting for the end of backward (global clipping)
        self.results: list = []  # what finished buckets returned, until drain hands it over

    def mirror(self, p: torch.Tensor) -> Mirror:
        m = self.mirrors.get(p)
        if m is None:
            m = self.mirrors[p] = Mirror(self.arena.tensor_like(p.detach()))
        return m

    def host_bytes(self) -> int:
        return self.arena.reserved + self.staging.reserved

    def stage(self, params: list[torch.Tensor], grads: list[torch.Tensor], multiplier):
        """Step one, on the calling thread: gradients (and stale weights) down. Returns the staged bucket."""
        mirrors = [self.mirror(p) for p in params]
        # 64-byte aligned slices of one buffer, one per gradient, laid out like the parameter.
        sizes = [-(-max(g.numel() * g.element_size(), 1) // ALIGN) * ALIGN for g in grads]
        extra = ALIGN * (-(-4 * len(params) // ALIGN)) if multiplier is not None else 0
        buf = self.staging.take(sum(sizes) + extra, self._wait_oldest)
        host_grads, dsts, srcs, offset = [], [], [], 0
        for p, g, size in zip(params, grads, sizes):
            hg = _slice_as(buf[offset:offset + size], p.detach())
            offset += size
            host_grads.append(hg)
            dsts.append(hg)
            srcs.append(g)
        host_mul = None
        if multiplier is not None:
            host_mul = buf[offset:offset + 4 * len(params)].view(torch.float32)
            dsts.append(host_mul)
            srcs.append(multiplier)
        for p, m in zip(params, mirrors):
            if m.version != p._version or m.ptr != p.data_ptr():  # changed outside the optimizer (or new)
                dsts.append(m.weights)
                srcs.append(p.detach())
        event = self.transport.to_host(dsts, srcs)
        return (params, mirrors, host_grads, host_mul, buf, event)

    def submit(self, staged, step) -> None:
        """Steps two and three on the worker: ``step(host_weights, host_grads, host_multiplier)`` returns
        what ``drain`` hands back for this bucket."""
        params, mirrors, host_grads, host_mul, buf, event = staged

        def run():
            try:
                self.transport.host_wait(event)
                with torch.no_grad():
                    result = step([m.weights for m in mirrors], host_grads, host_mul)
                    up = self.transport.to_device([p.detach() for p in params], [m.weights for m in mirrors], None)
                    for p, m in zip(params, mirrors):
                        m.version, m.ptr = p._version, p.data_ptr()
                return result, up
            finally:
                self.staging.give_back(buf)

        self.pending.append(self.worker.submit(run))

    def defer(self, staged, step) -> None:
        self.deferred.append((staged, step))

    def release_deferred(self, make_step) -> None:
        """Submit the buckets staged during backward; ``make_step(step)`` binds the values that were
        known only at its end (the global clipping multipliers)."""
        deferred, self.deferred = self.deferred, []
        for staged, step in deferred:
            self.submit(staged, make_step(step))

    def _wait_oldest(self) -> None:
        if not self.pending:
            raise RuntimeError("offload: no staging buffer is free and no bucket is in flight")
        self.pending[0].result()
        self._collect(1)

    def _collect(self, n: int | None = None) -> None:
        """Wait for the oldest ``n`` buckets (all: None); the first failure is raised after every one
        of them has finished, so no bucket is still writing when the caller sees it."""
        done, self.pending = (self.pending, []) if n is None else (self.pending[:n], self.pending[n:])
        error = None
        for f in done:
            try:
                result, up = f.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, once all are done
                error = error or e
                continue
            if up is not None:
                self.last_upload = up
            self.results.append(result)
        if error is not None:
            raise error

    def drain(self) -> list:
        """Join every bucket in flight; the compute stream waits for the last upload. Returns the
        buckets' results in submission order (since the last drain)."""
        try:
            self._collect()
        finally:
            self.transport.device_wait(self.last_upload)
            self.last_upload = None
            out, self.results = self.results, []
        return out

    def close(self) -> None:
        self.worker.shutdown(wait=True)
