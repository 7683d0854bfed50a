"""Where the fused kernel's instructions go, part by part: static figures, from the same SASS count as
benchmarks/kernel_report.py's speed model.

    python benchmarks/kernel_parts.py [--target sm_90] [--dtype bf16] [--out J]    (the 8-bit kernel)

Each part is taken out of a copy of the kernel's source (an edit named below: the dither replaced by 1/2, one
v map's codes by the other's, the division by a multiply, ...), that build is compiled for the target and
its hot-path instructions per element are counted; a part's figure is what the shipped kernel's count loses
without it. The edited builds compute wrong results and exist only to be counted; the parts overlap a little
(a shared subexpression leaves with either), so they need not add up to the whole.

Then the ladder: the format's edits applied one after another leave the skeleton every state format shares under
the contract (linear codes, no dither; the IEEE root and division, the non-finite rule, bf16 rounding kept), and
the contract's own parts are taken out after them: what any format could reach, and what the contract costs.

Last, the shipped kernel, the skeleton and the bare skeleton at every launch shape (8, 16 and 32 elements a thread,
1 to 8 warps): whether a tile other than the optimizer's would lower that floor.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

from benchlib import apply_edits

KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels", "adamw8bit.py")

# part: [(text in kernels/adamw8bit.py, what replaces it)], for the 8-bit variants
PARTS_8BIT = {
    "v encode, map A (with its two square roots)": [("        q = qa\n        if (tl.max(map_b.to(tl.int32), axis=0) != 0) | (not FLAT_BRANCH):", "        if True:"),
                                                    ("            q = tl.where(map_b[:, None], qb, qa)", "            q = qb")],
    # counted in the hot path, though only a tile holding a flat block runs it: the figure is what the others skip
    "v encode, map B": [("if (tl.max(map_b.to(tl.int32), axis=0) != 0) | (not FLAT_BRANCH):", "if False:")],
    "v dither hash": [("u = tl.where(tl.load(step_row + 10) != 0, (h >> 8).to(tl.float32) * (1.0 / 16777216.0), 0.5)", "u = 0.5")],
    "m encode (square root, rounding, sign)": [("""        q = tl.floor(tl.sqrt_rn(tl.abs(s)) * 127.0 + 0.5)
        q = tl.where(q > 127.0, 127.0, q)  # s beyond 1: a saturated scale
        return tl.where(s < 0, -q, q) + 127.0""", "        return s")],
    "IEEE division of the update": [("p = p - step_size * tl.div_rn(m, denom)", "p = p - step_size * m * denom")],
    "non-finite check": [("        if SKIP_NONFINITE:\n", "        if False:\n")],
    "v decode, the second map": [("        v = _v_level(code, a < 0, BITS) * tl.abs(a)", "        v = code * a")],
    "weight rounding on the bits (vs a conversion)": [("            out = _round_nearest(p, p_raw.dtype)", "            out = p.to(p_raw.dtype)")],
}


# The floor under the contract: the same edits one after another, from the shipped kernel down to a skeleton that
# keeps what every format must (the loads and stores, the block scales, AdamW's arithmetic with the IEEE root and
# division the backends share bit for bit, the non-finite rule, bf16 rounding to nearest) with linear 8-bit codes
# and no dither; then what the contract's own parts cost on top of the bare skeleton.
V_MAP_A = """        r = tl.sqrt_rn(s)
        lo_a = tl.floor(tl.sqrt_rn(r) * 255.0)
        lo_a = tl.where(lo_a > 254.0, 254.0, lo_a)
        ylo = lo_a * (1.0 / 255.0)
        yhi = (lo_a + 1.0) * (1.0 / 255.0)
        low, high = ylo * ylo, yhi * yhi
        up_a = (((u * (high - low)) * r) < ((r - low) * high)) | (s >= 1.0)  # s >= 1: saturated by inf
        qa = lo_a + up_a.to(tl.float32)
        qa = tl.where((v > 0) & (qa == 0), 1.0, qa)  # a positive v never decodes to 0"""
FORMAT_LADDER = [
    ("v map B out", PARTS_8BIT["v encode, map B"]),
    ("v dither hash -> 1/2", PARTS_8BIT["v dither hash"]),
    ("v map A -> linear code floor(s * 255 + u)", [(V_MAP_A, "        qa = tl.floor(s * 255.0 + u)")]),
    ("m encode -> linear code", [("        q = tl.floor(tl.sqrt_rn(tl.abs(s)) * 127.0 + 0.5)", "        q = tl.floor(tl.abs(s) * 127.0 + 0.5)")]),
    ("m decode -> linear", [("        return q * tl.abs(q) * a", "        return q * a")]),
    ("v decode -> one linear map", [("        v = _v_level(code, a < 0, BITS) * tl.abs(a)", "        v = code * (1.0 / 255.0) * tl.abs(a)")]),
]
FORMAT_LADDER_4BIT = [
    ("v dither hash -> 1/2", PARTS_8BIT["v dither hash"]),
    ("m encode -> linear code (binary search over the 15 bounds out)",
     [("        b3 = s >= M4_BOUNDS[7]\n", "        return tl.minimum(tl.maximum(tl.floor(s * 7.0 + 7.5), 0.0), 15.0)\n        b3 = s >= M4_BOUNDS[7]\n")]),
    ("m decode -> linear (select tree out)",
     [("        c = code.to(tl.int32)\n        b0 = (c & 1) != 0\n", "        return (code - 7.0) * (1.0 / 7.0) * a\n        c = code.to(tl.int32)\n        b0 = (c & 1) != 0\n")]),
]
CONTRACT_LADDER = [
    ("IEEE division -> multiply", PARTS_8BIT["IEEE division of the update"]),
    ("IEEE square root of the update -> approximate", [("denom = tl.sqrt_rn(vh) * inv_bc2_sqrt + eps", "denom = tl.sqrt(vh) * inv_bc2_sqrt + eps")]),
    ("non-finite check out", PARTS_8BIT["non-finite check"]),
    ("bf16 rounding -> the hardware's conversion", PARTS_8BIT["weight rounding on the bits (vs a conversion)"]),
]


def hot_per_element(kernel, target, dtype, bits) -> float:
    return count(kernel, target, dtype, bits)["hot_per_element"]


def count(kernel, target, dtype, bits, bpp=None, warps=None, registers=False) -> dict:
    """Hot-path SASS instructions per element of one build at one launch shape (the optimizer's by default);
    with ``registers``, ptxas' registers and spill bytes too."""
    import kernel_report as kr
    from sass import disassemble, parse_sass, sass_counts

    compiled, bpp, warps = kr.compile_variant(target, dtype, bits=bits, kernel=kernel, bpp=bpp, warps=warps)
    per_thread = bpp * kr.fmt.default_block_size(bits) // (warps * 32)
    row = dict(blocks_per_program=bpp, num_warps=warps, elements_per_thread=per_thread,
               hot_per_element=sass_counts(parse_sass(disassemble(compiled.asm["cubin"])))["hot"] / per_thread)
    if registers:
        row.update(kr.ptxas_figures(compiled.asm["ptx"], kr.TARGETS[target][1]))
    return row


def launch_shapes(bits) -> list[tuple[int, int]]:
    """(blocks per program, warps): 8, 16 and 32 elements a thread at 1, 2, 4 and 8 warps (whole blocks only)."""
    from lowbit_adamw import format as fmt

    block = fmt.default_block_size(bits)
    return [(el * warps * 32 // block, warps) for warps in (1, 2, 4, 8) for el in (8, 16, 32) if el * warps * 32 % block == 0]


def shape_sweep(source, steps, target, dtype, bits, tmp) -> list[dict]:
    """The shipped kernel, the contract's skeleton (``steps``' format edits) and the bare skeleton (the contract's
    parts out too) at every launch shape: whether another tile shape would lower the floor the ladder finds."""
    rungs = cumulative(steps)
    builds = dict(shipped=None, skeleton=edited_kernel(source, rungs[len(steps) - 1][1], tmp, f"kernel_shape{bits}_skeleton"),
                  bare=edited_kernel(source, rungs[-1][1], tmp, f"kernel_shape{bits}_bare"))
    rows = []
    for bpp, warps in launch_shapes(bits):
        counts = {name: count(kernel, target, dtype, bits, bpp, warps, registers=True) for name, kernel in builds.items()}
        row = {k: counts["shipped"][k] for k in ("blocks_per_program", "num_warps", "elements_per_thread")}
        row.update({name: {k: c[k] for k in ("hot_per_element", "registers", "spill_bytes")} for name, c in counts.items()})
        rows.append(row)
    return rows


def edited_kernel(source: str, edits, tmp: str, name: str):
    source = apply_edits(source, edits, name, "the kernel (update PARTS_8BIT or the ladders)")
    path = os.path.join(tmp, f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.adamw8bit_kernel


def main(argv=None):
    # Compiling for real: the interpreter replaces @triton.jit. Only here, so that importing this module (the
    # tests do, to check the edits) leaves the interpreter on for the kernels imported after it.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import kernel_report as kr
    from benchlib import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="sm_90", choices=[t for t in kr.TARGETS if t.startswith("sm_")])
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    source = open(KERNEL_SOURCE).read()
    whole = hot_per_element(None, args.target, args.dtype, 8)
    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (part, edits) in enumerate(PARTS_8BIT.items()):
            kernel = edited_kernel(source, edits, tmp, f"kernel_part_{i}")
            parts[part] = whole - hot_per_element(kernel, args.target, args.dtype, 8)
        ladders = {bits: ladder(source, steps, args.target, args.dtype, bits, tmp)
                   for bits, steps in ((8, FORMAT_LADDER), (4, FORMAT_LADDER_4BIT))}
        shapes = {bits: shape_sweep(source, steps, args.target, args.dtype, bits, tmp)
                  for bits, steps in ((8, FORMAT_LADDER), (4, FORMAT_LADDER_4BIT))}
    print(f"{args.target} 8-bit {args.dtype}, aligned default variant: {whole:.1f} hot instructions per element (static)")
    for part, n in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:6.1f}  {part}")
    for bits, rows in ladders.items():
        print(f"{bits}-bit: the edits one after another (the format's leave the contract's skeleton with linear codes):")
        for row in rows:
            print(f"  {row['hot_per_element']:6.1f}  {row['edit']}")
    lowest = {}
    for bits, rows in shapes.items():
        print(f"{bits}-bit at every launch shape (hot instructions per element, registers; * the optimizer's shape):")
        for r in rows:
            mark = "*" if (r["blocks_per_program"], r["num_warps"]) == kr.launch_shape("cuda", bits) else " "
            print(f" {mark}{r['blocks_per_program']:3d} blocks x {r['num_warps']} warps, {r['elements_per_thread']:2d} a thread: "
                  + "  ".join(f"{k} {r[k]['hot_per_element']:6.1f} ({r[k]['registers']} regs{', spills' if r[k]['spill_bytes'] else ''})"
                              for k in ("shipped", "skeleton", "bare")))
        lowest[bits] = {k: min(r[k]["hot_per_element"] for r in rows) for k in ("shipped", "skeleton", "bare")}
        print("  lowest over the shapes: " + ", ".join(f"{k} {v:.1f}" for k, v in lowest[bits].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(target=args.target, dtype=args.dtype, bits=8, hot_per_element=whole, parts=parts,
                           ladder=ladders[8], skeleton_per_element=ladders[8][len(FORMAT_LADDER)]["hot_per_element"],
                           ladder_4bit=ladders[4], skeleton_per_element_4bit=ladders[4][len(FORMAT_LADDER_4BIT)]["hot_per_element"],
                           shapes=shapes[8], shapes_4bit=shapes[4], lowest_over_shapes=lowest[8], lowest_over_shapes_4bit=lowest[4],
                           note="static figures: SASS counted per element, not timings", **machine()), f, indent=1)


def cumulative(steps) -> list[tuple[str, list]]:
    """(step, every edit up to it) for each of ``steps`` and then CONTRACT_LADDER: what each rung of a ladder builds."""
    out, edits = [], []
    for step, step_edits in steps + CONTRACT_LADDER:
        edits = edits + step_edits
        out.append((step, edits))
    return out


def ladder(source, steps, target, dtype, bits, tmp) -> list[dict]:
    """The shipped count, then the count after each rung of ``cumulative(steps)``."""
    rows = [dict(edit="shipped kernel", hot_per_element=hot_per_element(None, target, dtype, bits))]
    for i, (step, edits) in enumerate(cumulative(steps)):
        kernel = edited_kernel(source, edits, tmp, f"kernel_ladder{bits}_{i}")
        rows.append(dict(edit=step, hot_per_element=hot_per_element(kernel, target, dtype, bits)))
    return rows


if __name__ == "__main__":
    main()
