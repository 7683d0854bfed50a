"""Optimizer state in host memory (``AdamW8bit(offload="cpu")``): the C++ step on a worker thread, overlapped
with backward.

* ``pipeline``: the transport (side streams, pinned chunks, a CPU stand-in), the host arena of weight copies,
  the staging buffers and the worker.
* ``steps``: the optimizer's offloaded buckets fed into it (clipping in backward included).

Imports ``lowbit_adamw.format`` and ``lowbit_adamw.step`` from the package.
"""
