"""``lowbit-adamw`` / ``python -m lowbit_adamw``: the command line.

With no arguments it runs ``train``: a tiny byte-level causal LM trained offline on Python's own
standard-library source with ``torch.optim.AdamW`` and with ``AdamW8bit``, for 3 seeds (per seed both
from the same initial weights and the same batches, with the recipe a fine-tuning script uses: linear
warmup, cosine decay to a tenth, gradients clipped to norm 1), then a table of losses and optimizer-state
memory and the held-out difference per seed beside their mean. At this size one seed's difference is mostly
noise, so the verdict weighs the mean against the seeds' spread and, where it does not stand out, says
how large a difference the run can rule out.

New subcommands register themselves in ``SUBCOMMANDS`` (name -> (help, add_arguments, run)).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

# torch and the package are imported where a command runs, not here: ``--help`` answers at once.


def _torch_adamw(params, lr):
    import torch

    return torch.optim.AdamW(params, lr=lr)


def _adamw8bit(params, lr):
    from .optimizer import AdamW8bit

    return AdamW8bit(params, lr=lr)


OPTIMIZERS = {"adamw": _torch_adamw, "adamw8bit": _adamw8bit}


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # a plain fallback: one line, rewritten
        class _Bar:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def set_postfix(self, **kw):
                pass

            def close(self):
                print(file=sys.stderr)

        return _Bar()


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The learning rate's multiplier at ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine
    decay to a tenth at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_compare(optimizers=("adamw", "adamw8bit"), steps=180, lr=2e-3, batch_size=16, seq_len=128, dim=128,
                  layers=4, seed=0, seeds=1, warmup=18, max_grad_norm=1.0, progress=True) -> list[dict]:
    """Train the built-in TinyLM with each optimizer from one init and one batch order per seed, for
    ``seeds`` seeds from ``seed`` on, under the same schedule (``lr_factor``) and gradient clipping
    (``max_grad_norm``; None: none). Per optimizer: the means over the seeds, and each seed's held-out loss.
    Without clipping torch's AdamW has loss spikes on some seeds at this size, which dominate a comparison."""
    import torch

    from .memory import optimizer_state_bytes
    from .tinylm import TinyLM, batches, held_out_loss, token_splits

    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    train_tokens, val_tokens = token_splits()
    runs = {name: [] for name in optimizers}
    bar = _progress(steps * len(optimizers) * seeds, "training") if progress else None
    for s in range(seed, seed + seeds):
        for name in optimizers:
            torch.manual_seed(s)
            model = TinyLM(dim=dim, layers=layers, seq_len=seq_len)
            opt = OPTIMIZERS[name](model.parameters(), lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps, warmup))
            data = batches(train_tokens, batch_size, seq_len, s)
            losses, t0 = [], time.perf_counter()
            for _ in range(steps):
                x, y = next(data)
                opt.zero_grad(set_to_none=True)
                loss = model.loss(x, y)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                opt.step()
                schedule.step()
                losses.append(loss.item())
                if bar:
                    bar.update(1)
                    bar.set_postfix(seed=s, optimizer=name, loss=f"{loss.item():.3f}")
            elapsed = time.perf_counter() - t0
            tail = losses[-20:]
            runs[name].append(dict(seed=s, train_loss=sum(tail) / len(tail), held_out_loss=held_out_loss(model, val_tokens, seq_len),
                                   seconds_per_step=elapsed / steps, params=sum(p.numel() for p in model.parameters()),
                                   state_bytes=optimizer_state_bytes(opt)["total"]))
    if bar:
        bar.close()
    results = []
    for name, rs in runs.items():
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        results.append(dict(optimizer=name, params=rs[0]["params"], seeds=[r["seed"] for r in rs],
                            train_loss=mean("train_loss"), held_out_loss=mean("held_out_loss"),
                            held_out_losses=[r["held_out_loss"] for r in rs], state_bytes=rs[0]["state_bytes"],
                            state_bytes_per_param=rs[0]["state_bytes"] / rs[0]["params"],
                            seconds_per_step=mean("seconds_per_step")))
    return results


def held_out_gaps(base: dict, other: dict) -> list[float]:
    """Per seed, ``other``'s held-out loss relative to ``base``'s (same init and batches), in percent."""
    return [100 * (o / b - 1) for b, o in zip(base["held_out_losses"], other["held_out_losses"])]


def _print_table(rows: list[dict]) -> None:
    head = f"{'optimizer':<12}{'train loss':>12}{'held-out':>10}{'state MiB':>11}{'B/param':>9}{'ms/step':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['optimizer']:<12}{r['train_loss']:>12.4f}{r['held_out_loss']:>10.4f}"
            f"{r['state_bytes'] / 2**20:>11.3f}{r['state_bytes_per_param']:>9.3f}{1000 * r['seconds_per_step']:>9.1f}"
        )
    if len(rows) > 1 and rows[0]["state_bytes"]:
        base = rows[0]
        for r in rows[1:]:
            gaps = held_out_gaps(base, r)
            mean = sum(gaps) / len(gaps)
            spread = f"; per seed {', '.join(f'{g:+.2f}%' for g in gaps)}" if len(gaps) > 1 else ""
            print(f"{r['optimizer']}: {100 * (1 - r['state_bytes'] / base['state_bytes']):.1f}% less optimizer state than "
                  f"{base['optimizer']}, held-out loss {mean:+.2f}% (mean of {len(gaps)} seed{'s' if len(gaps) > 1 else ''}"
                  f"{spread}){verdict(gaps, base['optimizer'])}")


# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom; with 3 seeds the mean's interval is
# 4.3 standard errors wide each side, not 2 (two standard errors would call one seed set in four "beyond noise").
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def verdict(gaps: list[float], base: str) -> str:
    """Whether a mean gap stands out of the seed-to-seed noise (its 95% interval, Student's t over the seeds,
    excludes 0), and where it does not, the largest difference the run leaves open: the interval's far end.
    The sign of a mean inside the noise is whichever seed set came up, so the verdict does not give it."""
    if len(gaps) < 2:
        return ": one seed says nothing about noise (--seeds 3)"
    mean = sum(gaps) / len(gaps)
    se = (sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1) / len(gaps)) ** 0.5
    half = (_T95[len(gaps) - 2] if len(gaps) <= len(_T95) + 1 else 1.96) * se
    if abs(mean) <= half:
        return (f": no difference beyond seed-to-seed noise (95% interval of the mean: +-{half:.2f}%); "
                f"within {abs(mean) + half:.1f}% of {base}'s")
    return f": {'higher' if mean > 0 else 'lower'} than {base}'s beyond seed-to-seed noise (95% interval of the mean: +-{half:.2f}%)"


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizers", default="adamw,adamw8bit", help="comma-separated, from: " + ", ".join(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=180)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=18, help="linear warmup steps, then cosine decay to a tenth")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: no clipping)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (from --seed on); each optimizer runs once per seed")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true")


def _run_train(args) -> int:
    rows = train_compare(
        optimizers=[o.strip() for o in args.optimizers.split(",") if o.strip()], steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, seq_len=args.seq_len, dim=args.dim, layers=args.layers, seed=args.seed,
        seeds=args.seeds, warmup=args.warmup, max_grad_norm=args.max_grad_norm or None, progress=not args.no_progress,
    )
    print(f"TinyLM on Python stdlib text, {rows[0]['params']:,} parameters, {args.steps} steps, lr {args.lr} "
          f"(warmup {args.warmup}, cosine), grad-norm clip {args.max_grad_norm or 'none'}, "
          f"seeds {args.seed}..{args.seed + args.seeds - 1}")
    _print_table(rows)
    if args.json:
        import datetime
        import platform

        import torch

        meta = dict(machine=platform.machine(), cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                    python=platform.python_version(), date=datetime.date.today().isoformat(),
                    command="python -m lowbit_adamw " + " ".join(sys.argv[1:]))
        with open(args.json, "w") as f:
            json.dump(dict(results=rows, **meta), f, indent=2)
    return 0


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    from .memory.catalog import DEFAULT_OPTIMIZERS, MODEL_CONFIGS, OPTIMIZERS

    p.add_argument("model_name", nargs="?", metavar="MODEL", help="the same as --model")
    p.add_argument("--model", default="llama-2-7b",
                   help=f"built-in shape ({', '.join(['tinylm', *MODEL_CONFIGS])}; any case; their Hub ids too, e.g. "
                        "meta-llama/Llama-2-7b-hf), a path to a config.json, or a Hub id in the local cache (default llama-2-7b)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="e.g. 24GiB: also print whether each configuration fits (weights, "
                   "peak gradients, state, activations); --png then draws that chart with the GPU's line")
    p.add_argument("--host-memory", metavar="SIZE", help="e.g. 32GiB (with --gpu-memory): also the rows with optimizer state "
                   "in host memory (ours, torchao's and DeepSpeed's offload), with the host RAM each needs")
    p.add_argument("--batch", type=int, default=1, help="sequences per step, for the activations (with --gpu-memory)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence, for the activations (with --gpu-memory)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (with --gpu-memory)")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="step_in_backward_bucket_mb (with --gpu-memory)")
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help=f"comma list from: {', '.join(OPTIMIZERS)}")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="weight dtype (default: bf16 for the built-in LLMs, "
                   "as they are trained; a config's torch_dtype; else the model's own)")
    p.add_argument("--measure", action="store_true", help="also train a few real steps per optimizer and report what was held")
    p.add_argument("--steps", type=int, default=3, help="steps per optimizer with --measure")
    p.add_argument("--json", metavar="PATH", help="write the report(s) as JSON")
    p.add_argument("--png", metavar="PATH", help="write a chart (matplotlib); with --measure also PATH-measured.png")


def _run_memory(args) -> int:
    import torch

    from . import memory
    from .memory.models import default_dtype

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [n for n in names if n not in memory.OPTIMIZERS]
    if unknown:
        print(f"unknown optimizer(s) {', '.join(unknown)}; known: {', '.join(memory.OPTIMIZERS)}", file=sys.stderr)
        return 2
    model = args.model_name or args.model
    if dtype is None:
        dtype = default_dtype(model)
    try:
        reports = [memory.estimate(model, names, dtype=dtype)]
        fit = None
        if args.gpu_memory:
            from .memory.fit import fit_report

            fit = fit_report(model, args.gpu_memory, batch=args.batch, seq=args.seq, checkpointing=args.checkpointing,
                             dtype=dtype, bucket_mb=args.bucket_mb, host_memory=args.host_memory)
    except (ImportError, ValueError, OSError) as e:
        print(f"lowbit-adamw memory: {e}", file=sys.stderr)
        return 2
    print(reports[0].table())
    if fit is not None:
        print()
        print(fit.table())
    if args.measure:
        bar = _progress(len(names) * args.steps, "measuring")
        reports.append(memory.measure(model, names, steps=args.steps, dtype=dtype, progress=lambda name: (
            bar.set_postfix(optimizer=name), bar.update(1))))
        bar.close()
        print()
        print(reports[1].table())
        est, mea = reports
        worst = max(abs(e.state - m.state) / max(m.state, 1) for e, m in zip(est.rows, mea.rows))
        print(f"estimate vs measured optimizer state: largest difference {100 * worst:.3f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reports": [r.to_dict() for r in reports], "fit": fit.to_dict() if fit else None,
                       "command": "lowbit-adamw " + " ".join(sys.argv[1:])}, f, indent=1)
    try:
        if args.png and fit is not None:
            fit.plot(args.png)
        elif args.png:
            reports[0].plot(args.png)
            if args.measure:
                reports[1].plot(args.png.removesuffix(".png") + "-measured.png")
    except ImportError as e:
        written = "the table above and " + args.json if args.json else "the table above"
        print(f"lowbit-adamw memory: --png not written: {e}; {written} stand", file=sys.stderr)
        return 1
    return 0


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a Trainer checkpoint folder (its optimizer.pt) or an optimizer state file")
    p.add_argument("--to", required=True, choices=("torch", "bnb"),
                   help="torch: torch.optim.AdamW (Trainer optim adamw_torch...); bnb: bitsandbytes AdamW8bit (adamw_bnb_8bit, "
                        "adamw_8bit, paged_adamw_8bit)")
    p.add_argument("--min-8bit-size", type=int, default=4096,
                   help="with --to bnb: smaller tensors get 32-bit state, as bitsandbytes' min_8bit_size (default 4096)")


def _run_convert(args) -> int:
    """Rewrite an AdamW8bit optimizer state for another optimizer; the original is kept beside it."""
    from pathlib import Path

    import torch

    from . import migrate

    path = Path(args.checkpoint)
    path = path / "optimizer.pt" if path.is_dir() else path
    kept = path.with_name(path.stem + ".lowbit" + path.suffix)
    if not path.exists():
        print(f"lowbit-adamw convert: {path} does not exist", file=sys.stderr)
        return 2
    sd = torch.load(path, map_location="cpu", weights_only=True)
    kind = migrate.identify(sd)
    if kind != "lowbit":
        hint = f" (the AdamW8bit original is {kept})" if kept.exists() else ""
        print(f"lowbit-adamw convert: {path} holds {kind or 'an unknown'} optimizer state, not AdamW8bit's{hint}; "
              "AdamW8bit.load_state_dict reads torch, bitsandbytes and torchao state itself", file=sys.stderr)
        return 2
    try:
        out = migrate.lowbit_to_torch(sd) if args.to == "torch" else migrate.lowbit_to_bnb(sd, args.min_8bit_size)
    except (ValueError, ImportError) as e:
        print(f"lowbit-adamw convert: {e}", file=sys.stderr)
        return 2
    path.replace(kept)
    torch.save(out, path)
    target = "torch.optim.AdamW" if args.to == "torch" else "bitsandbytes AdamW8bit"
    print(f"{path}: {len(out['state'])} parameters' state written for {target}; the AdamW8bit original is {kept}")
    return 0


SUBCOMMANDS = {
    "convert": ("rewrite a checkpoint's AdamW8bit state for torch.optim.AdamW or bitsandbytes", _add_convert_args, _run_convert),
    "memory": ("memory report: weights, grads, optimizer state by kind, per optimizer", _add_memory_args, _run_memory),
    "train": ("train a tiny LM with AdamW and AdamW8bit side by side (the default)", _add_train_args, _run_train),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lowbit-adamw", description="AdamW with 8-bit blockwise state.")
    sub = parser.add_subparsers(dest="command")
    for name, (help_text, add_args, _) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # no subcommand: the default job
    args = parser.parse_args(argv)
    return SUBCOMMANDS[args.command][2](args)


if __name__ == "__main__":
    raise SystemExit(main())
