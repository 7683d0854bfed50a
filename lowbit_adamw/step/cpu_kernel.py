"""The CPU step as a small C++ library (``csrc/cpu_step.cpp``): every quantization block of every tensor
of a bucket in one call, one pass over memory per block, threads from OpenMP.

Why not only ``torch.compile``: inductor's loop nests make several passes over each block (finiteness,
decode and update into fp32 temporaries, the scale reductions, encode), and every compiled call costs
about 0.1 ms of Python and guard overhead, so a bucket of 300 small tensors spends most of its step
outside the arithmetic. The library is plain C++ with no torch headers: it builds in a few seconds
with the C++ compiler inductor would use, once per machine and CPU code path, and is cached on disk
(``LOWBIT_ADAMW_CACHE_DIR``, default ``~/.cache/lowbit_adamw``), so later processes load it at once.
Flags: ``-O3 -ffp-contract=off`` (no FMA the spec does not have; no ``-ffast-math``), and the vector
ISA ATen runs with (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` sets).

The arithmetic is ``lowbit_adamw.format.step_spec``'s, and the tests hold it to the eager path bit for bit.
Parameters in float32 or bfloat16 (with their gradients in the same dtype), stochastic rounding of
bfloat16 weights included (``lowbit_adamw.format.rng``'s hash); anything else stays on the compiled path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .. import format as fmt
from ..format.step_spec import StepScalars

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_SOURCE = Path(__file__).with_name("csrc") / "cpu_step.cpp"
_lib: dict = {}
_M4_TABLE = torch.tensor(fmt.M4_LEVELS + fmt.M4_BOUNDS, dtype=torch.float32)  # 16 levels, then 15 bounds


class _TensorArgs(ctypes.Structure):  # struct Tensor in cpu_step.cpp
    _fields_ = [("p", ctypes.c_void_p), ("g", ctypes.c_void_p), ("mc", ctypes.c_void_p), ("ma", ctypes.c_void_p),
                ("vc", ctypes.c_void_p), ("va", ctypes.c_void_p), ("xc", ctypes.c_void_p), ("xa", ctypes.c_void_p),
                ("ema", ctypes.c_void_p), ("numel", ctypes.c_int64), ("step_size", ctypes.c_float),
                ("inv_bc2_sqrt", ctypes.c_float), ("grad_mul", ctypes.c_float), ("ema_mom", ctypes.c_float),
                ("one_minus_ema_mom", ctypes.c_float), ("sr_key", ctypes.c_uint32), ("v_key", ctypes.c_uint32),
                ("v_offset", ctypes.c_uint32), ("v_dither", ctypes.c_uint32), ("index_base", ctypes.c_int64)]


# struct Tensor as bytes, field for field from _TensorArgs with native sizes and alignment: a bucket's
# arguments are packed with one call per tensor instead of a ctypes attribute write per field. (Native
# mode rounds a float64 beyond fp32's range to infinity, as a C cast does, where standard mode raises.)
_STRUCT_CODES = {ctypes.c_void_p: "P", ctypes.c_int64: "q", ctypes.c_float: "f", ctypes.c_uint32: "I"}
_TENSOR_LAYOUT = struct.Struct("@" + "".join(_STRUCT_CODES[t] for _, t in _TensorArgs._fields_))


def _isa_flags() -> list[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    isa = torch.backends.cpu.get_cpu_capability().lower()
    if isa.startswith("avx512"):
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"]
    if isa == "avx2":
        return ["-mavx2", "-mfma"]
    return []


def _compiler() -> str | None:
    return os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def library_path() -> tuple[Path, str, list[str]]:
    """(where the built library for this compiler, these flags and this source lives, the compiler, the flags)."""
    cxx = _compiler() or "none"
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", *_isa_flags()]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout if cxx != "none" else ""
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), cxx, version, *flags]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LOWBIT_ADAMW_CACHE_DIR", Path.home() / ".cache" / "lowbit_adamw"))
    return cache / f"cpu_step-{key}.so", cxx, flags


BUILD_TIMEOUT_S = 300  # a compiler that stalls must not block the first step for ever (LOWBIT_ADAMW_BUILD_TIMEOUT)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(path: Path) -> bool:
    """The cached library is whole: its checksum, written beside it after the build, matches. A truncated
    or overwritten file would otherwise crash the process inside dlopen (SIGBUS) instead of being rebuilt."""
    sums = path.with_suffix(".sha256")
    return path.exists() and sums.exists() and sums.read_text().strip() == _digest(path)


def _build(path: Path, cxx: str, flags: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("LOWBIT_ADAMW_BUILD_TIMEOUT", BUILD_TIMEOUT_S))
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # build, then rename: concurrent processes are safe
        out = Path(tmp) / path.name
        try:
            subprocess.run([cxx, *flags, "-shared", "-fPIC", "-o", str(out), str(_SOURCE)], check=True,
                           capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cxx} did not finish within {timeout:g} s (LOWBIT_ADAMW_BUILD_TIMEOUT)") from None
        sums = Path(tmp) / (path.stem + ".sha256")
        sums.write_text(_digest(out))
        os.replace(out, path)
        os.replace(sums, path.with_suffix(".sha256"))


def load():
    """The ctypes library, built on first use (and rebuilt if the cached file is not intact); None (with
    one warning) where it cannot be built."""
    if "lib" in _lib:
        return _lib["lib"]
    lib = None
    try:
        path, cxx, flags = library_path()
        if cxx == "none":
            raise RuntimeError("no C++ compiler found (set CXX)")
        if not _intact(path):
            _build(path, cxx, flags)
        lib = ctypes.CDLL(str(path))
        lib.lowbit_cpu_step.restype = ctypes.c_int
        lib.lowbit_cpu_step.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_int]
        if not lib.lowbit_tensor_struct_size() == ctypes.sizeof(_TensorArgs) == _TENSOR_LAYOUT.size:
            raise RuntimeError("struct layout mismatch between cpu_step.cpp and cpu_kernel.py")
    except Exception as e:  # no compiler, a failed build, an unloadable library: the compiled path takes over
        detail = e.stderr[-500:] if isinstance(e, subprocess.CalledProcessError) else f"{type(e).__name__}: {e}"
        warnings.warn(f"AdamW8bit: the C++ CPU step could not be built ({detail}); using the torch.compile'd step",
                      RuntimeWarning, stacklevel=3)
        lib = None
    _lib["lib"] = lib
    return lib


def available() -> bool:
    return load() is not None


def supports(param: torch.Tensor, sc: StepScalars) -> bool:
    return param.is_cpu and param.dtype in SUPPORTED_DTYPES and param.is_contiguous()


def cpu_step(params, grads, states, sc: StepScalars, *, block_size: int, bits: int, grad_muls=None,
             ema_moms=None, sr_keys=None, v_dithers=None, index_bases=None) -> torch.Tensor:
    """The fused step over CPU tensors that ``supports`` accepts (one dtype), all in one call. Returns the
    number of blocks skipped for a non-finite gradient, per tensor (int32)."""
    lib = load()
    n = len(params)
    keep = []  # contiguous copies of strided gradients, alive through the call
    packed = []  # each tensor's struct Tensor
    starts = [0]
    corrections: dict = {}  # per step count: the tensors of a bucket are mostly at the same step
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        step = float(s["step"])
        if step not in corrections:
            corrections[step] = sc.corrections(step)
        step_size, inv_bc2_sqrt = corrections[step]
        mom = None if ema_moms is None else ema_moms[i]
        if not g.is_contiguous():
            g = g.contiguous()
            keep.append(g)
        xc = xa = ema = 0
        if sc.amsgrad:
            xc, xa = s["max_exp_avg_sq_codes"].data_ptr(), s["max_exp_avg_sq_absmax"].data_ptr()
        if mom is not None:
            ema = s["ema"].data_ptr()
        v_key = v_offset = v_dither = 0  # no dither: u = 1/2 (nearest in the value domain), as eager
        if v_dithers is not None and v_dithers[i] is not None:
            (v_key, v_offset), v_dither = v_dithers[i], 1
        numel = p.numel()
        packed.append(_TENSOR_LAYOUT.pack(
            p.data_ptr(), g.data_ptr(), s["exp_avg_codes"].data_ptr(), s["exp_avg_absmax"].data_ptr(),
            s["exp_avg_sq_codes"].data_ptr(), s["exp_avg_sq_absmax"].data_ptr(), xc, xa, ema, numel,
            step_size, inv_bc2_sqrt, 1.0 if grad_muls is None else grad_muls[i],
            0.0 if mom is None else mom, 0.0 if mom is None else 1.0 - mom,
            0 if sr_keys is None or sr_keys[i] is None else sr_keys[i], v_key, v_offset, v_dither,
            0 if index_bases is None else index_bases[i]))
        starts.append(starts[-1] + fmt.num_blocks(numel, block_size))
    args = ctypes.create_string_buffer(b"".join(packed), n * _TENSOR_LAYOUT.size)
    # ctypes arrays, not torch.tensor (about 10 us each from a list: a step in backward calls this per bucket);
    # the floats are rounded to fp32 as a C cast rounds them, as torch.tensor would.
    block_start = (ctypes.c_int64 * len(starts))(*starts)
    clip = sc.clip_value != float("inf")
    scalars = (ctypes.c_float * 7)(*sc.constants(), sc.clip_value if clip else 0.0)
    counts = torch.zeros(n, dtype=torch.int32)
    levels = _M4_TABLE.data_ptr()
    bf16 = params[0].dtype == torch.bfloat16
    rc = lib.lowbit_cpu_step(args, n, block_start, block_size, bits,
                             int(bf16), scalars, levels,
                             levels + 4 * len(fmt.M4_LEVELS), int(sc.amsgrad), int(sc.maximize), int(clip), int(ema_moms is not None),
                             int(sc.skip_nonfinite), int(bf16 and sc.stochastic_rounding), counts.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"the C++ CPU step refused block_size={block_size}")
    return counts
