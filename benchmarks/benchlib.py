"""What every benchmark records about where it ran, and how it saves results and charts."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import sys

import torch

from lowbit_adamw.memory.report import pyplot  # noqa: F401  (the benchmarks' charts: one home)


def _cpu_model() -> str:
    """The model name, with family and model (a virtual machine often reports only "AMD EPYC") and whether
    the CPU has AVX-512: what a reader needs to compare figures across machines."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = {}
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')}"
        name += ", AVX-512)" if "avx512f" in fields.get("flags", "").split() else ", no AVX-512)"
    return name


def machine() -> dict:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("bitsandbytes", "torchao", "triton", "flashoptim"):
        try:  # the installed distribution's version, without importing it (bitsandbytes' import takes ~4 s)
            versions[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            pass
    cuda = torch.cuda.is_available()
    return dict(device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
                cpu_isa=torch.backends.cpu.get_cpu_capability(),  # the ATen code path the CPU numbers came from
                cpu_model=_cpu_model(),
                threads=torch.get_num_threads(), versions=versions, date=datetime.date.today().isoformat(),
                command="python " + " ".join(sys.argv))


def apply_edits(source: str, edits, name: str, where: str) -> str:
    """``source`` with each (old, new) of ``edits`` replaced in turn; a missing ``old`` is an error, so that a
    renamed line cannot leave a build of kernel_parts.py or cpu_step_parts.py silently unedited."""
    for old, new in edits:
        if old not in source:
            raise ValueError(f"{name}: {where} no longer contains {old!r}")
        source = source.replace(old, new)
    return source


def save(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(dict(payload, **machine()), f, indent=1)
        print(f"wrote {path}")


def step_bytes_per_param(param_bytes: int, amsgrad=False, ema=False, block_size: int = 256, bits: int = 8) -> float:
    """Bytes one fused step moves per parameter: weight read+write, gradient read (weight dtype), codes
    (bits / 8 bytes) and scales of each moment read+write, and the fp32 EMA read+write."""
    from lowbit_adamw.format import state_bytes_per_element

    state = state_bytes_per_element(bits, block_size, moments=3 if amsgrad else 2)
    return 3 * param_bytes + 2 * state + (8 if ema else 0)
