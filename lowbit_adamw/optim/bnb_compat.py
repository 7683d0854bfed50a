"""bitsandbytes' way of calling an 8-bit AdamW, taken at its word or refused with the reason.

Scripts written for ``bitsandbytes.optim.AdamW8bit`` pass ``optim_bits``, ``args``, ``min_8bit_size``
(positionally after ``amsgrad`` or by name), sometimes ``is_paged``, ``percentile_clipping``,
``block_wise``, ``max_unorm`` or ``skip_zeros``, and keep chosen parameters in 32-bit state through
``GlobalOptimManager`` overrides (``register_module_override(emb, "weight", {"optim_bits": 32})``,
which Trainer and many scripts do for embeddings). What each becomes here:

* ``optim_bits=32``: fp32 state for the whole optimizer (bitsandbytes' ``Adam/AdamW(optim_bits=32)``);
  ``optim_bits=8``: the default 8-bit state. A GlobalOptimManager override ``{"optim_bits": 32}``:
  fp32 state for that parameter; ``{"min_8bit_size": n}``: that parameter's threshold.
* ``is_paged=True``: accepted with a warning. The state stays on the device and is 4x smaller than
  fp32 state; nothing is paged.
* ``percentile_clipping < 100``, ``max_unorm > 0``, ``skip_zeros=True``, ``block_wise=False``, ``args``:
  refused, each naming what to use instead, since ignoring them would change the update silently.
"""
from __future__ import annotations

import sys
import warnings

# bitsandbytes' AdamW8bit positional order after amsgrad, common to every release we know of (later
# releases dropped percentile_clipping/block_wise from the positional list, so nothing further is safe).
POSITIONAL_AFTER_AMSGRAD = ("optim_bits", "args", "min_8bit_size")
OVERRIDE_KEYS = ("optim_bits", "min_8bit_size")


def positional_kwargs(extra: tuple) -> dict:
    if len(extra) > len(POSITIONAL_AFTER_AMSGRAD):
        raise TypeError(
            f"AdamW8bit takes params, lr, betas, eps, weight_decay, amsgrad positionally (as torch.optim.AdamW), then "
            f"bitsandbytes' {', '.join(POSITIONAL_AFTER_AMSGRAD)}; got {6 + len(extra)} positional arguments. Pass the "
            "rest by name (bitsandbytes releases order them differently), e.g. AdamW8bit(params, lr, is_paged=False)")
    return dict(zip(POSITIONAL_AFTER_AMSGRAD, extra))


def check_options(optim_bits, args, percentile_clipping, block_wise, is_paged, max_unorm, skip_zeros) -> bool | None:
    """Validate bitsandbytes' options. Returns True for fp32 state everywhere (optim_bits=32), False
    for 8-bit, None when not given."""
    if args is not None:
        raise ValueError("args=: bitsandbytes' config object is not read by lowbit_adamw.AdamW8bit; pass its fields "
                         "(lr, betas, eps, weight_decay, min_8bit_size, ...) as keyword arguments")
    if percentile_clipping != 100:
        raise ValueError(f"percentile_clipping={percentile_clipping}: bitsandbytes' adaptive clipping (by a percentile of "
                         "recent gradient norms) is not implemented; use max_grad_norm= (global, clip_grad_norm_'s rule) "
                         "or clip_norm= (per tensor)")
    if max_unorm not in (0, 0.0, None):
        raise ValueError(f"max_unorm={max_unorm}: bitsandbytes' update-norm clipping is not implemented; use "
                         "max_grad_norm= or clip_norm= to bound the gradients instead")
    if skip_zeros:
        raise ValueError("skip_zeros=True: bitsandbytes skips zero gradient elements; AdamW8bit updates every element "
                         "as torch.optim.AdamW does. Leave skip_zeros=False")
    if not block_wise:
        raise ValueError("block_wise=False: AdamW8bit's state is always blockwise (one scale per block_size elements); "
                         "leave block_wise=True and choose block_size= if needed")
    if is_paged:
        warnings.warn("AdamW8bit(is_paged=True): the state is not paged; it stays on the parameter's device at 2 bytes "
                      "per parameter (fp32 state: 8)", UserWarning, stacklevel=3)
    if optim_bits is None:
        return None
    if optim_bits not in (8, 32) or isinstance(optim_bits, bool):
        raise ValueError(f"optim_bits must be 8 or 32 (bitsandbytes' values), got {optim_bits!r}; for 4-bit state use bits=4")
    return optim_bits == 32


def manager_overrides(param_groups) -> dict:
    """bitsandbytes' GlobalOptimManager overrides for these parameters: ``{param: {key: value}}``.
    Read only when bitsandbytes is already imported (it is the one that recorded them)."""
    if "bitsandbytes" not in sys.modules and "bitsandbytes.optim" not in sys.modules:
        return {}
    try:
        from bitsandbytes.optim import GlobalOptimManager
    except Exception:  # pragma: no cover - a broken bitsandbytes install
        return {}
    mng = GlobalOptimManager.get_instance()
    by_id = {}
    for group in param_groups:
        for p in group["params"]:
            by_id.setdefault(id(p), p)
    found: dict = {}
    for module, attr, config in getattr(mng, "module_weight_config_triple", []):
        p = getattr(module, attr, None)
        if p is not None and id(p) in by_id:
            found.setdefault(by_id[id(p)], {}).update(config)
    for pid, config in getattr(mng, "pid2config", {}).items():
        if pid in by_id:
            found.setdefault(by_id[pid], {}).update(config)
    for (gi, pi), config in getattr(mng, "index2config", {}).items():
        if gi < len(param_groups) and pi < len(param_groups[gi]["params"]):
            found.setdefault(param_groups[gi]["params"][pi], {}).update(config)
    for p, config in found.items():
        unknown = sorted(set(config) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValueError(
                f"bitsandbytes GlobalOptimManager overrides {unknown} for a parameter of shape {tuple(p.shape)}: "
                f"AdamW8bit honours {', '.join(OVERRIDE_KEYS)} per parameter; give the parameter its own param group for "
                "other settings")
        bits = config.get("optim_bits")
        if bits is not None and bits not in (8, 32):
            raise ValueError(f"bitsandbytes GlobalOptimManager override optim_bits={bits!r}: AdamW8bit takes 8 or 32")
    return found
