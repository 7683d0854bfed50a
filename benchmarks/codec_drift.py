"""Do the 8- and 4-bit states stay true over long runs? Each optimizer's state, decoded, against fp32
AdamW's moments for the same gradients, over thousands of steps and with no resync.

    python benchmarks/codec_drift.py [--quick] [--steps 3000] [--out benchmarks/results/codec_drift_cpu.json]

Every optimizer (lowbit 8/4-bit, bitsandbytes AdamW8bit, torchao AdamW8bit/AdamW4bit) gets the same
gradient stream with lr = 0, so the gradients never depend on its own state: what is measured is the
codec alone, compounded over re-encodings. After each step its state is decoded (each library's own
dequantization) and compared with fp32 moments m_ref, v_ref tracking the same gradients:

* v bias: mean(v - v_ref) / mean(v_ref); m bias: the shrink of m along its own sign,
  mean((m - m_ref) * sign(m_ref)) / mean(|m_ref|);
* update error: ||u - u_ref|| / ||u_ref||, u the update the step applies (in units of lr): from the
  state decoded after the previous step and this step's gradient, u = (m / bc1) / (sqrt(v / bc2) + eps)
  with m = beta1 m_prev + (1 - beta1) g and v = beta2 v_prev + (1 - beta2) g^2;
* largest single update: max |u| over all elements and steps (fp32 AdamW's is printed beside it).

Gradient streams: ``noise``, one 64x1024 fp32 tensor of stationary unit Gaussian noise (every v of a
block within a few % of the others); ``noise-spread``, the same with each element's standard deviation
fixed and log-uniform over two decades (v spans four decades within a block); ``tinylm``, the real
gradients of the TinyLM (Python stdlib text) trained by fp32 AdamW, fed to every optimizer as it trains.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from benchlib import save

B1, B2, EPS = 0.9, 0.999, 1e-8
PEERS = ("lowbit_8bit", "lowbit_4bit", "bnb_8bit", "torchao_8bit", "torchao_4bit")
REPORT_AT = (30, 300, 1000, 2000, 3000, 5000, 10000)


def make(name, params):
    if name.startswith("cand:"):  # a candidate codec (codec_candidates.py)
        from codec_candidates import CodecSim

        return CodecSim(params, name[5:], min_8bit_size=0)
    if name.startswith("lowbit"):
        from lowbit_adamw import AdamW8bit

        return AdamW8bit(params, lr=0.0, weight_decay=0.0, bits=4 if "4bit" in name else 8)
    if name == "bnb_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=0.0, weight_decay=0.0)
    from torchao.optim import AdamW4bit, AdamW8bit as TorchaoAdamW8bit

    return (AdamW4bit if name == "torchao_4bit" else TorchaoAdamW8bit)(params, lr=0.0, weight_decay=0.0)


def decoded(name, opt, p):
    """(m, v) of parameter p as fp32 flat tensors, through the library's own decoding."""
    if name.startswith("cand:"):
        return opt.decoded(p)
    s = opt.state[p]
    if name.startswith("lowbit"):
        from lowbit_adamw import format as fmt

        group = opt.param_groups[0]
        out = []
        for key in ("exp_avg", "exp_avg_sq"):
            if key + "_codes" in s:
                out.append(fmt.dequantize_blockwise(s[key + "_codes"], s[key + "_absmax"], fmt.is_signed(key),
                                                    group["block_size"], group["bits"], numel=p.numel()))
            else:
                out.append(s[key].reshape(-1).float())
        return out
    if name == "bnb_8bit":
        if s["state1"].dtype != torch.uint8:
            return s["state1"].reshape(-1).float(), s["state2"].reshape(-1).float()
        import bitsandbytes.functional as BF

        return [BF.dequantize_blockwise(s[k], absmax=s["absmax" + i], code=s["qmap" + i], blocksize=256).reshape(-1)
                for k, i in (("state1", "1"), ("state2", "2"))]
    return [(t.dequantize() if hasattr(t, "dequantize") else t).reshape(-1).float() for t in (s["exp_avg"], s["exp_avg_sq"])]


class Tracker:
    """The running figures of one optimizer: ``prev`` is its state decoded after the last step."""

    def __init__(self, numel):
        self.max_update = 0.0
        self.rows = []
        self.prev = (torch.zeros(numel), torch.zeros(numel))

    def update(self, step, g, m, v, m_ref, v_ref, u_ref):
        bc1, bc2 = 1 - B1**step, 1 - B2**step
        m_applied = self.prev[0] * B1 + g * (1 - B1)
        v_applied = self.prev[1] * B2 + g * g * (1 - B2)
        u = (m_applied / bc1) / (torch.sqrt(v_applied / bc2) + EPS)
        self.prev = (m, v)
        self.max_update = max(self.max_update, float(u.abs().max()))
        if step in REPORT_AT:
            sign = torch.sign(m_ref)
            self.rows.append(dict(step=step, v_bias=float((v - v_ref).mean() / v_ref.mean()),
                                  m_bias=float(((m - m_ref) * sign).mean() / m_ref.abs().mean()),
                                  update_error=float((u - u_ref).norm() / u_ref.norm()), max_update=self.max_update,
                                  max_update_fp32=None))


def run_stream(stream, steps, peers, quick):
    torch.manual_seed(0)
    if stream == "tinylm":
        from lowbit_adamw.tinylm import TinyLM, batches, token_splits

        size = dict(dim=64, layers=2, seq_len=64) if quick else dict(dim=128, layers=4, seq_len=128)
        model = TinyLM(**size)
        teacher = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = batches(token_splits()[0], 16, size["seq_len"], seed=0)
        shapes = [p.shape for p in model.parameters()]
    else:
        shapes = [(64, 1024)]
        gen = torch.Generator().manual_seed(1)
        sigma = 10.0 ** (-2 * torch.rand(shapes[0], generator=gen)) if stream == "noise-spread" else torch.ones(shapes[0])
    params = {name: [torch.nn.Parameter(torch.zeros(s)) for s in shapes] for name in peers}
    opts = {name: make(name, params[name]) for name in peers}
    m_ref = [torch.zeros(math.prod(s)) for s in shapes]
    v_ref = [torch.zeros(math.prod(s)) for s in shapes]
    trackers = {name: Tracker(sum(math.prod(s) for s in shapes)) for name in peers}
    ref_max, seconds = 0.0, {name: 0.0 for name in peers}
    for step in range(1, steps + 1):
        if stream == "tinylm":
            x, y = next(data)
            teacher.zero_grad()
            model.loss(x, y).backward()
            grads = [p.grad.detach().clone() for p in model.parameters()]
            teacher.step()
        else:
            grads = [torch.randn(shapes[0], generator=gen) * sigma]
        for mr, vr, g in zip(m_ref, v_ref, grads):
            g = g.reshape(-1)
            mr.mul_(B1).add_(g * (1 - B1))
            vr.mul_(B2).add_(g * g * (1 - B2))
        bc1, bc2 = 1 - B1**step, 1 - B2**step
        m_all, v_all, g_all = torch.cat(m_ref), torch.cat(v_ref), torch.cat([g.reshape(-1) for g in grads])
        u_ref = (m_all / bc1) / (torch.sqrt(v_all / bc2) + EPS)
        ref_max = max(ref_max, float(u_ref.abs().max()))
        for name in peers:
            for p, g in zip(params[name], grads):
                p.grad = g.clone()
            t = time.perf_counter()
            opts[name].step()
            seconds[name] += time.perf_counter() - t
            mv = [decoded(name, opts[name], p) for p in params[name]]
            trackers[name].update(step, g_all, torch.cat([a for a, _ in mv]), torch.cat([b for _, b in mv]), m_all, v_all, u_ref)
        for name in peers:
            if trackers[name].rows and trackers[name].rows[-1]["step"] == step:
                trackers[name].rows[-1]["max_update_fp32"] = ref_max
        if step in REPORT_AT or step == steps:
            print(f"[{stream}] step {step}: " + ", ".join(
                f"{n} v {trackers[n].rows[-1]['v_bias']:+.3f} err {trackers[n].rows[-1]['update_error']:.3f}"
                for n in peers if trackers[n].rows and trackers[n].rows[-1]["step"] == step), flush=True)
    return dict(stream=stream, steps=steps, max_update_fp32=ref_max,
                results={n: dict(rows=trackers[n].rows, step_seconds=seconds[n]) for n in peers})


def parse_args(doc: str, **extra):
    """The command line of a drift run, with ``extra`` options (name -> default); the steps to report set from it."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 steps, a smaller TinyLM")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--streams", default="noise,noise-spread,tinylm")
    for name, default in extra.items():
        ap.add_argument(f"--{name}", default=default)
    ap.add_argument("--out")
    args = ap.parse_args()
    global REPORT_AT
    args.steps = 300 if args.quick else args.steps
    REPORT_AT = tuple(s for s in REPORT_AT if s < args.steps) + (args.steps,)
    return args


def main():
    args = parse_args(__doc__, optimizers=",".join(PEERS))
    runs = [run_stream(s, args.steps, args.optimizers.split(","), args.quick) for s in args.streams.split(",")]
    print_table(runs)
    save(args.out, dict(runs=runs))


def print_table(runs, width=15):
    """The last report of every optimizer in every stream, one line each."""
    print(f"\n{'stream':<13}{'optimizer':<{width}}{'v bias':>9}{'m bias':>9}{'update err':>12}{'max update':>12}{'(fp32)':>8}")
    for r in runs:
        for name, res in r["results"].items():
            last = res["rows"][-1]
            print(f"{r['stream']:<13}{name:<{width}}{last['v_bias']:>+9.4f}{last['m_bias']:>+9.4f}{last['update_error']:>12.4f}"
                  f"{last['max_update']:>12.2f}{r['max_update_fp32']:>8.2f}")


if __name__ == "__main__":
    main()
