"""Where the C++ CPU step's time goes, and the floor under the contract: the CPU twin of kernel_parts.py.

    python benchmarks/cpu_step_parts.py [--rounds 5] [--numel 16777216] [--out J]

Edits of lowbit_adamw/step/csrc/cpu_step.cpp are applied one after another (the dither replaced by 1/2, v's and
m's codes made linear, ...), each build timed in its own process on one thread (one fp32 tensor larger than the
last-level cache, 8-bit state, the minimum of 15 steps after 3), beside torch's fused AdamW in its own process.
The rounds alternate the builds, so that a slow spell of a shared machine reaches all of them; each figure is
the minimum over the rounds. The first five edits leave the skeleton every state format shares under the
contract (linear codes, no dither; the IEEE root and division kept); the last two take out the division and the
root themselves. The edited builds compute wrong results and exist only to be timed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from benchlib import apply_edits, save

CPP_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lowbit_adamw", "step", "csrc", "cpu_step.cpp")

V_MAP_A = """  const float r = std::sqrt(s);
  float lo = std::floor(std::sqrt(r) * 255.0f);
  lo = lo > 254.0f ? 254.0f : lo;
  const float ylo = lo * (1.0f / 255.0f), yhi = (lo + 1.0f) * (1.0f / 255.0f);
  const float low = ylo * ylo, high = yhi * yhi;
  float q = lo + (((u * (high - low)) * r < (r - low) * high || s >= 1.0f) ? 1.0f : 0.0f);  // s >= 1: saturated by inf
  if (x > 0.0f && q == 0.0f) q = 1.0f;  // a positive v never decodes to 0
  return q;"""
# (edit, [(text in cpu_step.cpp, what replaces it)]), applied cumulatively
LADDER = [
    ("v dither -> 1/2", [("  return float((mix32(key ^ uint32_t(i)) + offset) >> 8) * (1.0f / 16777216.0f);", "  return 0.5f;")]),
    ("v map A -> linear code", [(V_MAP_A, "  float q = std::floor(s * 255.0f + u);\n  return q > 255.0f ? 255.0f : q;")]),
    ("m encode -> linear code", [("  float q = std::floor(std::sqrt(std::fabs(s)) * 127.0f + 0.5f);",
                                  "  float q = std::floor(std::fabs(s) * 127.0f + 0.5f);")]),
    ("m decode -> linear", [("  return y * std::fabs(y) * a;", "  return y * a;")]),
    # the blocks here take map A (Gaussian gradients): its level becomes linear
    ("v decode -> one linear map", [("    for (int i = 0; i < n; ++i) x[i] = saturated_to_inf(level_a(x[i]) * a);",
                                     "    for (int i = 0; i < n; ++i) x[i] = saturated_to_inf(x[i] * (1.0f / 255.0f) * a);")]),
    ("IEEE division -> multiply", [("step_size * (mi / denom);", "step_size * (mi * denom);")]),
    ("IEEE square root -> none", [("    float denom = std::sqrt(hi) * inv_bc2_sqrt + eps;", "    float denom = hi * inv_bc2_sqrt + eps;")]),
]
SKELETON = 5  # LADDER[:SKELETON] leaves the contract's skeleton

CHILD = r"""
import sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
n = int(sys.argv[2])
torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(n))
p.grad = torch.randn(n) * 1e-2
if sys.argv[1] == "torch-fused":
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
else:
    import lowbit_adamw.step.cpu_kernel as cpu_kernel
    cpu_kernel._SOURCE = Path(sys.argv[1])  # this build (its own key in the library cache)
    from lowbit_adamw import AdamW8bit
    opt = AdamW8bit([p], lr=1e-3, backend="cpp")
for _ in range(3):
    opt.step()
times = []
for _ in range(15):
    t = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t)
print(min(times) / n * 1e9)
"""


def builds(source: str, tmp: str) -> list[tuple[str, str]]:
    """(edit, path of the edited source), the shipped source first."""
    out = [("shipped step", CPP_SOURCE)]
    for i, (name, edits) in enumerate(LADDER):
        source = apply_edits(source, edits, name, "cpu_step.cpp (update LADDER)")
        path = os.path.join(tmp, f"cpu_step_ladder_{i}.cpp")
        with open(path, "w") as f:
            f.write(source)
        out.append((name, path))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--numel", type=int, default=16777216)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = builds(open(CPP_SOURCE).read(), tmp) + [("torch fused AdamW", "torch-fused")]
        env = dict(os.environ, LOWBIT_ADAMW_CACHE_DIR=os.path.join(tmp, "cache"), OMP_NUM_THREADS="1")
        times = {name: [] for name, _ in runs}
        for r in range(args.rounds):
            for name, path in runs:
                out = subprocess.run([sys.executable, "-P", "-c", CHILD, path, str(args.numel)], env=env,
                                     capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
                times[name].append(float(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds}", flush=True)
    fused = min(times["torch fused AdamW"])
    rows = [dict(edit=name, ns_per_element=min(t), vs_torch_fused=min(t) / fused, all_rounds=t) for name, t in times.items()]
    print(f"one thread, {args.numel:,} fp32 elements, 8-bit state; minimum of {args.rounds} rounds:")
    for row in rows:
        print(f"  {row['ns_per_element']:6.3f} ns/element  {row['vs_torch_fused']:5.2f}x torch fused  {row['edit']}")
    save(args.out, dict(numel=args.numel, rounds=args.rounds, step_threads=1, skeleton=LADDER[SKELETON - 1][0], results=rows,
                        note="each build in its own process, one thread; edited builds compute wrong results"))


if __name__ == "__main__":
    main()
