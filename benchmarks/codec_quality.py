"""Which code maps? Update error against fp32 AdamW on real gradients, and encode speed.

    python benchmarks/codec_quality.py [--quick] [--steps 120] [--out benchmarks/results/codec_quality.json]

A TinyLM trains on Python stdlib text with fp32 AdamW. Every codec tracks its own m and v from the same
gradients (teacher forcing: no trajectory divergence), requantizing after each step, and we compare its
AdamW update direction m_hat / (sqrt(v_hat) + eps) with fp32's: relative L2 error, mean over steps.

Candidates, at 8 bits (blocks of 256) and at 4 bits (blocks of 128 unless named):
* ``lowbit``: the shipped codec (``lowbit_adamw.format``) at that width. 8 bits: m = sign(y) y^2
  (square-root companding) on 127 levels a side, v = y^4 on 255 levels with a zero-point guard. 4 bits:
  m on the 16-level dynamic-exponent map, v on the zero-free linear map (c + 1) / 16;
* the format-v2 4-bit m map (square-root companding on 7 levels a side);
* other companding powers, and bitsandbytes' dynamic (tree) maps with nearest-entry search;
* ``+ stochastic v``: v rounded up or down between its two neighbouring levels with the probability
  that makes the decoded value unbiased (a small change of v survives on average instead of being
  rounded away: the "v stagnation" of deterministic rounding);
* the 4-bit optimizer paper's (Li et al. 2023) rank-1 normalization of v: each element scaled by
  min(its row's max, its column's max) instead of a block scale (2-D tensors).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchlib import save
from lowbit_adamw import format as fmt
from lowbit_adamw.tinylm import TinyLM, batches, token_splits


def _blocks(x, block):
    n = x.numel()
    return torch.nn.functional.pad(x.reshape(-1), (0, (-n) % block)).view(-1, block), n


def _normalized(x, signed, block, rank1):
    """(s in [-1, 1] or [0, 1], scale to multiply back, shape restorer)."""
    if rank1 and not signed and x.dim() == 2:
        scale = torch.minimum(x.amax(1, keepdim=True), x.amax(0, keepdim=True))
        return torch.where(scale > 0, x / scale, x), scale, lambda y: y
    xp, n = _blocks(x, block)
    a = xp.abs().amax(1, keepdim=True)
    return torch.where(a > 0, xp / a, xp), a, lambda y: y.reshape(-1)[:n].view_as(x)


def _stochastic_pick(s, lo, hi, generator):
    """lo or hi (decoded levels around s) with P(hi) = (s - lo) / (hi - lo): unbiased."""
    gap = hi - lo
    p = torch.where(gap > 0, (s - lo) / torch.where(gap > 0, gap, 1), torch.zeros_like(s))
    return torch.where(torch.rand(s.shape, generator=generator) < p, hi, lo)


def power_codec(bits, a_m, b_v, block, stochastic_v=False, rank1=False):
    """m = sign(y) y^a_m, v = y^b_v on 2^(bits-1)-1 / 2^bits-1 levels, rounded in the companded domain."""
    gen = torch.Generator().manual_seed(0)

    def q(x, signed):
        s, a, back = _normalized(x, signed, block, rank1)
        levels, p = (2 ** (bits - 1) - 1, a_m) if signed else (2**bits - 1, b_v)
        y = s.abs() ** (1 / p) * levels
        if stochastic_v and not signed:
            lo = torch.floor(y)
            r = _stochastic_pick(s.abs(), (lo / levels) ** p, (torch.clamp(lo + 1, max=levels) / levels) ** p, gen)
            return back(r * a)
        y = torch.floor(y + 0.5)
        if not signed:
            y = torch.where((s > 0) & (y == 0), torch.ones_like(y), y)
        return back((y / levels) ** p * torch.sign(s) * a)
    return q


def table_codec(mtab, vtab, block_m, block_v, rank1=False, stochastic_v=False):
    """Nearest entry of sorted tables (bitsandbytes' and torchao's rule), zero-point guard for v."""
    gen = torch.Generator().manual_seed(0)

    def q(x, signed):
        tab = mtab if signed else vtab
        s, a, back = _normalized(x, signed, block_m if signed else block_v, rank1)
        if stochastic_v and not signed:
            i = torch.clamp(torch.bucketize(s, tab) - 1, 0, len(tab) - 2)
            return back(_stochastic_pick(s, tab[i], tab[i + 1], gen).clamp_min(tab[0] if tab[0] > 0 else 0) * a)
        c = torch.bucketize(s, (tab[1:] + tab[:-1]) / 2)
        if not signed:
            c = torch.where((s > 0) & (tab[c] == 0), c + 1, c)
        return back(tab[c] * a)
    return q


def lowbit(bits, block):
    def q(x, signed):
        c, a = fmt.quantize_blockwise(x, signed, block, bits=bits)
        return fmt.dequantize_blockwise(c, a, signed, block, bits=bits, numel=x.numel()).view_as(x)
    return q


LOWBIT8 = "8-bit lowbit (m sqrt, v 4th root)"
BNB8 = "8-bit bnb dynamic maps"


def codecs():
    zero_free16 = torch.linspace(0, 1, 17)[1:]
    out = {
        LOWBIT8: lowbit(8, 256),
        "8-bit lowbit + stochastic v": power_codec(8, 2, 4, 256, stochastic_v=True),
        "8-bit power m^3 / v^6": power_codec(8, 3, 6, 256),
        "8-bit power m^3 / v^6 + stochastic v": power_codec(8, 3, 6, 256, stochastic_v=True),
        "8-bit linear m / v^2": power_codec(8, 1, 2, 256),
        "4-bit lowbit (m dynamic exponent, v zero-free linear) B128": lowbit(4, 128),
        "4-bit lowbit B256": lowbit(4, 256),
        "4-bit lowbit B64 (1.125 B/param)": lowbit(4, 64),
        "4-bit lowbit + stochastic v B128": table_codec(_m4_table(), zero_free16, 128, 128, stochastic_v=True),
        "4-bit m DE, v zero-free linear rank-1 (paper)": table_codec(_m4_table(), zero_free16, 128, 128, rank1=True),
        "4-bit m sqrt, v zero-free linear B128 (format v2)": table_codec(_sqrt_table(4), zero_free16, 128, 128),
        "4-bit m sqrt, v zero-free linear rank-1": table_codec(_sqrt_table(4), zero_free16, 128, 128, rank1=True),
        "4-bit m sqrt, v 4th root B128": power_codec(4, 2, 4, 128),
        "4-bit power m^3 / v^6 B128": power_codec(4, 3, 6, 128),
    }
    try:
        import bitsandbytes.functional as bf

        out[BNB8] = table_codec(bf.create_dynamic_map(True), bf.create_dynamic_map(False), 256, 256)
    except Exception:  # bitsandbytes missing or broken: compare the rest
        pass
    return out


def _m4_table():
    return torch.tensor(fmt.M4_LEVELS)


def _sqrt_table(bits):
    """Square-root companded m levels: sign(q) (q / L)**2, q in -L..L."""
    levels = 2 ** (bits - 1) - 1
    q = torch.arange(-levels, levels + 1, dtype=torch.float64)
    return (torch.sign(q) * (q / levels) ** 2).float()


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


def encode_speed(n=1 << 22) -> dict[str, float]:
    x = (torch.randn(n) * torch.rand(n) ** 4).view(-1, 1024)
    out = {}
    for k, q in codecs().items():
        q(x[:64], True)
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
    bnb = err.get(BNB8)
    print(f"{'codec':<48}{'update err':>11}{'vs bnb 8-bit':>14}{'round trip Melem/s':>20}")
    for k in err:
        print(f"{k:<48}{err[k]:>11.4f}{(err[k] / bnb if bnb else float('nan')):>14.2f}{speed[k]:>20.1f}")
    save(args.out, dict(update_error=err, round_trip_melem_per_s=speed, steps=args.steps,
                        update_error_vs_bnb={k: e / bnb for k, e in err.items()} if bnb else None))


if __name__ == "__main__":
    main()
