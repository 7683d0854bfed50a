"""The notices the first step gives about tensors that keep full-precision state where a user may not
expect it: many small tensors under ``min_8bit_size`` (LoRA), FSDP2 shards whose rows are not whole
blocks, and fp32-state choices lost to parameters swapped in after construction (DeepSpeed ZeRO).
Each is said once, with the count and what it costs or would save in bytes. ``placement`` records what
they read as it creates state."""
from __future__ import annotations

import warnings

from .. import format as fmt
from ..format import layout, sharding


def say_small_fp32(opt) -> None:
    """Once, at the first step: a large share of the parameters keeps fp32 state only because each of
    its tensors is under ``min_8bit_size`` (LoRA adapters: r x width is often 2-4k elements)."""
    if opt._small_said or not opt._small_fp32:
        return
    opt._small_said = True
    total = sum(layout.real_view(sharding.local(p)).numel() for g in opt.param_groups for p in g["params"] if p in opt.state)
    small = sum(n for n, _, _ in opt._small_fp32)
    if len(opt._small_fp32) < 8 or small < 0.25 * total:  # a few biases and norms are what the default is for
        return
    saved = sum(n * 8 - n * fmt.state_bytes_per_element(bits, block) for n, bits, block in opt._small_fp32)
    warnings.warn(f"AdamW8bit: {len(opt._small_fp32)} tensors ({100 * small / total:.0f}% of the parameters with state) keep "
                  f"fp32 state (8 B/param) because each has fewer than min_8bit_size elements (as LoRA adapters do); "
                  f"min_8bit_size=0 would save {saved / 2**20:.2f} MiB of optimizer state", UserWarning, stacklevel=4)


def say_sharded_fp32(opt) -> None:
    """Once, at the first step: DTensor parameters (FSDP2) large enough for 8-bit state that keep fp32 state
    because their shards cannot hold whole blocks on every world size (``format.sharding``): how many, what
    that costs on this rank, and the block size that would let those whose rows allow it take 8-bit state."""
    if opt._sharded_said or not opt._sharded_fp32:
        return
    opt._sharded_said = True
    entries = opt._sharded_fp32
    n = sum(e[0] for e in entries)
    extra = sum(numel * 8 - numel * fmt.state_bytes_per_element(bits, block) for numel, bits, block, _ in entries)
    fixable = [e for e in entries if e[3] is not None]
    line = (f"AdamW8bit: {len(entries)} sharded tensor(s) ({n:,} elements on this rank) keep fp32 state (8 B/param, "
            f"{extra / 2**20:.2f} MiB more than {entries[0][1]}-bit state) because their rows are not whole blocks of "
            f"block_size={entries[0][2]}: a block may not cross a row, so the state reshards with the parameter "
            "(docs/integrations.md, FSDP2).")
    if fixable:
        smaller = min(e[3] for e in fixable)
        line += f" block_size={smaller} would give {len(fixable)} of them {entries[0][1]}-bit state."
    if len(fixable) < len(entries):
        line += (f" {len(entries) - len(fixable)} cannot take it at any block size (1-D, sharded on another dim, or rows "
                 f"whose length is not a multiple of {fmt.MIN_BLOCK_SIZE}).")
    warnings.warn(line, UserWarning, stacklevel=4)


def say_fp32_choices_lost(opt) -> None:
    """Once, at the first step: parameters chosen for fp32 state (``fp32_state=``, the Trainer route's
    embedding rule, bitsandbytes' ``optim_bits=32`` override) that are no longer the optimizer's own, and
    whose place no parameter of the optimizer took (``follows_fp32_choice``). DeepSpeed ZeRO hands the
    optimizer flat partitions of the parameters after construction, so a choice tied to a parameter cannot
    follow it there: its elements get 8-bit state with the rest of their partition."""
    if opt._lost_said or not opt._fp32_forced:
        return
    opt._lost_said = True
    listed = opt._listed_ids()
    followed = set()
    for ref, name, orig in opt._fp32_slots:
        mod = ref()
        if mod is not None and id(mod._parameters.get(name)) in listed:
            followed.add(orig)
    lost = [p for p in opt._fp32_forced if id(p) in opt._built_ids and id(p) not in listed and id(p) not in followed]
    if not lost:
        return
    # ZeRO-3 empties a partitioned parameter on every rank and keeps its size as ds_numel
    size = {id(p): getattr(p, "ds_numel", None) or p.numel() for p in lost}
    n = sum(size.values())
    # priced with the width of the group each was built in (their elements now follow the partition's group)
    kept = sum(size[id(p)] * (8 - fmt.state_bytes_per_element(*opt._built_ids[id(p)])) for p in lost)
    bits = sorted({opt._built_ids[id(p)][0] for p in lost})
    bits = bits[0] if len(bits) == 1 else "/".join(map(str, bits))
    warnings.warn(f"AdamW8bit: {len(lost)} parameter(s) chosen for fp32 state ({n:,} elements) are no longer among the "
                  f"optimizer's parameters: they were replaced after it was built (DeepSpeed ZeRO hands the optimizer flat "
                  f"partitions; a parameter swapped in elsewhere is followed only when fp32_state named its module, or "
                  f"model= was given), so their elements get {bits}-bit state "
                  f"({kept / 2**20:.2f} MiB less optimizer state than fp32 would take for them; docs/integrations.md)",
                  UserWarning, stacklevel=4)
