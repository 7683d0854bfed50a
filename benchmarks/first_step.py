"""How long the first optimizer step takes on the CPU, when nothing is built yet (a new machine or a
new version) and when an earlier process has built it (every later run). The C++ step builds its library
once per machine and CPU code path (cached in LOWBIT_ADAMW_CACHE_DIR); the torch.compile'd step compiles
its graphs (cached by inductor in TORCHINDUCTOR_CACHE_DIR). Each measurement is a fresh process whose
caches start empty (cold) or hold what the cold process left (warm); the same run times torch's fused
AdamW first step as the baseline. ``compile-torch`` and ``compile-lowbit`` time the first call of
``torch.compile(opt.step)`` (torch's AdamW; lowbit with ``fullgraph=True``), which traces and compiles
the step, against the calls after it.

    python benchmarks/first_step.py [--out benchmarks/results/first_step_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchlib import save

CHILD = r"""
import json, sys, time, torch
t0 = time.perf_counter()
from lowbit_adamw import AdamW8bit
backend, bits = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(s)) for s in [(4096, 512), (512, 512), (512,), (1376, 512)]]
for p in ps:
    p.grad = torch.randn_like(p)
if backend == "torch-fused":
    opt = torch.optim.AdamW(ps, fused=True)
    step = opt.step
elif backend == "compile-torch":
    opt = torch.optim.AdamW(ps)
    step = torch.compile(opt.step)
elif backend == "compile-lowbit":
    opt = AdamW8bit(ps, bits=bits)
    step = torch.compile(opt.step, fullgraph=True)
else:
    opt = AdamW8bit(ps, backend=backend, bits=bits)
    step = opt.step
t = time.perf_counter()
step()
first = time.perf_counter() - t
t = time.perf_counter()
step()
print(json.dumps(dict(first_s=first, second_s=time.perf_counter() - t, import_s=t - t0 - first)))
"""


def measure(backend: str, bits: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, backend, str(bits)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="torch-fused:8,cpp:8,cpp:4,compiled:8,compiled:4,compile-torch:8,compile-lowbit:8,compile-lowbit:4",
                    help="backend:bits, comma-separated")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for backend, bits in (r.split(":") for r in args.runs.split(",")):
        bits = int(bits)
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, LOWBIT_ADAMW_CACHE_DIR=os.path.join(tmp, "lowbit"),
                       TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
            cold = measure(backend, bits, env)
            warm = measure(backend, bits, env)
        row = dict(backend=backend, bits=bits, cold_first_step_s=cold["first_s"], warm_first_step_s=warm["first_s"],
                   later_step_s=warm["second_s"])
        rows.append(row)
        print(f"{backend:<12} bits={bits}  first step: {row['cold_first_step_s']:6.2f} s with empty caches, "
              f"{row['warm_first_step_s']:6.3f} s cached; a later step {1000 * row['later_step_s']:.1f} ms")
    save(args.out, dict(results=rows))


if __name__ == "__main__":
    main()
