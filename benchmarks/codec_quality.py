"""Which code maps? Update error against fp32 AdamW on real gradients, and encode speed.

    python benchmarks/codec_quality.py [--quick] [--steps 120] [--out benchmarks/results/codec_quality.json]

A TinyLM trains on Python stdlib text with fp32 AdamW. Every codec tracks its own m and v from the same
gradients (teacher forcing: no trajectory divergence), requantizing after each step, and we compare its
AdamW update direction m_hat / (sqrt(v_hat) + eps) with fp32's: relative L2 error, mean over steps.
Codecs: bitsandbytes' dynamic (tree) maps with nearest-entry search (if bitsandbytes is installed), and
power companding m = sign(y) y^a, v = y^b rounded in the companded domain; ours is a=2, b=4.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchlib import save
from lowbit_adamw import format as fmt
from lowbit_adamw.tinylm import TinyLM, batches, token_splits

BLOCK = fmt.DEFAULT_BLOCK_SIZE


def _blocks(x):
    n = x.numel()
    xp = torch.nn.functional.pad(x.reshape(-1), (0, (-n) % BLOCK)).view(-1, BLOCK)
    return xp, n


def table_codec(mtab, vtab):
    """Nearest entry of a sorted 256-entry table (bitsandbytes' rule), zero-point guard for v."""
    def q(x, signed):
        tab = mtab if signed else vtab
        xp, n = _blocks(x)
        a = xp.abs().amax(1, keepdim=True)
        s = torch.where(a > 0, xp / a, xp)
        c = torch.bucketize(s, (tab[1:] + tab[:-1]) / 2)
        if not signed:
            c = torch.where((xp > 0) & (tab[c] == 0), c + 1, c)
        return (tab[c] * a).view(-1)[:n].view_as(x)
    return q


def power_codec(a_m, b_v):
    def q(x, signed):
        xp, n = _blocks(x)
        a = xp.abs().amax(1, keepdim=True)
        s = torch.where(a > 0, xp / a, xp)
        levels, p = (127, a_m) if signed else (255, b_v)
        y = torch.floor(s.abs() ** (1 / p) * levels + 0.5)
        if not signed:
            y = torch.where((xp > 0) & (y == 0), torch.ones_like(y), y)
        return ((y / levels) ** p * torch.sign(s) * a).view(-1)[:n].view_as(x)
    return q


def ours(x, signed):
    c, a = fmt.quantize_blockwise(x, signed, BLOCK)
    return fmt.dequantize_blockwise(c, a, signed, BLOCK).view_as(x)


LOWBIT = "lowbit v1 (m sqrt, v 4th root)"


def codecs():
    out = {LOWBIT: ours, "power m^3 / v^6": power_codec(3, 6), "linear m / v^2": power_codec(1, 2)}
    try:
        import bitsandbytes.functional as bf

        out["bnb dynamic maps"] = table_codec(bf.create_dynamic_map(True), bf.create_dynamic_map(False))
    except Exception:  # bitsandbytes missing or broken: compare the rest
        pass
    return out


def update_error(steps: int, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = batches(token_splits()[0], 16, 128, seed)
    params = [p for p in model.parameters() if p.numel() >= 4096]
    cs = codecs()
    state = {k: [(torch.zeros_like(p), torch.zeros_like(p)) for p in params] for k in cs}
    m32 = [torch.zeros_like(p) for p in params]
    v32 = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    errs = {k: [] for k in cs}
    for t in range(1, steps + 1):
        x, y = next(it)
        opt.zero_grad()
        model.loss(x, y).backward()
        for i, p in enumerate(params):
            g = p.grad
            m32[i].mul_(b1).add_(g, alpha=1 - b1)
            v32[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            u32 = (m32[i] / (1 - b1**t)) / ((v32[i] / (1 - b2**t)).sqrt() + eps)
            for k, q in cs.items():
                m, v = state[k][i]
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
                if t % 10 == 0 or t == steps:
                    errs[k].append(((u - u32).norm() / u32.norm()).item())
                state[k][i] = (q(m, True), q(v, False))
        opt.step()
    return {k: sum(e) / len(e) for k, e in errs.items()}


def encode_speed(n=1 << 24) -> dict[str, float]:
    x = torch.randn(n) * torch.rand(n) ** 4
    out = {}
    for k, q in codecs().items():
        q(x[: 1 << 16], True)
        t = time.perf_counter()
        q(x, True)
        q(x * x, False)
        out[k] = 2 * n / (time.perf_counter() - t) / 1e6
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--quick", action="store_true", help="40 steps")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.steps = 40
    err = update_error(args.steps)
    speed = encode_speed()
    print(f"{'codec':<34}{'update err':>11}{'round trip Melem/s':>20}")
    for k in err:
        print(f"{k:<34}{err[k]:>11.4f}{speed[k]:>20.1f}")
    save(args.out, dict(update_error=err, round_trip_melem_per_s=speed, steps=args.steps,
                        update_error_vs_bnb=next((err[LOWBIT] / v for k, v in err.items() if k.startswith("bnb")), None)))


if __name__ == "__main__":
    main()
