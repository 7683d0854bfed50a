"""Memory reports: what training will cost (estimate) and what it did cost (measured).

* ``estimate(model, optimizers)``: weights, gradients and optimizer state by kind for each optimizer,
  from parameter shapes alone. Build the model on the meta device (``load_model("llama-2-70b")``
  does) and a 70B estimate costs nothing. lowbit's own rows come from ``placement.init_state``
  run on meta tensors, so the estimate follows the optimizer's real decisions; the other optimizers'
  rules are written below and checked against the real libraries in tests/test_memory.py.
* ``measure(model, optimizers, batch)``: a few real training steps per optimizer. State bytes come
  from the tensors the optimizer holds (shared tensors counted once, tensor subclasses such as
  torchao's unpacked). Activations: on CUDA the allocator's counters, reset per phase (forward,
  backward, step); on the CPU the bytes autograd saves for backward.
* ``MemoryMonitor``: per-step state size and peak memory in any loop (a step hook), with a
  Trainer callback in ``lowbit_adamw.integrations.transformers``.
* ``MemoryReport``: ``.table()``, ``.to_json()``, ``.plot(path)`` (matplotlib PNG).

State that lives off the device (paged or CPU-offloaded) is not seen by torch.cuda's counters;
the report has an ``offloaded`` column for it: ``MemoryMonitor`` puts there the state of
``AdamW8bit(offload="cpu")`` groups and the pinned buffers of their pipeline.
"""
import importlib

from .catalog import COLUMNS, DEFAULT_OPTIMIZERS, MODEL_CONFIGS, OPTIMIZERS, STATE_KINDS  # no torch import

_EXPORTS = {"estimate": "estimation", "make_optimizer": "measurement", "measure": "measurement", "_SavedBytes": "measurement",
            "load_model": "models", "MemoryMonitor": "monitor", "MemoryReport": "report", "MemoryRow": "report",
            "ParamSpec": "state", "estimate_state_bytes": "state", "optimizer_state_bytes": "state", "param_specs": "state"}
__all__ = ["COLUMNS", "DEFAULT_OPTIMIZERS", "MODEL_CONFIGS", "OPTIMIZERS", "STATE_KINDS", *_EXPORTS]


def __getattr__(name):  # the torch-backed parts load on first use (the command line's --help stays fast)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit_adamw.memory' has no attribute {name!r}")
