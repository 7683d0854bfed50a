"""lowbit-adamw: AdamW with 8-bit blockwise state, a fused Triton step on GPU and a fast PyTorch step elsewhere.

The names below load on first use (PEP 562), so that the command line's ``--help`` does not wait for torch.

The package reads bottom-up, each layer importing only those beneath it:

    format/       the state format and its numbers: codes and maps (the spec), rng, layout, sharding, step_spec
    step/         the step's backends: eager and compiled, C++, the Triton launch, clipping, the custom op
    offload/      state in host memory: the pipeline and the buckets fed into it
    optim/        the optimizer's concerns: validation, placement, checkpoint, non-finite reports, in-backward
    migrate/      state dicts between optimizers (torch, bitsandbytes, torchao) and the conversions of a live one
    optimizer.py  AdamW8bit, the coordinator
    memory/, integrations/, cli.py   reports, Trainer/Lightning glue, the command line (tinylm.py: its model)
"""
import importlib

_EXPORTS = {
    "AdamW8bit": "optimizer",
    "adamw8bit_step": "step.functional",
    "StepScalars": "step.functional",
    "quantize_blockwise": "format",
    "dequantize_blockwise": "format",
    "FORMAT_VERSION": "format",
    "to_torch_adamw_state_dict": "migrate.convert",
    "load_torch_adamw_state_dict": "migrate.convert",
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
