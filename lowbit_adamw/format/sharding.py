"""DTensor parameters (FSDP2's ``fully_shard``, HSDP, ``replicate``): state lives on each rank's shard.

The step itself never sees a DTensor: it runs on the local shard (``to_local()``), whose flat
layout is the same v1 format as a plain tensor. What makes a DTensor state checkpointable and
reshardable by ``torch.distributed.checkpoint`` is how the state tensors are shaped:

* full-precision moments are DTensors shaped and placed like the parameter;
* codes are a uint8 DTensor of shape ``(rows, row_length * bits // 8)`` (at 8 bits the parameter's
  shape, flattened past dim 0) with the parameter's placements;
* block scales are a DTensor of shape ``(rows, row_length // block_size)`` with the parameter's
  placements, so each row's blocks travel with the row.

That only works if no block straddles a shard boundary for any world size, i.e. if blocks never
cross rows: a DTensor parameter gets 8-bit state only when its row length (``numel // shape[0]``)
is a multiple of the block size and it is sharded on dim 0 (or replicated). Every weight matrix of
the common LLM shapes qualifies; the rest keep fp32 state. The rule depends on the shape and the
placements, never on the world size, so a checkpoint written on N ranks loads on M.
"""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # no subclass: nn.Parameter(dtensor) is a DTensor, not a Parameter


def is_dtensor(t) -> bool:
    if type(t) in PLAIN_TENSOR_TYPES:  # the common case, without isinstance's subclass walk (asked for every tensor, every step)
        return False
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor behind ``t`` (``t`` itself if it is a plain tensor)."""
    return t.to_local() if is_dtensor(t) else t


def row_length(p: torch.Tensor) -> int:
    return p.numel() // p.shape[0] if p.dim() and p.shape[0] else 0


def can_quantize(p: torch.Tensor, block_size: int) -> bool:
    """Whether a DTensor parameter's blocks are independent of its sharding (see module doc)."""
    if not is_dtensor(p):
        return True
    return _sharded_by_rows(p) and row_length(p) % block_size == 0


def _sharded_by_rows(p: torch.Tensor) -> bool:
    return p.dim() >= 2 and all(pl == Replicate() or (isinstance(pl, Shard) and pl.dim == 0) for pl in p.placements)


def largest_row_block(p: torch.Tensor, block_size: int) -> int | None:
    """The largest block size up to ``block_size`` (a power of two, at least the format's minimum) under which
    ``p`` could take quantized state by ``can_quantize``'s rule; None if none could (1-D, wrong placements)."""
    from . import MIN_BLOCK_SIZE

    if not is_dtensor(p) or not _sharded_by_rows(p):
        return None
    n = row_length(p)
    if n == 0:
        return None
    block = min(block_size, n & -n)  # n & -n: the largest power of two dividing n
    return block if block >= MIN_BLOCK_SIZE else None


def codes_shape(p: torch.Tensor, bits: int) -> tuple[int, ...]:
    return tuple(p.shape) if bits == 8 else (p.shape[0], row_length(p) * bits // 8)


def absmax_shape(p: torch.Tensor, block_size: int) -> tuple[int, int]:
    return (p.shape[0], row_length(p) // block_size)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def like(p: torch.Tensor, local_tensor: torch.Tensor, global_shape) -> torch.Tensor:
    """Wrap a rank-local tensor as a DTensor placed like ``p`` with ``global_shape`` (identity for plain ``p``)."""
    if not is_dtensor(p):
        return local_tensor
    return DTensor.from_local(local_tensor, p.device_mesh, p.placements, run_check=False, shape=torch.Size(global_shape),
                              stride=_contiguous_stride(global_shape))


def local_state(state: dict) -> dict:
    """A view of ``state`` with every DTensor replaced by its local tensor (codes and scales flat).
    In-place updates through the view land in the DTensors' local storage."""
    if not any(is_dtensor(v) for v in state.values()):
        return state
    out = {}
    for key, value in state.items():
        if is_dtensor(value):
            value = value.to_local()
            if key.endswith(("_codes", "_absmax")):
                value = value.view(-1)
        out[key] = value
    return out


def to_param_layout(p: torch.Tensor, value: torch.Tensor, global_shape) -> torch.Tensor:
    """Bring a loaded state tensor into the layout ``p`` needs: a DTensor placed like ``p`` for a
    DTensor parameter (a full tensor is sliced locally, no communication), a flat or ``global_shape``
    plain tensor for a plain one (a DTensor is gathered)."""
    if is_dtensor(p):
        if is_dtensor(value):
            if tuple(value.shape) == tuple(global_shape):
                return value if value.placements == p.placements else value.redistribute(p.device_mesh, p.placements)
            value = value.full_tensor()  # saved in another layout (flat): gather, then slice as below
        return distribute_tensor(value.reshape(global_shape).to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    if is_dtensor(value):
        value = value.full_tensor()
    return value


def all_ranks_agree_finite(flags: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """AND the per-tensor finite flags over every rank that shares these DTensor parameters, so a
    tensor is skipped on all of its shards or on none (one all-reduce per mesh dimension)."""
    meshes = []
    for p in params:
        if is_dtensor(p) and all(p.device_mesh is not m for m in meshes):
            meshes.append(p.device_mesh)
    if not meshes:
        return flags
    import torch.distributed as dist

    bad = (~flags).to(torch.int32)
    for mesh in meshes:
        dev = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
        t = bad.to(dev)
        for dim in range(mesh.ndim):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        bad = t.cpu()
    return bad == 0


def norm_over_shards(norm: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The 2-norm of a sharded tensor from its rank-local norm: squares summed over the mesh dims the
    parameter is sharded on (replicated dims hold the same values and are not summed)."""
    if not is_dtensor(p):
        return norm
    import torch.distributed as dist

    sq = norm.float() ** 2
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            sq = sq.clone()
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=p.device_mesh.get_group(dim))
    return sq.sqrt()


def flat_offset(p: torch.Tensor) -> int:
    """The flat (row-major) index of the rank-local shard's first element in the whole parameter: 0 for
    a plain tensor. Defined for the placements that keep a shard one flat range (``Shard(0)``, ``Replicate``)."""
    if not is_dtensor(p) or p.numel() == 0:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) * row_length(p) if offset else 0
