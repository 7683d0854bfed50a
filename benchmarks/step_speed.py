"""One optimizer step over a Llama-shaped parameter set: lowbit AdamW8bit vs torch AdamW (fused,
foreach) and bitsandbytes / torchao AdamW8bit / DeepSpeed's CPUAdam when installed. Interleaved rounds,
warm-up first, medians and ratios to torch fused.

The peers (PEERS) each run in their own process beside torch fused, and their ratio is to that torch
fused: bitsandbytes' and DeepSpeed's CPU steps slow whatever runs after them in the same process
(torch fused's own step among them). ``--together`` runs everything in this one process instead.

    python benchmarks/step_speed.py --quick                               # about a minute on 2 CPU cores
    python benchmarks/step_speed.py [--dim 512 --layers 8 --vocab 32000] [--dtype fp32|bf16] [--rounds 7] [--out J --png P]
    python benchmarks/step_speed.py --set small --count 300 --numel 65536  # many small tensors (launch overhead)

On CUDA it adds FlashOptim's FlashAdamW when installed and reports achieved bandwidth against a
device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchlib import machine, pyplot, save
from lowbit_adamw import AdamW8bit


def llama_params(dim, layers, vocab, ffn, dtype, device):
    shapes = [(vocab, dim)]
    for _ in range(layers):
        shapes += [(dim,)] + [(dim, dim)] * 4 + [(dim,)] + [(ffn, dim)] * 2 + [(dim, ffn)]
    shapes += [(dim,), (vocab, dim)]
    return [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]


def candidates():
    out = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "lowbit AdamW8bit": lambda ps: AdamW8bit(ps),  # auto: the C++ step on CPU, Triton on CUDA
        "lowbit AdamW8bit eager": lambda ps: AdamW8bit(ps, backend="torch"),
        "lowbit bits=4": lambda ps: AdamW8bit(ps, bits=4),
    }
    if not torch.cuda.is_available():
        out["lowbit AdamW8bit torch.compile"] = lambda ps: AdamW8bit(ps, backend="compiled")
    try:
        import bitsandbytes as bnb

        out["bnb AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps)
    except Exception:
        pass
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        out["torchao AdamW8bit"] = lambda ps: AoAdamW8bit(ps)
        from torchao.optim import AdamW4bit as AoAdamW4bit

        out["torchao AdamW4bit"] = lambda ps: AoAdamW4bit(ps)
    except Exception:
        pass
    if not torch.cuda.is_available():
        try:
            import deepspeed.ops.adam  # noqa: F401  (its C++ op builds at first use, about a minute)

            def deepspeed_cpu_adam(ps):
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                return DeepSpeedCPUAdam(ps, adamw_mode=True)

            out["deepspeed CPUAdam"] = deepspeed_cpu_adam
        except Exception:
            pass
    if torch.cuda.is_available():
        try:
            from flashoptim import FlashAdamW

            out["flashoptim FlashAdamW"] = lambda ps: FlashAdamW(ps)
        except Exception:
            pass
    return out


PEERS = ("bnb AdamW8bit", "torchao AdamW8bit", "torchao AdamW4bit", "deepspeed CPUAdam")


def peer_in_own_process(peer: str, argv: list[str]) -> dict:
    """The peer and torch fused, interleaved in a fresh process with the same set and rounds."""
    keep, skip = [], False
    for a in argv:  # this run's arguments without its outputs and selection
        if skip:
            skip = False
            continue
        if a in ("--out", "--png", "--only"):
            skip = True
            continue
        keep.append(a)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "peer.json")
        subprocess.run([sys.executable, __file__, *keep, "--together", "--only", f"torch AdamW fused,{peer}", "--out", out],
                       check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            data = json.load(f)
    return dict(median_ms=data["median_ms"][peer], torch_fused_ms=data["median_ms"]["torch AdamW fused"],
                ratio_to_torch_fused=data["ratio_to_torch_fused"][peer])


def many_small(count, numel, dtype, device):
    """The launch-overhead case: many equal small tensors (e.g. 300 x 64K)."""
    return [torch.nn.Parameter(torch.randn(numel, device=device, dtype=dtype) * 0.02) for _ in range(count)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", help="comma-separated subset of optimizer names")
    ap.add_argument("--set", choices=["llama", "small"], default="llama", help="llama-shaped set, or --count tensors of --numel")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--numel", type=int, default=65536)
    ap.add_argument("--quick", action="store_true", help="a smaller llama set (dim 256, 4 layers, vocab 8000) and 3 rounds")
    ap.add_argument("--together", action="store_true", help="every optimizer in this one process (peers included)")
    ap.add_argument("--out")
    ap.add_argument("--png")
    args = ap.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if args.quick:
        args.dim, args.layers, args.vocab, args.rounds = 256, 4, 8000, 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cands = candidates()
    if args.only:
        cands = {k: v for k, v in cands.items() if any(s.strip() in k for s in args.only.split(","))}
    else:  # the eager variant is opt-in: its allocator churn slows whatever runs next by up to 1.7x here
        cands = {k: v for k, v in cands.items() if "eager" not in k}
    peers = [] if args.together else [k for k in cands if k in PEERS]
    cands = {k: v for k, v in cands.items() if k not in peers}
    runs = {}
    for name, make in cands.items():
        torch.manual_seed(0)
        if args.set == "small":
            ps = many_small(args.count, args.numel, dtype, device)
        else:
            ps = llama_params(args.dim, args.layers, args.vocab, int(args.dim * 8 / 3) // 64 * 64, dtype, device)
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        runs[name] = (ps, make(ps))
    n = sum(p.numel() for p in next(iter(runs.values()))[0])
    times = {k: [] for k in runs}
    for r in range(args.rounds + 2):  # two warm-up rounds (state creation, compilation)
        for name, (_, opt) in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    base = med.get("torch AdamW fused")
    own = {peer: peer_in_own_process(peer, sys.argv[1:]) for peer in peers}
    tensors = len(next(iter(runs.values()))[0])
    print(f"{n / 1e6:.1f}M params in {tensors} tensors, {args.dtype}, {device} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"{k:<24}{v:>10.1f} ms{'' if not base else f'{v / base:>8.2f}x fused':>16}")
    for k, r in own.items():
        print(f"{k:<24}{r['median_ms']:>10.1f} ms{r['ratio_to_torch_fused']:>8.2f}x fused (own process; fused "
              f"{r['torch_fused_ms']:.1f} ms there)")
    ratios = {k: v / base for k, v in med.items()} if base else {}
    ratios.update({k: r["ratio_to_torch_fused"] for k, r in own.items()})
    payload = dict(median_ms={**med, **{k: r["median_ms"] for k, r in own.items()}}, ratio_to_torch_fused=ratios,
                   peers_in_own_process=own, params=n, tensors=tensors, dtype=args.dtype, set=args.set)
    if device == "cuda":
        # Bytes the 8-bit step must move per parameter: param read+write, grad read, two 1-byte codes
        # read+write, and the block scales: 16.06 B (fp32 params) / 10.06 B (bf16), against a copy of
        # the same number of bytes (read + write) measured now.
        from triton.testing import do_bench

        size = 4 if dtype == torch.float32 else 2
        bytes_per = 3 * size + 4 + 16 / 256
        src = torch.empty(int(n * bytes_per / 2), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
        payload.update(copy_ms=copy_ms, bytes_per_param=bytes_per, copy_GBps=n * bytes_per / copy_ms / 1e6,
                       lowbit_GBps=n * bytes_per / med["lowbit AdamW8bit"] / 1e6,
                       lowbit_fraction_of_copy=copy_ms / med["lowbit AdamW8bit"])
        print(f"lowbit moves {bytes_per:.2f} B/param: {payload['lowbit_GBps']:.0f} GB/s, "
              f"{100 * payload['lowbit_fraction_of_copy']:.0f}% of a device copy ({payload['copy_GBps']:.0f} GB/s)")
    save(args.out, payload)
    med = payload["median_ms"]
    if args.png:
        plt = pyplot()
        names = list(med)
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
        ax.barh(names, [med[k] for k in names], color=["#55a868" if "lowbit" in k else "#8fa8d6" for k in names])
        for y, k in enumerate(names):
            ax.text(med[k], y, f" {med[k]:.1f} ms" + (f" ({ratios[k]:.2f}x fused)" if base else ""), va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(med.values()) * 1.35)
        ax.set_xlabel("ms per optimizer step (median)")
        ax.set_title(f"{n / 1e6:.1f}M params in {tensors} tensors, {args.dtype}, {machine()['device']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
