"""Gradient norms for ``max_grad_norm`` and ``clip_norm``, over what the step will actually apply.

Under the non-finite rule (``nonfinite="skip"``) a block whose gradient holds a NaN or an Inf is left
untouched, so it must not count in a norm either: otherwise one Inf makes the global norm inf and
every other tensor's gradient is multiplied by 0 (a momentum-only step), while one NaN gives
``min(1, nan)``, i.e. no clipping at all, for the same fault. Here a skipped block (a skipped
fp32-state tensor) contributes 0, whichever kind of non-finite value it holds, so the result equals
a run where that block's gradient was finite and zero. With ``nonfinite="ignore"`` (or ``"raise"``,
which has already checked) the norms are plain, as ``torch.nn.utils.clip_grad_norm_``'s.

Everything is fp32 tensor math on the gradients' device: no host sync (step_spec's device multiplier).
Per tensor ``i`` with host multiplier ``h_i`` (accumulation mean, AMP unscale, ``loss_scale``) and
norm ``n_i`` of its gradient over applied blocks::

    total   = || (h_i * n_i)_i ||_2                                  # global_clipnorm / clip_grad_norm_
    G       = min(1, max_grad_norm / (total + 1e-6))                 # 1 without max_grad_norm
    c_i     = clip_norm / (h_i * G * n_i) if h_i * G * n_i > clip_norm else 1    # 1 without clip_norm
    device multiplier of tensor i = G * c_i
"""
from __future__ import annotations

import torch

from .. import format as fmt
from ..format import sharding


def _block_norms(g: torch.Tensor, block_size: int, skip: bool) -> torch.Tensor:
    """||g||_2 over the blocks the non-finite rule applies (fp32, 0-d); g is flat in block order."""
    g = g.float()
    n = g.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=g.device)
    full, tail = fmt._blocks(g, block_size)
    parts = []
    for rows in (full, tail):
        if rows is None or rows.numel() == 0:
            continue
        bn = torch.linalg.vector_norm(rows, dim=1)
        if skip:
            ok = rows.abs().amax(dim=1) <= torch.finfo(torch.float32).max  # False for NaN and +-Inf
            bn = torch.where(ok, bn, torch.zeros_like(bn))
        parts.append(bn)
    return torch.linalg.vector_norm(torch.cat(parts))


def _tensor_norm(g: torch.Tensor, skip: bool) -> torch.Tensor:
    n = torch.linalg.vector_norm(g.float())
    if skip:
        n = torch.where(torch.isfinite(g).all(), n, torch.zeros_like(n))
    return n


def applied_norms(grads, params, quantized: list[bool], block_sizes: list[int], skip: bool) -> torch.Tensor:
    """Per tensor, the fp32 norm of its (rank-local, flat, block-ordered) gradient over what the step
    applies, summed over the shards of a sharded parameter. One tensor on the gradients' device."""
    norms = []
    for g, p, q, bs in zip(grads, params, quantized, block_sizes):
        n = _block_norms(g, bs, skip) if q else _tensor_norm(g, skip)
        norms.append(sharding.norm_over_shards(n, p))
    return torch.stack(norms)


def multipliers(norms: torch.Tensor, host_muls: torch.Tensor, max_grad_norm, clip_norms: list) -> torch.Tensor:
    """The device multiplier per tensor (see module doc). ``clip_norms``: per tensor, its group's
    clip_norm or None."""
    scaled = host_muls * norms
    if max_grad_norm is not None:
        total = torch.linalg.vector_norm(scaled)
        g = torch.clamp(torch.tensor(float(max_grad_norm), dtype=torch.float32, device=norms.device) / (total + 1e-6), max=1.0)
        out = g.expand(norms.shape).clone()
    else:
        out = torch.ones_like(norms)
    if any(c is not None for c in clip_norms):
        c = torch.tensor([float("inf") if c is None else float(c) for c in clip_norms], dtype=torch.float32,
                         device=norms.device)
        s = scaled * out
        out = out * torch.where(s > c, c / torch.where(s > 0, s, torch.ones_like(s)), torch.ones_like(s))
    return out
