"""GPU check of offload="cpu": bit-equality with the on-GPU step, step time, peak GPU memory, host RAM,
and the overlap of the CPU steps with backward, for a 1B-parameter model (TinyLM, dim 2048, 20 layers).

    python benchmarks/gpu_offload_check.py [--dim 2048] [--layers 20] [--dtype bf16] [--steps 6]
        [--out benchmarks/results/gpu_offload.json]
    python benchmarks/gpu_offload_check.py --smoke     # CPU parameters (the CPU stands in for the device), tiny model

Configurations, each from the same initial weights and batches: on-device state (plain loop and
step_in_backward), offloaded state (plain loop, step_in_backward, step_in_backward + max_grad_norm).
Bit-equality: after the steps every parameter of each offloaded run is compared with the on-device
run of the same loop; quantized-state tensors must agree exactly (one spec: Triton on the GPU, C++ on
the host); tensors kept in fp32 state run torch's AdamW on each side, whose CUDA and CPU kernels need
not agree to the bit, so they are reported apart. Overlap: with t_fb the forward+backward time alone
and t_step the offloaded step() of the plain loop, overlap = (t_fb + t_step - t_iter) / min(t_fb, t_step)
for the step_in_backward iteration time t_iter (1: the CPU step hides entirely under backward).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from benchlib import machine, save
from lowbit_adamw import AdamW8bit
from lowbit_adamw.tinylm import TinyLM


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(args, device, dtype):
    torch.manual_seed(0)
    return TinyLM(dim=args.dim, layers=args.layers, heads=args.heads, seq_len=args.seq_len).to(device=device, dtype=dtype)


def batches(args, device, n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g).to(device) for _ in range(n)]


def loss_of(model, batch):
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def run(args, device, dtype, data, **opt_kw):
    model = make_model(args, device, dtype)
    opt = AdamW8bit(model.parameters(), lr=1e-4, step_in_backward_bucket_mb=args.bucket_mb, **opt_kw)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iters, steps = [], []
    for batch in data:
        sync(device)
        t0 = time.perf_counter()
        loss_of(model, batch).backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        sync(device)
        t2 = time.perf_counter()
        iters.append(t2 - t0)
        steps.append(t2 - t1)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    host_state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor) and t.device.type == "cpu")
    out = dict(iter_s=statistics.median(iters[1:] or iters), step_s=statistics.median(steps[1:] or steps),
               peak_gpu_bytes=peak, host_state_bytes=host_state if opt_kw.get("offload") else 0,
               host_pinned_bytes=opt.offload_host_bytes())
    quantized = [p for p in model.parameters() if "exp_avg_codes" in opt.state[p]]
    return model, quantized, out


def forward_backward_time(args, device, dtype, data):
    model = make_model(args, device, dtype)
    times = []
    for batch in data:
        sync(device)
        t0 = time.perf_counter()
        loss_of(model, batch).backward()
        sync(device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:] or times)


def max_diff(a_model, b_model, quantized: list[bool]):
    """Largest weight difference over tensors with quantized state, and over those with fp32 state."""
    q, full = 0.0, 0.0
    for pa, pb, is_q in zip(a_model.parameters(), b_model.parameters(), quantized):
        d = (pa.detach().float().cpu() - pb.detach().float().cpu()).abs().max().item()
        if is_q:
            q = max(q, d)
        else:
            full = max(full, d)
    return q, full


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--bits", type=int, choices=(8, 4), default=8)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU parameters (the CPU stand-in)")
    ap.add_argument("--out", default="benchmarks/results/gpu_offload.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.dim, args.layers, args.heads, args.seq_len, args.batch, args.steps, args.bucket_mb = 64, 2, 4, 32, 2, 3, 0.05
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU stand-in")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    data = batches(args, device, args.steps)
    common = dict(bits=args.bits)
    configs = {
        "device": dict(),
        "device_in_backward": dict(step_in_backward=True),
        "offload": dict(offload="cpu"),
        "offload_in_backward": dict(offload="cpu", step_in_backward=True),
        "offload_in_backward_clipped": dict(offload="cpu", step_in_backward=True, max_grad_norm=1.0),
    }
    reference = {"offload": "device", "offload_in_backward": "device_in_backward", "offload_in_backward_clipped": None}
    models, results = {}, {}
    for name, kw in configs.items():
        model, quantized, res = run(args, device, dtype, data, **common, **kw)
        models[name], results[name] = model, res
        ref = reference.get(name)
        if ref is not None:
            flags = [any(p is q for q in quantized) for p in model.parameters()]
            res["max_diff_quantized_state"], res["max_diff_fp32_state"] = max_diff(models[ref], model, flags)
        print(f"{name:30s} iter {res['iter_s'] * 1e3:8.1f} ms  step {res['step_s'] * 1e3:8.1f} ms  "
              f"peak GPU {(res['peak_gpu_bytes'] or 0) / 2**30:6.2f} GiB  host state {res['host_state_bytes'] / 2**30:6.2f} GiB  "
              f"pinned {res['host_pinned_bytes'] / 2**30:6.2f} GiB"
              + (f"  max diff quantized {res['max_diff_quantized_state']:.3g} fp32-state {res['max_diff_fp32_state']:.3g}"
                 if ref else ""), flush=True)
    t_fb = forward_backward_time(args, device, dtype, data)
    t_step, t_iter = results["offload"]["step_s"], results["offload_in_backward"]["iter_s"]
    overlap = (t_fb + t_step - t_iter) / min(t_fb, t_step) if min(t_fb, t_step) > 0 else 0.0
    params = sum(p.numel() for p in models["device"].parameters())
    payload = dict(machine=machine(), device=str(device), params=params, dtype=args.dtype, bits=args.bits,
                   forward_backward_s=t_fb, overlap=overlap, configs=results,
                   max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"{params / 1e9:.2f}B parameters; forward+backward {t_fb * 1e3:.1f} ms; overlap of the CPU step with backward "
          f"{overlap:.2f}")
    save(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
