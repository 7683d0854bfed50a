"""Candidate 8-bit codecs for a cheaper state format, measured the way ``codec_drift.py`` measures the
shipped one: lr = 0, the same gradient streams, the state decoded after every step and compared with
fp32 moments, thousands of re-encodings without resync.

    python benchmarks/codec_candidates.py [--quick] [--steps 3000] [--out benchmarks/results/codec_candidates.json]

Why: format v4's step is compute-bound (docs/results.md: 1.8-2.8x torch's fused AdamW on the CPU, about
twice its memory floor statically on an H100). Most of its arithmetic is in the codecs: four IEEE square
roots per element (one shared with the update), both v maps evaluated per element, the companding
levels. A code built from a float's exponent and mantissa bits needs no root and no level arithmetic:
encoding is an integer add (the dither, below the kept mantissa bits) and a shift; decoding is a shift
and one multiply. This measures what that costs in fidelity before any kernel is written.

Each candidate is a pure-PyTorch codec pair, simulated by ``CodecSim`` (an optimizer with lr = 0) with the
format's kind of dither (a Weyl sequence over the steps from a random start per element):

* ``v4sim``: format v4 itself (m square-root companding to nearest; v map A, fourth-root companding
  unbiased in 1/sqrt(v), and map B, linear on [1/2, 1], for blocks whose v all lie within a factor 2 of
  the largest): it checks the simulation against ``lowbit_8bit``, the shipped codec.
* ``vE5M3`` / ``vE4M4``: v as an unsigned float of 5 (4) exponent and 3 (4) mantissa bits relative to the
  block maximum (codes span 2^-31 (2^-15) .. 1, 12.5% (6.25%) apart), dithered unbiased in v.
* ``vSqrt``: v linear in sqrt(v): r = sqrt(v) / sqrt(max), code = floor(255 r + u); sqrt(v) is the root the
  update takes anyway, 1 / sqrt(max) one root per block.
* ``vHybK``: ``vSqrt`` for blocks whose v all lie within a factor K of the largest, ``vE4M4`` for the rest.
* ``+B``: map B kept for blocks within a factor 2, as in v4. A block then has one of three maps (two bits
  of the block's scale in a format; a separate tensor here).
* ``+mE4M3`` / ``+mE3M4`` / ``+mlin``: m as sign and a 7-bit float (4 or 3 exponent bits), or linear, round to
  nearest; without these m is v4's square-root companding.
"""
from __future__ import annotations


import torch

import codec_drift
from benchlib import save

BLOCK = 256
CANDIDATES = ("v4sim", "vE4M4+B", "vSqrt+B", "vHyb64", "vHyb64+B", "vHyb16+B", "vHyb256+B", "vHyb64+B+mE4M3")


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = x.numel()
    pad = (-n) % BLOCK
    return torch.nn.functional.pad(x.reshape(-1), (0, pad)).view(-1, BLOCK), n


def _float_code(s: torch.Tensor, exp_bits: int, man_bits: int, u: torch.Tensor | None) -> torch.Tensor:
    """Code of s in [0, 1] as the top bits of its fp32 pattern: exponent relative to 2^0 (2^exp_bits - 1 binades)
    and ``man_bits`` of mantissa. ``u`` in [0, 1): add u units of the last kept bit below it (unbiased in value);
    None: round to nearest. Below the lowest binade the code is 0."""
    shift = 23 - man_bits
    bits = s.float().contiguous().view(torch.int32).to(torch.int64)
    add = (u * (1 << shift)).floor().to(torch.int64) if u is not None else torch.full_like(bits, 1 << (shift - 1))
    top = (bits + add) >> shift
    lowest = (127 - (1 << exp_bits) + 1) << man_bits  # the code of 2^-(2^exp_bits - 1)
    return (top - lowest).clamp(0, ((1 << exp_bits) - 1) << man_bits)


def _float_level(code: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    lowest = (127 - (1 << exp_bits) + 1) << man_bits
    return ((code.to(torch.int64) + lowest) << (23 - man_bits)).to(torch.int32).view(torch.float32)


def encode_m(m: torch.Tensor, kind: str):
    x, n = _blocks(m)
    a = x.abs().amax(1, keepdim=True)
    s = torch.where(a > 0, x / torch.where(a > 0, a, 1), 0)
    if kind == "sqrt":
        q = torch.floor(s.abs().sqrt() * 127 + 0.5).clamp(max=127) * s.sign()
    elif kind == "lin":
        q = torch.floor(s.abs() * 127 + 0.5) * s.sign()
    else:  # E4M3 / E3M4
        e, mb = (4, 3) if kind == "E4M3" else (3, 4)
        q = torch.where(s == 0, 0, _float_code(s.abs(), e, mb, None) + 1) * s.sign()  # 0 is zero, 1.. the levels
    return q, a, n


def decode_m(q, a, n, kind: str):
    if kind == "sqrt":
        y = q / 127
        x = y * y.abs() * a
    elif kind == "lin":
        x = q / 127 * a
    else:
        e, mb = (4, 3) if kind == "E4M3" else (3, 4)
        x = torch.where(q == 0, 0.0, _float_level(q.abs() - 1, e, mb)) * q.sign() * a
    return x.reshape(-1)[:n]


def _sqrt_linear(x, a, u):
    r = torch.where(a > 0, x.sqrt() * (1 / torch.where(a > 0, a, 1).sqrt()), 0)
    q = torch.floor(r * 255 + u).clamp(max=255)
    return torch.where((x > 0) & (q == 0), 1.0, q)


def _maps(kind: str) -> tuple[str, str | None, bool]:
    """(the map for spread blocks, the map for blocks within a factor k or None, map B for blocks within 2)."""
    wide = "A" if kind == "v4sim" else "E5M3" if "E5M3" in kind else "E4M4" if ("E4M4" in kind or "Hyb" in kind) else "sqrt"
    near = "sqrt" if "Hyb" in kind else None
    return wide, near, kind == "v4sim" or "+B" in kind


def encode_v(v: torch.Tensor, kind: str, u: torch.Tensor):
    """(codes, block maxima, map per block: 0 the wide map, 1 linear in sqrt(v), 2 map B, n)."""
    x, n = _blocks(v)
    a = x.amax(1, keepdim=True)
    s = torch.where(a > 0, x / torch.where(a > 0, a, 1), 0)
    valid = torch.arange(x.numel()).view_as(x) < n
    low = torch.where(valid, s, 1.0).amin(1, keepdim=True)
    u = _blocks(u)[0]
    wide, near, with_b = _maps(kind)
    if wide == "A":  # v4's map A: fourth-root companding, unbiased in 1/sqrt(v)
        r = s.sqrt()
        lo = torch.floor(r.sqrt() * 255).clamp(max=254)
        lo_l, hi_l = (lo / 255) ** 2, ((lo + 1) / 255) ** 2
        q = lo + (((u * (hi_l - lo_l)) * r < (r - lo_l) * hi_l) | (s >= 1)).float()
        q = torch.where((x > 0) & (q == 0), 1.0, q)
    elif wide == "sqrt":
        q = _sqrt_linear(x, a, u)
    else:
        e, mb = (5, 3) if wide == "E5M3" else (4, 4)
        q = _float_code(s, e, mb, u).float()
    which = torch.zeros_like(a, dtype=torch.int64)
    if near is not None:
        k = float(kind.split("Hyb")[1].split("+")[0])
        use = (low >= 1 / k) & (a > 0)
        q, which = torch.where(use, _sqrt_linear(x, a, u), q), torch.where(use, 1, which)
    if with_b:  # v4's map B: linear on [1/2, 1], unbiased in v
        lo_b = torch.floor(s * 510 - 255).clamp(0, 254)
        q_b = lo_b + ((s - (lo_b + 255) / 510) > u * (1 / 510)).float()
        use = (low >= 0.5) & (a > 0)
        q, which = torch.where(use, q_b, q), torch.where(use, 2, which)
    return q, a, which, n


def decode_v(q, a, which, n, kind: str):
    wide, _, _ = _maps(kind)
    if wide == "A":
        level = (q / 255) ** 4
    elif wide == "sqrt":
        level = (q / 255) ** 2
    else:
        e, mb = (5, 3) if wide == "E5M3" else (4, 4)
        level = _float_level(q.long(), e, mb)
    level = torch.where(which == 1, (q / 255) ** 2, torch.where(which == 2, (q + 255) / 510, level))
    return (level * a).reshape(-1)[:n]


class CodecSim(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) whose moments go through a candidate codec after every
    step, as AdamW8bit's do: tensors under ``min_8bit_size`` elements keep fp32 moments, as there. With
    lr = 0 (``codec_drift``) the parameters never move and what is read back is the codec alone; with a
    learning rate (``convergence.py``'s ``cand:`` names) it trains."""

    def __init__(self, params, kind: str, lr: float = 0.0, weight_decay: float = 1e-2, min_8bit_size: int = 4096,
                 seed: int = 0):
        self.v_kind = kind
        self.m_kind = next((k for k in ("E4M3", "E3M4", "lin") if "+m" + k in kind), "sqrt")
        self.min_8bit_size = min_8bit_size
        self.gen = torch.Generator().manual_seed(seed)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        b1, b2 = codec_drift.B1, codec_drift.B2
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                g = p.grad.reshape(-1).float()
                if not st:
                    st["t"] = 0
                    st["start"] = torch.rand(g.numel(), generator=self.gen, dtype=torch.float64)
                m, v = self.decoded(p) if "m" in st else (torch.zeros_like(g), torch.zeros_like(g))
                m = m * b1 + g * (1 - b1)
                v = v * b2 + g * g * (1 - b2)
                st["t"] += 1
                t = st["t"]
                if group["lr"]:
                    update = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + codec_drift.EPS)
                    p.mul_(1 - group["lr"] * group["weight_decay"]).sub_(group["lr"] * update.view_as(p))
                if g.numel() < self.min_8bit_size:
                    st["m"], st["v"] = m, v
                    continue
                # the format's kind of dither (lowbit_adamw.format.rng): a Weyl sequence over the steps from a random
                # start per element, not independent draws (equidistributed dithers keep v's random walk short)
                u = torch.frac(st["start"] + t * 0.6180339887498949).float()
                st["m"] = encode_m(m, self.m_kind)
                st["v"] = encode_v(v, self.v_kind, u)

    def decoded(self, p):
        st = self.state[p]
        if isinstance(st["m"], torch.Tensor):
            return st["m"], st["v"]
        return decode_m(*st["m"], self.m_kind), decode_v(*st["v"], self.v_kind)


def main():
    args = codec_drift.parse_args(__doc__, candidates=",".join(CANDIDATES))
    names = ["lowbit_8bit"] + ["cand:" + c for c in args.candidates.split(",")]
    runs = [codec_drift.run_stream(s, args.steps, names, args.quick) for s in args.streams.split(",")]
    codec_drift.print_table(runs, width=24)
    save(args.out, dict(block_size=BLOCK, runs=runs))


if __name__ == "__main__":
    main()
