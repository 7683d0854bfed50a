"""The measurement: a few real training steps per optimizer, and what they held."""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

from .catalog import DEFAULT_OPTIMIZERS, OPTIMIZERS
from .estimation import _meta, _model_name
from .models import load_model
from .monitor import MemoryMonitor
from .report import MemoryReport
from .state import _trainable


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
        from ..optimizer import AdamW8bit

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
        # Storage identity, not address: fake tensors (lowbit_adamw.memory.fit) have storages without addresses.
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


def measure(model: str | nn.Module, optimizers: Iterable[str] = DEFAULT_OPTIMIZERS, batch: Callable | None = None,
            steps: int = 3, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
            progress: Callable[[str], None] | None = None) -> MemoryReport:
    """Train ``steps`` steps per optimizer, each on a fresh copy of ``model`` (same init), and report
    what was held. ``batch(model)`` returns the loss of one batch; without it, a tiny LM batch is
    used for ``tinylm`` and a random token batch for HF causal LMs. ``progress(optimizer name)`` is called
    after each step."""
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
            if progress is not None:
                progress(name)
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
    from ..tinylm import TinyLM

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
