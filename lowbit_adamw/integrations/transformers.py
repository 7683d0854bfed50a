"""Hugging Face Trainer: use AdamW8bit where a script says ``optim="adamw_8bit"``.

Three routes, from most explicit to least editing:

1. ``Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, model))``: Trainer builds
   its decay / no-decay groups and hands them to ``AdamW8bit`` with the kwargs below.
2. ``install()`` once before ``Trainer`` is created: ``optim="adamw_8bit"``, ``"adamw_bnb_8bit"``,
   ``"paged_adamw_8bit"``, ``"adamw_torch_8bit"`` and ``"adamw_torch_4bit"`` (``bits=4``) then build
   ``AdamW8bit`` (``ROUTES``: each logs once what it replaced and what differs); 32-bit and non-AdamW
   strings stay with their owners. Nothing else in the script changes, and neither bitsandbytes nor
   torchao needs to be installed.
3. ``python -m lowbit_adamw.integrations.transformers [--lowbit-optim-names a,b] train.py --your --args``:
   runs an unmodified script with ``install()`` applied.

What "behaves like the built-in choice" means here: the same lr, betas, eps and weight decay from
``TrainingArguments``, Trainer's own decay / no-decay groups, and Trainer's bitsandbytes embedding
policy (``nn.Embedding`` weights keep fp32 state; ``embedding_fp32=False`` turns that off).
``TrainingArguments.optim_args`` may set our own options, e.g. ``optim_args="bits=4"`` (4-bit state),
``optim_args="block_size=128,min_8bit_size=0"``,
or ``optim_args="step_in_backward=true"`` (with ``max_grad_norm=0`` and no gradient accumulation, which
Trainer would otherwise apply to gradients that no longer exist: refused with a message), and
``optim_args="offload=cpu"`` (state in host memory, the C++ step on the host: ``lowbit_adamw.offload.pipeline``).
"""
from __future__ import annotations

import logging
import os
import runpy
import sys
from typing import Any

from torch import nn

from ..optimizer import AdamW8bit

logger = logging.getLogger("lowbit_adamw")

# The optim strings install() takes over: Trainer's name -> (our settings, what differs from its owner).
ROUTES: dict[str, tuple[dict[str, Any], str]] = {
    "adamw_8bit": ({}, "bitsandbytes' AdamW8bit in Trainer; the same 8-bit AdamW (2.03 B/param of state)"),
    "adamw_bnb_8bit": ({}, "bitsandbytes' AdamW8bit; the same 8-bit AdamW (2.03 B/param of state)"),
    "paged_adamw_8bit": ({}, ("bitsandbytes' paged AdamW8bit; state is not paged to host memory, it stays on the "
                              "device, compact (2.03 B/param); optim_args='offload=cpu' keeps it in host memory instead")),
    "adamw_torch_8bit": ({}, ("torchao's AdamW8bit; tensors under min_8bit_size=4096 elements keep fp32 state "
                              "(torchao: tensors whose size is not a multiple of 256)")),
    "adamw_torch_4bit": ({"bits": 4}, ("torchao's AdamW4bit; 4-bit state (1.06 B/param), tensors under "
                                       "min_8bit_size=4096 elements keep fp32 state")),
}
DEFAULT_OPTIM_NAMES = tuple(ROUTES)

# Strings left to their owners: not AdamW, or 32-bit state. Named in optim_names they are refused.
_LEFT_PREFIXES = {
    "paged_adamw_32bit": "32-bit state: there is nothing to save by quantizing it; bitsandbytes keeps it",
    "adamw_bnb_32bit": "32-bit state: there is nothing to save by quantizing it; bitsandbytes keeps it",
    "lion": "Lion is not AdamW: taking it over would change the update rule",
    "paged_lion": "Lion is not AdamW: taking it over would change the update rule",
    "ademamix": "AdEMAMix is not AdamW: taking it over would change the update rule",
    "paged_ademamix": "AdEMAMix is not AdamW: taking it over would change the update rule",
    "rmsprop": "RMSprop is not AdamW: taking it over would change the update rule",
}


def left_to_owner(name: str) -> str | None:
    """Why ``name`` is left to the library Trainer maps it to, or None if it is not one of those."""
    return next((why for prefix, why in _LEFT_PREFIXES.items() if name.startswith(prefix)), None)


# optim_args keys we accept and how to parse their string values.
_OPTIM_ARG_TYPES = {
    "block_size": int,
    "bits": int,
    "min_8bit_size": int,
    "bias_correction": lambda s: _parse_bool("bias_correction", s),
    "stochastic_rounding": lambda s: _parse_bool("stochastic_rounding", s),
    "amsgrad": lambda s: _parse_bool("amsgrad", s),
    "backend": str,
    "nonfinite": str,
    "clip_norm": float,
    "clip_value": float,
    "step_in_backward": lambda s: _parse_bool("step_in_backward", s),
    "step_in_backward_bucket_mb": float,
    "offload": lambda s: None if s.lower() in ("none", "") else s,
}


def _parse_bool(name: str, s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"optim_args: {name}={s!r} is not a boolean (use true or false)")


def parse_optim_args(optim_args: str | dict | None) -> dict[str, Any]:
    """Parse ``TrainingArguments.optim_args`` (``"k=v,k=v"``) into AdamW8bit keyword arguments."""
    if not optim_args:
        return {}
    if isinstance(optim_args, str):
        pairs = {}
        for item in optim_args.replace(" ", "").split(","):
            if not item:
                continue
            if "=" not in item:
                raise ValueError(f"optim_args: {item!r} is not key=value")
            k, v = item.split("=", 1)
            pairs[k] = v
    else:
        pairs = dict(optim_args)
    out = {}
    for k, v in pairs.items():
        if k not in _OPTIM_ARG_TYPES:
            raise ValueError(f"optim_args: unknown option {k!r} for lowbit_adamw.AdamW8bit; known: {', '.join(sorted(_OPTIM_ARG_TYPES))}")
        out[k] = _OPTIM_ARG_TYPES[k](v) if isinstance(v, str) else v
    return out


def embedding_modules(model: nn.Module) -> list[nn.Embedding]:
    """Every ``nn.Embedding`` in ``model``. The Trainer routes name these modules (not their weights) as
    ``fp32_state``, so the choice follows a weight that accelerate's FSDP2 swaps in after the optimizer is built."""
    return [m for m in model.modules() if isinstance(m, nn.Embedding)]


def optimizer_cls_and_kwargs(args, model: nn.Module | None = None, *, embedding_fp32: bool = True, defaults=None, **overrides):
    """``(AdamW8bit, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` from ``TrainingArguments``.

    ``model`` is needed for the embedding policy; without it every large tensor gets 8-bit state.
    ``defaults`` (a route's own settings) yield to ``args.optim_args``; ``overrides`` win over both
    ``args`` and ``args.optim_args``.
    """
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        **(defaults or {}),
    }
    kwargs.update(parse_optim_args(getattr(args, "optim_args", None)))
    if model is not None and embedding_fp32:
        kwargs["fp32_state"] = embedding_modules(model)
    kwargs.update(overrides)
    if kwargs.get("step_in_backward"):
        # Trainer clips and accumulates between backward and optimizer.step(); by then the gradients
        # are used and freed, so both would silently do nothing.
        if getattr(args, "max_grad_norm", 0) not in (0, None):
            raise ValueError(f"step_in_backward=True: Trainer would clip gradients with max_grad_norm={args.max_grad_norm} after "
                             "they were already used and freed, so clipping would silently do nothing. Set "
                             "TrainingArguments(max_grad_norm=0), and clip per tensor with optim_args='clip_norm=...' if needed")
        if getattr(args, "gradient_accumulation_steps", 1) > 1:
            raise ValueError("step_in_backward=True updates in every backward, so Trainer's gradient_accumulation_steps="
                             f"{args.gradient_accumulation_steps} cannot work: set it to 1 and raise the batch size")
    return AdamW8bit, kwargs


_installed: dict[str, Any] = {}


def _routes(optim_names) -> set[str]:
    names = set(DEFAULT_OPTIM_NAMES)
    for n in optim_names or ():
        n = str(getattr(n, "value", n))
        if n in ROUTES:
            names.add(n)
        elif left_to_owner(n):
            raise ValueError(f"install(optim_names=...): {n!r} is left to its owner: {left_to_owner(n)}. "
                             f"lowbit-adamw takes {', '.join(ROUTES)}")
        else:
            raise ValueError(f"install(optim_names=...): {n!r} is not an 8-bit AdamW string Trainer knows; "
                             f"lowbit-adamw takes {', '.join(ROUTES)}")
    return names


_said: set[str] = set()


def _say_once(name: str, line: str) -> None:
    if name not in _said:
        _said.add(name)
        logger.warning(line)


def install(optim_names=(), *, embedding_fp32: bool = True, **overrides) -> None:
    """Make ``Trainer`` build ``AdamW8bit`` for the optim strings of ``ROUTES``; others are untouched.

    ``optim_names`` adds to that set (a name outside ``ROUTES`` is refused with the reason). This wraps
    ``Trainer.get_optimizer_cls_and_kwargs``, the public static method every Trainer calls from
    ``create_optimizer``. Call ``uninstall()`` to restore it."""
    try:
        from transformers import Trainer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("lowbit_adamw.integrations.transformers needs transformers: pip install 'lowbit-adamw[integrations]'") from e
    original = Trainer.__dict__.get("get_optimizer_cls_and_kwargs")
    if not isinstance(original, staticmethod):
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__}: Trainer.get_optimizer_cls_and_kwargs is no longer a static method, "
            "so install() cannot route optim names to lowbit-adamw. Pass "
            "optimizer_cls_and_kwargs=lowbit_adamw.integrations.transformers.optimizer_cls_and_kwargs(args, model) to Trainer instead"
        )
    original = _installed.get("original", original)
    names = _routes(optim_names)
    _said.clear()  # each install() says once per string what it routes

    def get_optimizer_cls_and_kwargs(args, model=None):
        name = str(getattr(args.optim, "value", args.optim))
        if name in names:
            settings, differs = ROUTES[name]
            cls, kwargs = optimizer_cls_and_kwargs(args, model, embedding_fp32=embedding_fp32, defaults=settings, **overrides)
            kept = {k: v for k, v in settings.items() if kwargs.get(k) == v}  # the user's optim_args win over the route's
            _say_once(name, f"lowbit-adamw: optim={name!r} runs lowbit_adamw.AdamW8bit"
                            f"{''.join(f' {k}={v}' for k, v in kept.items())} in place of {differs}")
            return cls, kwargs
        if left_to_owner(name):
            _say_once(name, f"lowbit-adamw: optim={name!r} is left to its owner ({left_to_owner(name)})")
        return original.__func__(args, model)

    _installed["original"] = original
    Trainer.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def uninstall() -> None:
    """Undo ``install()``."""
    if "original" in _installed:
        from transformers import Trainer

        Trainer.get_optimizer_cls_and_kwargs = _installed.pop("original")


def main(argv: list[str] | None = None) -> None:
    """``python -m lowbit_adamw.integrations.transformers script.py [args...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names: list[str] = []
    while argv and argv[0].startswith("--lowbit-optim-names"):
        flag = argv.pop(0)
        value = flag.split("=", 1)[1] if "=" in flag else (argv.pop(0) if argv else "")
        names += [n for n in value.split(",") if n]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m lowbit_adamw.integrations.transformers [--lowbit-optim-names a,b] SCRIPT.py [script args...]\n"
              f"Runs SCRIPT with optim strings {', '.join(DEFAULT_OPTIM_NAMES)} (and any named) routed to lowbit_adamw.AdamW8bit.")
        raise SystemExit(0 if argv else 2)
    install(names)
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python SCRIPT.py` would
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()


def memory_report_callback(prefix: str | None = None):
    """A ``TrainerCallback`` that logs optimizer-state MiB and per-step peak MiB with Trainer's own
    logs, and at the end writes ``<output_dir>/memory_report.json`` and ``.png`` (or ``prefix.*``)."""
    from transformers import TrainerCallback

    from ..memory import MemoryMonitor

    class MemoryReportCallback(TrainerCallback):
        def __init__(self):
            self.monitor = None
            self.files = None

        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
            if optimizer is None:
                raise RuntimeError("memory_report_callback: Trainer passed no optimizer to on_train_begin")
            self.monitor = MemoryMonitor(optimizer, model=model, name=type(getattr(optimizer, "optimizer", optimizer)).__name__)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.monitor is not None and self.monitor.history and logs is not None and "loss" in logs:
                last = self.monitor.history[-1]
                logs["optimizer_state_mib"] = round(last["state_bytes"] / 2**20, 3)
                logs["peak_mib"] = round(last["peak_bytes"] / 2**20, 1)

        def on_train_end(self, args, state, control, **kwargs):
            if self.monitor is not None and self.monitor.history and state.is_world_process_zero:
                self.files = self.monitor.write(prefix or os.path.join(args.output_dir, "memory_report"))
                self.monitor.close()

    return MemoryReportCallback()
