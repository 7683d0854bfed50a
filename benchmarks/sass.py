"""Counting what a compiled CUDA kernel does: SASS from the triton wheel's ``cuobjdump``, parsed into
instructions, and the straight-line counts the kernel report's speed model uses (see its module doc).
No side effects on import (the kernel report's import turns Triton's interpreter off; this does not)."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton

BNB_KERNEL = "_Z35kOptimizerStatic8bit2StateBlockwiseI13__nv_bfloat16Li0ELi256ELi1EEvPT_S2_PhS3_fffffifPfS4_S4_S4_ffbi"

_SASS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", re.M)


def parse_sass(text: str) -> list[tuple[int, str, str, str]]:
    """(address, predicate, opcode, operands) of every instruction in ``cuobjdump -sass`` output, without
    the NOP padding and the closing branch-to-self."""
    out = []
    for addr, pred, op, args in _SASS.findall(text):
        a = int(addr, 16)
        if op == "NOP" or (op == "BRA" and args.strip() == hex(a)):
            continue
        out.append((a, pred.strip(), op, args.strip()))
    return out


def _target(args: str) -> int:
    return int(args.split()[0].rstrip(";,"), 16)


def sass_counts(instructions: list) -> dict:
    """Straight-line instruction counts of one kernel (see the module doc): ``total``, ``main`` (before the
    first slow-path subroutine a CALL enters), ``hot`` (``main`` less the regions a forward conditional branch
    skips around a CALL: the slow paths not taken), and the calls, branches and MUFU ops among them."""
    if not instructions:
        raise ValueError("no SASS instructions found: the disassembly is empty or its format changed")
    calls = [_target(a) for _, _, op, a in instructions if op.startswith("CALL")]
    end = min(calls) if calls else float("inf")
    main = [i for i in instructions if i[0] < end]
    skipped = 0
    for addr, pred, op, args in main:
        if op == "BRA" and pred and _target(args) > addr:
            region = [i for i in main if addr < i[0] < _target(args)]
            if any(i[2].startswith("CALL") for i in region):
                skipped += len(region)
    return dict(total=len(instructions), main=len(main), hot=len(main) - skipped, calls=len(calls),
                branches=sum(op == "BRA" for _, _, op, _ in main), mufu=sum(op.startswith("MUFU") for _, _, op, _ in main))


def loop_body_count(instructions: list) -> int:
    """Instructions of the longest loop (a backward branch to its head): a grid-stride kernel's per-iteration cost."""
    back = [(a, _target(args)) for a, _, op, args in instructions if op == "BRA" and _target(args) < a]
    if not back:
        raise ValueError("no loop found in the SASS")
    tail, head = max(back, key=lambda b: b[0] - b[1])
    return sum(head <= i[0] <= tail for i in instructions)


def _nvidia_tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in the triton wheel ({path})")
    return path


def disassemble(cubin: bytes, function: str | None = None) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        cmd = [_nvidia_tool("cuobjdump"), "-sass"] + (["-fun", function] if function else []) + [path]
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"cuobjdump failed: {out.stderr[-2000:]}")
    return out.stdout


def bnb_loop_instructions(arch: str) -> dict:
    """bitsandbytes' 8-bit blockwise AdamW step for bf16 weights, from the cubin for ``arch`` in its shipped
    CUDA library: the loop body's instructions (one element per thread per iteration), or why there is none."""
    import importlib.util

    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        return dict(skipped="bitsandbytes is not installed")
    libs = sorted(f for d in spec.submodule_search_locations for f in os.listdir(d) if re.fullmatch(r"libbitsandbytes_cuda\d+\.so", f))
    if not libs:
        return dict(skipped="this bitsandbytes wheel has no CUDA library")
    lib_name = max(libs, key=lambda f: int(re.search(r"cuda(\d+)", f).group(1)))
    lib = next(os.path.join(d, lib_name) for d in spec.submodule_search_locations if os.path.exists(os.path.join(d, lib_name)))
    listing = subprocess.run([_nvidia_tool("cuobjdump"), "-lelf", lib], capture_output=True, text=True).stdout
    elf = next((m for m in re.findall(r"ELF file\s+\d+:\s+(\S+)", listing) if m.endswith(f".{arch}.cubin")), None)
    if elf is None:
        return dict(skipped=f"{lib_name} has no {arch} cubin")
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([_nvidia_tool("cuobjdump"), "-xelf", elf, lib], capture_output=True, text=True, cwd=d, check=True)
        with open(os.path.join(d, elf), "rb") as f:
            cubin = f.read()
    instructions = parse_sass(disassemble(cubin, BNB_KERNEL))
    return dict(library=lib_name, arch=arch, kernel="kOptimizerStatic8bit2StateBlockwise<bf16, ADAM, 256, 1>",
                loop_body=loop_body_count(instructions), elements_per_thread=1, total=len(instructions))
