"""How the step sees a parameter's memory: flat, in memory order, whatever the tensor's strides.

A quantization block is a run of ``block_size`` consecutive elements of the parameter's storage. For
a contiguous tensor that is its row-major order; for any other *dense* tensor (no gaps, no overlap:
``channels_last`` convolution weights, transposed matrices) it is the order the elements sit in
memory, so the step walks the storage once, keeps the user's layout, and needs no copy as long as the
gradient has the same strides (autograd gives gradients the strides of their parameter). A gradient
laid out otherwise is copied into the parameter's layout first. A parameter with gaps (a strided view
used as a leaf) is stepped through a contiguous copy, written back after the step: its blocks run in
row-major order.

Complex parameters are stepped as ``torch.view_as_real`` (real and imaginary parts as independent
elements), as ``torch.optim.AdamW`` does.
"""
from __future__ import annotations

import torch


def real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def is_dense(t: torch.Tensor) -> bool:
    """No gaps and no overlap: the elements fill ``numel`` consecutive storage slots in some order."""
    if t.is_contiguous():
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def memory_order_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-d view of a dense tensor's elements in storage order (writes go to ``t``)."""
    if t.is_contiguous():
        return t.view(-1)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b``'s elements sit in memory in ``a``'s order (size-1 dims do not count)."""
    if a.shape != b.shape:
        return False
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def dim_order(t: torch.Tensor) -> list[int]:
    """The dims of ``t`` from the largest stride to the smallest (row-major order: 0, 1, ..., n-1)."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def is_row_major(t: torch.Tensor) -> bool:
    """Whether the step's element order for ``t`` is its row-major order (contiguous, or not dense)."""
    return t.is_contiguous() or not is_dense(t)


def element_order(t: torch.Tensor) -> list[int] | None:
    """The dim order the step's blocks follow for this parameter; None for row-major order."""
    t = real_view(t)
    if is_row_major(t):
        return None
    order = dim_order(t)
    return None if order == list(range(t.dim())) else order


def to_order(x: torch.Tensor, order: list[int] | None) -> torch.Tensor:
    """A logical tensor's elements flat in the element order ``order`` (None: row-major)."""
    if order is None:
        return x.reshape(-1)
    return x.permute(*order).reshape(-1)


def from_order(flat: torch.Tensor, shape, order: list[int] | None) -> torch.Tensor:
    """Inverse of :func:`to_order`: flat values in element order ``order`` back to a logical tensor."""
    if order is None:
        return flat.reshape(shape)
    permuted_shape = [shape[d] for d in order]
    inverse = [order.index(d) for d in range(len(order))]
    return flat.reshape(permuted_shape).permute(*inverse)


def flat_to_logical(flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Values of ``p``'s elements, flat in the step's block order (decoded moments), as a tensor shaped
    like ``p`` (complex for a complex ``p``), contiguous."""
    shape = real_view(p).shape
    out = from_order(flat, shape, element_order(p)).contiguous()
    return torch.view_as_complex(out) if p.is_complex() else out


def logical_to_flat(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flat_to_logical`: a tensor shaped like ``p`` to its values flat in block order."""
    return to_order(real_view(x), element_order(p)).contiguous()


def _extent(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) that ``t`` can touch."""
    size = t.element_size()
    if t.numel() == 0:
        start = t.storage_offset() * size
        return t.untyped_storage().data_ptr(), start, start
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    start = t.storage_offset() * size
    return t.untyped_storage().data_ptr(), start, start + (last + 1) * size


def _element_bytes(t: torch.Tensor) -> set[int]:
    """The storage bytes of every element of ``t`` (for the rare strided leaf: small sets)."""
    slots = torch.arange(_extent(t)[2] // t.element_size())
    offsets = torch.as_strided(slots, t.shape, t.stride(), t.storage_offset())
    return {int(o) * t.element_size() + b for o in offsets.reshape(-1).tolist() for b in range(t.element_size())}


def overlapping_pairs(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Index pairs (i, j), i < j, of distinct tensors that share memory (the same tensor twice is
    not a pair: see the optimizer's duplicate rule). Meta tensors have no memory."""
    spans = []
    for i, t in enumerate(tensors):
        if t.device.type == "meta" or t.numel() == 0:
            continue
        spans.append((*_extent(t), i))
    spans.sort()
    pairs = []
    for a in range(len(spans)):
        ptr, start, end, i = spans[a]
        for b in range(a + 1, len(spans)):
            ptr2, start2, end2, j = spans[b]
            if ptr2 != ptr or start2 >= end:
                break
            ti, tj = tensors[i], tensors[j]
            if ti is tj:
                continue
            if not (is_dense(ti) and is_dense(tj)) and not _element_bytes(ti) & _element_bytes(tj):
                continue  # interleaved strided views: their ranges overlap, their elements do not
            pairs.append((min(i, j), max(i, j)))
    return pairs
