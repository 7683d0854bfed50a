"""The optimizer's concerns, each in its own module; ``lowbit_adamw.optimizer.AdamW8bit`` coordinates them.

* ``validation``: the user's options and param groups checked, with errors that name the fix.
* ``placement``: what state each parameter gets (8/4-bit codes or full precision) and where it lives.
* ``notices``: the first step's one-time notices about tensors that keep full-precision state.
* ``checkpoint``: the state dict and everything checked on the way back in.
* ``nonfinite``: counts and reports of blocks skipped for a non-finite gradient.
* ``in_backward``: the step inside backward (gradient hooks and buckets).
* ``bnb_compat``: bitsandbytes' calling conventions (positional arguments, GlobalOptimManager overrides).

Imports ``lowbit_adamw.format``, ``lowbit_adamw.step`` and ``lowbit_adamw.offload`` from the package.
"""
