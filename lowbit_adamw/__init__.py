"""lowbit-adamw: AdamW with 8-bit blockwise state, a fused Triton step on GPU and a fast PyTorch step elsewhere.

The names below load on first use (PEP 562), so that the command line's ``--help`` does not wait for torch."""
import importlib

_EXPORTS = {
    "AdamW8bit": "optimizer",
    "adamw8bit_step": "functional",
    "StepScalars": "functional",
    "quantize_blockwise": "format",
    "dequantize_blockwise": "format",
    "FORMAT_VERSION": "format",
    "to_torch_adamw_state_dict": "convert",
    "load_torch_adamw_state_dict": "convert",
    "optimizer_state_bytes": "memory",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit_adamw' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
