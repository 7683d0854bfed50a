"""Memory reports: what training will cost (estimate) and what it did cost (measured).

* ``estimate(model, optimizers)``: weights, gradients and optimizer state by kind for each optimizer,
  from parameter shapes alone. Build the model on the meta device (``load_model("llama-2-70b")``
  does) and a 70B estimate costs nothing. lowbit's own rows come from ``AdamW8bit._init_state``
  run on meta tensors, so the estimate follows the optimizer's real decisions; the other optimizers'
  rules are written below and checked against the real libraries in tests/test_memory.py.
* ``measure(model, optimizers, batch)``: a few real training steps per optimizer. State bytes come
  from the tensors the optimizer holds (shared tensors counted once, tensor subclasses such as
  torchao's unpacked). Activations: on CUDA the allocator's counters, reset per phase (forward,
  backward, step); on the CPU the bytes autograd saves for backward.
* ``MemoryMonitor``: per-step state size and peak memory in any loop (a step hook), with a
  Trainer callback in ``lowbit_adamw.integrations.transformers``.
* ``MemoryReport``: ``.table()``, ``.to_json()``, ``.plot(path)`` (matplotlib PNG).

State that lives off the device (paged or CPU-offloaded) is not seen by torch.cuda's counters;
the report has an ``offloaded`` column for it. Nothing in lowbit-adamw offloads today, so it is 0.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .sharding import is_dtensor

# Breakdown keys, in the order tables and charts show them.
STATE_KINDS = ("codes", "scales", "full", "other", "ema")
COLUMNS = ("weights", "grads", "state_codes", "state_scales", "state_full", "state_other", "state_ema", "activations", "offloaded")

# Optimizers the report knows: name -> label. Variants of ours are ordinary AdamW8bit options.
OPTIMIZERS = {
    "adamw": "torch AdamW (foreach)",
    "adamw_fused": "torch AdamW (fused)",
    "bnb_8bit": "bitsandbytes AdamW8bit",
    "torchao_8bit": "torchao AdamW8bit",
    "torchao_4bit": "torchao AdamW4bit",
    "lowbit_8bit": "lowbit AdamW8bit",
    "lowbit_4bit": "lowbit AdamW8bit, bits=4",
    "lowbit_8bit_emb32": "lowbit AdamW8bit, fp32 state for embeddings",
    "lowbit_8bit_amsgrad": "lowbit AdamW8bit, amsgrad",
}
DEFAULT_OPTIMIZERS = ("adamw", "bnb_8bit", "torchao_8bit", "lowbit_8bit", "torchao_4bit", "lowbit_4bit")

# Common shapes, as HF config fields (public architecture facts). Any other model: a config.json path.
MODEL_CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


# ---- loading models on the meta device ---------------------------------------------------------


def load_model(spec: str | nn.Module, dtype: torch.dtype | None = None, device: str | torch.device = "meta") -> nn.Module:
    """A model from a built-in name (``MODEL_CONFIGS`` or ``"tinylm"``), a config.json path, or a module."""
    if isinstance(spec, nn.Module):
        return spec
    with torch.device(device):
        if spec == "tinylm":
            from .tinylm import TinyLM

            model = TinyLM()
        else:
            try:
                from transformers import AutoConfig, AutoModelForCausalLM
            except ImportError as e:
                raise ImportError(f"model {spec!r} needs transformers to build its config: pip install transformers "
                                  "(or use model='tinylm' or pass an nn.Module)") from e
            if spec in MODEL_CONFIGS:
                fields = dict(MODEL_CONFIGS[spec])
                config = AutoConfig.for_model(fields.pop("model_type"), **fields)
            elif os.path.isfile(spec) or os.path.isdir(spec):
                config = AutoConfig.from_pretrained(os.path.dirname(spec) if os.path.isfile(spec) else spec)
            else:
                raise ValueError(f"unknown model {spec!r}: use one of {', '.join(['tinylm', *MODEL_CONFIGS])} or a path to a config.json")
            model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


# ---- what optimizer state costs ----------------------------------------------------------------


def _named_leaves(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, plain tensor) pairs behind ``t``: tensor subclasses such as torchao's OptimState8bit
    are unpacked, each part named ``name.part``."""
    if type(t) is torch.Tensor or type(t) is nn.Parameter or not hasattr(t, "__tensor_flatten__"):
        return [(name, t)]
    parts = t.__tensor_flatten__()[0]
    return [leaf for n in parts if isinstance(getattr(t, n), torch.Tensor) for leaf in _named_leaves(f"{name}.{n}", getattr(t, n))]


def _kind(key: str, leaf: torch.Tensor) -> str:
    if key == "ema":
        return "ema"
    if leaf.dtype in (torch.uint8, torch.int8):
        return "codes"
    if key == "step" or "qmap" in key:
        return "other"  # step counters and code tables
    if "absmax" in key or key.endswith("scale"):
        return "scales"
    return "full"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor an optimizer holds in its state, by kind: ``codes`` (8-bit), ``scales``
    (block scales), ``full`` (unquantized moments: fp32, or the parameter dtype for torch AdamW on
    16-bit weights), ``other`` (step counters, code tables) and ``total``. A tensor shared by several
    parameters (bitsandbytes' code tables) counts once; a DTensor counts its local shard (this rank)."""
    out = dict.fromkeys(STATE_KINDS, 0)
    seen = set()
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if is_dtensor(value):  # what this rank holds
                value = value.to_local()
            for name, t in _named_leaves(key, value):
                if t.device.type != "meta":
                    ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
                    if ident in seen:
                        continue
                    seen.add(ident)
                out[_kind(name, t)] += _tensor_bytes(t)
    out["total"] = sum(out[k] for k in STATE_KINDS)
    return out


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


@dataclass
class ParamSpec:
    """What the estimate needs of one trainable parameter: a meta tensor (shape, dtype) and its role."""

    name: str
    meta: torch.Tensor
    embedding: bool


def param_specs(model: nn.Module, dtype: torch.dtype | None = None) -> list[ParamSpec]:
    """Meta-tensor stand-ins for ``model``'s trainable parameters; the model itself is not touched."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [ParamSpec(n, torch.empty(p.shape, dtype=dtype or p.dtype, device="meta"), id(p) in emb) for n, p in _trainable(model)]


def estimate_state_bytes(name: str, specs: list[ParamSpec]) -> dict[str, int]:
    """Optimizer state the optimizer ``name`` (a key of ``OPTIMIZERS``) would hold for these parameters."""
    out = dict.fromkeys(STATE_KINDS, 0)
    if name.startswith("lowbit"):
        from .optimizer import AdamW8bit

        kw = dict(amsgrad=name.endswith("amsgrad"), bits=4 if name.startswith("lowbit_4bit") else 8)
        if name.endswith("emb32"):
            kw["fp32_state"] = [s.meta for s in specs if s.embedding]
        opt = AdamW8bit([s.meta for s in specs], **kw)
        group = opt.param_groups[0]
        for p, s in zip(group["params"], specs):
            opt._init_state(p, group)  # the optimizer's own decisions, on meta tensors
        out = optimizer_state_bytes(opt)
        out.pop("total")
    elif name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    else:
        for s in specs:
            n, size = s.meta.numel(), s.meta.element_size()
            if name in ("adamw", "adamw_fused"):  # exp_avg and exp_avg_sq like the parameter, one fp32 step tensor
                out["full"] += 2 * n * size
                out["other"] += 4
            elif name == "bnb_8bit":  # 8-bit from 4096 elements, blocks of 256; fp32 below; step is an int
                if n < 4096:
                    out["full"] += 2 * n * 4
                else:
                    out["codes"] += 2 * n
                    out["scales"] += 2 * 4 * math.ceil(n / 256)
            elif name == "torchao_8bit":  # 8-bit only if >= 4096 and divisible by 256; a 256-entry table per moment
                if n >= 4096 and n % 256 == 0:
                    out["codes"] += 2 * n
                    out["scales"] += 2 * 4 * (n // 256)
                    out["other"] += 2 * 256 * 4
                else:
                    out["full"] += 2 * n * size
                out["other"] += 4
            elif name == "torchao_4bit":  # 4-bit (packed) only if >= 4096 and divisible by 128; a 16-entry table per moment
                if n >= 4096 and n % 128 == 0:
                    out["codes"] += n
                    out["scales"] += 2 * 4 * (n // 128)
                    out["other"] += 2 * 16 * 4
                else:
                    out["full"] += 2 * n * size
                out["other"] += 4
        if name == "bnb_8bit" and any(s.meta.numel() >= 4096 for s in specs):
            out["other"] += 2 * 256 * 4  # two code tables shared by every 8-bit tensor
    out["total"] = sum(out[k] for k in STATE_KINDS)
    return out


# ---- reports -----------------------------------------------------------------------------------


@dataclass
class MemoryRow:
    optimizer: str
    label: str
    weights: int = 0
    grads: int = 0
    state_codes: int = 0
    state_scales: int = 0
    state_full: int = 0
    state_other: int = 0
    state_ema: int = 0  # AdamW8bit(ema_decay=...): fp32 averaged weights
    activations: int = 0
    offloaded: int = 0
    phase_peaks: dict = field(default_factory=dict)  # measured on CUDA: forward/backward/step peaks
    history: list = field(default_factory=list)  # measured: per-step records

    @property
    def state(self) -> int:
        return self.state_codes + self.state_scales + self.state_full + self.state_other + self.state_ema

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.state + self.activations + self.offloaded


@dataclass
class MemoryReport:
    model: str
    params: int
    trainable: int
    mode: str  # "estimate" or "measured"
    rows: list[MemoryRow]
    meta: dict = field(default_factory=dict)

    def row(self, optimizer: str) -> MemoryRow:
        return next(r for r in self.rows if r.optimizer == optimizer)

    def to_dict(self) -> dict:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d.update(state=r.state, total=r.total, state_bytes_per_param=r.state / max(self.trainable, 1))
            rows.append(d)
        return dict(model=self.model, params=self.params, trainable=self.trainable, mode=self.mode, rows=rows, **self.meta)

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path:
            with open(path, "w") as f:
                f.write(text)
        return text

    def table(self) -> str:
        """A plain-text table, GiB for big models and MiB for small ones, with savings against the first row."""
        big = max(r.total for r in self.rows) >= 2**30
        unit, div = ("GiB", 2**30) if big else ("MiB", 2**20)
        cols = ["weights", "grads", "state", "  codes", "  scales", "  full", "  other"]
        has_ema = any(r.state_ema for r in self.rows)
        if has_ema:
            cols.append("  ema")
        has_act = any(r.activations for r in self.rows)
        if has_act:
            cols.append("activations")
        cols += ["total", "B/param", "saved"]
        base = self.rows[0]
        dtype = self.meta.get("dtype", "").replace("torch.", "")
        lines = [f"{self.model}: {self.params:,} parameters ({self.trainable:,} trainable){', ' + dtype if dtype else ''}, {self.mode}, {unit}"]
        width = max(len(r.label) for r in self.rows) + 2
        lines.append("optimizer".ljust(width) + "".join(c.rjust(12) for c in cols))
        for r in self.rows:
            vals = [r.weights, r.grads, r.state, r.state_codes, r.state_scales, r.state_full, r.state_other]
            if has_ema:
                vals.append(r.state_ema)
            if has_act:
                vals.append(r.activations)
            vals.append(r.total)
            cells = [f"{v / div:12.3f}" for v in vals]
            cells.append(f"{r.state / max(self.trainable, 1):12.2f}")
            cells.append(f"{(base.total - r.total) / div:+12.3f}"[:12].rjust(12) if r is not base else "-".rjust(12))
            lines.append(r.label.ljust(width) + "".join(cells))
        acc = self.meta.get("gradient_accumulation")
        if acc:
            lines.append(f"gradient accumulation over {acc['steps']} micro-steps: {acc['extra_bytes']} extra bytes ({acc['where']})")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Stacked bars per optimizer (and, when measured, a per-step curve) as a PNG at ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        has_history = any(r.history for r in self.rows)
        fig, axes = plt.subplots(1, 2 if has_history else 1, figsize=(13 if has_history else 8, 1.6 + 0.55 * len(self.rows)), squeeze=False)
        ax = axes[0][0]
        big = max(r.total for r in self.rows) >= 2**30
        unit, div = ("GiB", 2**30) if big else ("MiB", 2**20)
        parts = [("weights", "#4c72b0"), ("grads", "#8fa8d6"), ("state_full", "#dd8452"), ("state_codes", "#55a868"),
                 ("state_scales", "#a6d49f"), ("state_other", "#bbbbbb"), ("state_ema", "#937860"), ("activations", "#c44e52"), ("offloaded", "#8172b3")]
        labels = [r.label for r in self.rows]
        left = [0.0] * len(self.rows)
        for key, color in parts:
            vals = [getattr(r, key) / div for r in self.rows]
            if not any(vals):
                continue
            ax.barh(labels, vals, left=left, color=color, label=key.replace("state_", "state: "))
            left = [a + b for a, b in zip(left, vals)]
        for y, (r, x) in enumerate(zip(self.rows, left)):
            ax.text(x, y, f" {r.total / div:.2f} {unit}  (state {r.state / max(self.trainable, 1):.2f} B/param)", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(left) * 1.45)
        ax.set_xlabel(unit)
        dtype = self.meta.get("dtype", "")
        ax.set_title(f"{self.model}: {self.params / 1e6:,.1f}M params{', ' + dtype.replace('torch.', '') if dtype else ''}, {self.mode}", fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
        if has_history:
            ax2 = axes[0][1]
            key = "peak_bytes"
            for r in self.rows:
                if r.history:
                    ax2.plot([h["step"] for h in r.history], [h[key] / div for h in r.history], marker="o", label=r.label)
            ax2.set_xlabel("step")
            ax2.set_ylabel(f"peak {unit} during the step" if self.meta.get("device") == "cuda" else f"tensors held, {unit}")
            ax2.set_title("per step", fontsize=10)
            ax2.xaxis.get_major_locator().set_params(integer=True)
            ax2.legend(fontsize=7)
            ax2.set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _meta(device) -> dict:
    return dict(device=str(device), torch=torch.__version__, machine=platform.machine(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                date=datetime.date.today().isoformat())


def _model_name(spec) -> str:
    return spec if isinstance(spec, str) else type(spec).__name__


def estimate(model: str | nn.Module, optimizers: Iterable[str] = DEFAULT_OPTIMIZERS, dtype: torch.dtype | None = None) -> MemoryReport:
    """Weights, gradients and optimizer state for ``model`` (a name or config.json path, built on the
    meta device, or a module, which is only read). ``dtype`` prices the weights in that dtype (e.g. bf16)."""
    module = load_model(model)
    everything = {id(p): p for p in module.parameters()}
    specs = param_specs(module, dtype)
    wsize = torch.empty(0, dtype=dtype).element_size() if dtype else None
    weights = sum(p.numel() * (wsize or p.element_size()) for p in everything.values())
    grads = sum(_tensor_bytes(s.meta) for s in specs)
    rows = []
    for name in optimizers:
        st = estimate_state_bytes(name, specs)
        rows.append(MemoryRow(name, OPTIMIZERS[name], weights=weights, grads=grads, state_codes=st["codes"],
                              state_scales=st["scales"], state_full=st["full"], state_other=st["other"], state_ema=st["ema"]))
    some = next(iter(everything.values()))
    return MemoryReport(_model_name(model), sum(p.numel() for p in everything.values()), sum(s.meta.numel() for s in specs),
                        "estimate", rows, meta=dict(dtype=str(dtype or some.dtype)))


def make_optimizer(name: str, model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    """The real optimizer behind a report name, over ``model``'s trainable parameters."""
    params = [p for _, p in _trainable(model)]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if name == "bnb_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr)
    if name == "torchao_8bit":
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit

        return TorchaoAdamW8bit(params, lr=lr)
    if name == "torchao_4bit":
        from torchao.optim import AdamW4bit as TorchaoAdamW4bit

        return TorchaoAdamW4bit(params, lr=lr)
    if name.startswith("lowbit"):
        from .optimizer import AdamW8bit

        kw = dict(amsgrad=name.endswith("amsgrad"), bits=4 if name.startswith("lowbit_4bit") else 8)
        if name.endswith("emb32"):
            kw.update(fp32_state=[nn.Embedding], model=model)
        return AdamW8bit(params, lr=lr, **kw)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


class _SavedBytes:
    """Bytes autograd keeps for backward (activations), each storage counted once."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        # Storage identity, not address: fake tensors (lowbit_adamw.fit) have storages without addresses.
        if t.device.type != "meta" and not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            if storage._cdata not in self.seen:
                self.seen.add(storage._cdata)
                self.bytes += storage.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class MemoryMonitor:
    """Per-step memory of a training loop. ``MemoryMonitor(optimizer)`` hooks ``optimizer.step``;
    each step records the optimizer state bytes and the peak memory since the previous step (CUDA:
    ``max_memory_allocated``, reset after each step; CPU: weights + grads + state held, since the
    CPU allocator keeps no peak). ``report()`` returns a ``MemoryReport``; ``write(prefix)`` saves
    ``prefix.json`` and ``prefix.png``."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None, model: nn.Module | None = None, name: str = "run"):
        self.model, self.name, self.history = model, name, []
        self.optimizer = None
        self._hook = None
        if optimizer is not None:
            self.attach(optimizer)

    def attach(self, optimizer):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
        if self._hook is not None:
            self._hook.remove()
        self._hook = self.optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step())
        self._last_update = getattr(self.optimizer, "_updates", None)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _after_step(self):
        updates = getattr(self.optimizer, "_updates", None)
        if updates is not None and updates == self._last_update:
            return  # an accumulation micro-step (or a skipped step): nothing was updated
        self._last_update = updates
        self.record()

    def _held(self, state_bytes: int) -> int:
        params = {id(p): p for g in self.optimizer.param_groups for p in g["params"]}
        held = sum(_tensor_bytes(p) for p in params.values())
        held += sum(_tensor_bytes(p.grad) for p in params.values() if p.grad is not None)
        return held + state_bytes

    def record(self) -> dict:
        state = optimizer_state_bytes(self.optimizer)
        rec = dict(step=len(self.history) + 1, state_bytes=state["total"])
        devs = {p.device.type for g in self.optimizer.param_groups for p in g["params"]}
        if "cuda" in devs:
            rec["peak_bytes"] = torch.cuda.max_memory_allocated()
            rec["allocated_bytes"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            rec["peak_bytes"] = self._held(state["total"])
        self.history.append(rec)
        return rec

    def report(self) -> MemoryReport:
        opt = self.optimizer
        params = {id(p): p for g in opt.param_groups for p in g["params"]}
        if self.model is not None:
            params.update({id(p): p for p in self.model.parameters()})
        s = optimizer_state_bytes(opt)
        trainable = [p for g in opt.param_groups for p in g["params"]]
        row = MemoryRow(self.name, type(opt).__name__, weights=sum(_tensor_bytes(p) for p in params.values()),
                        grads=sum(_tensor_bytes(p) for p in trainable if p.requires_grad), state_codes=s["codes"],
                        state_scales=s["scales"], state_full=s["full"], state_other=s["other"], state_ema=s["ema"],
                        history=list(self.history))
        if self.history and "allocated_bytes" in self.history[-1]:
            row.phase_peaks = {"max_step_peak": max(h["peak_bytes"] for h in self.history)}
        dev = next(iter(params.values())).device.type if params else "cpu"
        meta = _meta(dev)
        steps = getattr(opt, "accumulation_steps", 1)
        if steps > 1:  # AdamW8bit accumulates in .grad (autograd's own sum): no buffer of its own
            meta["gradient_accumulation"] = dict(steps=steps, extra_bytes=0, where="in .grad (counted under grads)")
        return MemoryReport(self.name, sum(p.numel() for p in params.values()), sum(p.numel() for p in trainable), "measured",
                            [row], meta=meta)

    def write(self, prefix: str) -> tuple[str, str]:
        rep = self.report()
        rep.to_json(prefix + ".json")
        return prefix + ".json", rep.plot(prefix + ".png")

    def close(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def measure(model: str | nn.Module, optimizers: Iterable[str] = DEFAULT_OPTIMIZERS, batch: Callable | None = None,
            steps: int = 3, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MemoryReport:
    """Train ``steps`` steps per optimizer, each on a fresh copy of ``model`` (same init), and report
    what was held. ``batch(model)`` returns the loss of one batch; without it, a tiny LM batch is
    used for ``tinylm`` and a random token batch for HF causal LMs."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = load_model(model, device="cpu") if isinstance(model, str) else model
    if dtype is not None:  # never cast the caller's module in place
        base = base.to(dtype) if base is not model else copy.deepcopy(base).to(dtype)
    loss_fn = batch or _default_batch(base)
    rows = []
    for name in optimizers:
        m = copy.deepcopy(base).to(device)
        opt = make_optimizer(name, m)
        mon = MemoryMonitor(opt, model=m, name=name)
        phase = {"forward": 0, "backward": 0, "step": 0}
        activations = 0
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            with _SavedBytes() as saved:
                loss = loss_fn(m)
            if cuda:
                phase["forward"] = max(phase["forward"], torch.cuda.max_memory_allocated())
                activations = max(activations, torch.cuda.memory_allocated() - before)
                torch.cuda.reset_peak_memory_stats()
            else:
                activations = max(activations, saved.bytes)
            loss.backward()
            if cuda:
                phase["backward"] = max(phase["backward"], torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
                step_base = torch.cuda.memory_allocated()
            opt.step()  # the monitor's hook records (and resets the CUDA peak) here
            if cuda:
                phase["step"] = max(phase["step"], mon.history[-1]["peak_bytes"])
                phase["step_extra"] = max(phase.get("step_extra", 0), mon.history[-1]["peak_bytes"] - step_base)
        row = mon.report().rows[0]
        row.label, row.activations = OPTIMIZERS[name], activations
        row.phase_peaks = phase if device.type == "cuda" else {}
        rows.append(row)
        mon.close()
        del m, opt
    n = sum(p.numel() for p in base.parameters())
    return MemoryReport(_model_name(model), n, sum(p.numel() for _, p in _trainable(base)), "measured", rows,
                        meta=dict(_meta(device.type), dtype=str(next(base.parameters()).dtype), steps=steps))


def _default_batch(model: nn.Module) -> Callable:
    from .tinylm import TinyLM

    if isinstance(model, TinyLM):
        seq = model.pos.shape[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (8, seq + 1), generator=g)
        return lambda m: m.loss(x[:, :-1].to(m.pos.device), x[:, 1:].to(m.pos.device))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError("measure() needs batch=callable(model) -> loss for this model")
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))

    def loss(m):
        dev = next(m.parameters()).device
        return m(input_ids=ids.to(dev), labels=ids.to(dev)).loss

    return loss
