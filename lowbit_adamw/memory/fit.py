"""Does it fit? One table per model: weights, gradients (the peak alive), optimizer state, activations and
their total for a few training configurations, against a GPU's memory.

Activations are counted, not guessed: the model runs one forward of ``(batch, seq)`` tokens under
PyTorch's fake-tensor mode (shapes and dtypes, no memory, no data), with the same saved-tensor hook
that ``lowbit_adamw.memory.measure`` uses on a real run, so on the models the tests try the estimate
equals the measured bytes exactly. With activation checkpointing the count is what the checkpoints
keep; the one layer recomputed at a time during backward is not in it.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .measurement import _SavedBytes
from .models import from_config, load_model
from .report import pyplot
from .state import estimate_state_bytes, param_specs

# name: (label, optimizer of memory.OPTIMIZERS for the state, step in backward)
CONFIGS = {
    "adamw": ("torch AdamW", "adamw", False),
    "lowbit_8bit": ("lowbit AdamW8bit", "lowbit_8bit", False),
    "lowbit_8bit_sib": ("lowbit AdamW8bit + step in backward", "lowbit_8bit", True),
    "lowbit_4bit_sib": ("lowbit bits=4 + step in backward", "lowbit_4bit", True),
}
# Rows with optimizer state in host memory, added when the host's memory is given. Ours from our own
# layout (lowbit_adamw.offload.pipeline); the peers' from their published layouts:
# - torchao's CPUOffloadOptimizer(offload_gradients=True): torch AdamW (fused) on the CPU over pinned
#   host copies of the weights and gradients; its moments take the parameter's dtype (torch AdamW's
#   zeros_like). The GPU keeps the weights and, gradients being moved out as each completes, about one
#   gradient at a time.
# - DeepSpeed ZeRO-Offload (stage 2, offload_optimizer cpu): fp32 master weights, gradients, m and v on
#   the host (16 B/param); the GPU keeps the 16-bit weights and gradients in reduce buckets of
#   reduce_bucket_size = 5e8 elements (its default).
OFFLOAD_CONFIGS = {
    "lowbit_8bit_offload": ("lowbit 8-bit offload=cpu + step in backward", "lowbit_8bit", True),
    "lowbit_4bit_offload": ("lowbit bits=4 offload=cpu + step in backward", "lowbit_4bit", True),
    "torchao_offload": ("torchao CPUOffloadOptimizer (offload_gradients)", None, None),
    "deepspeed_offload": ("DeepSpeed ZeRO-Offload (published layout)", None, None),
}
DEEPSPEED_REDUCE_BUCKET_ELEMENTS = 500_000_000
STAGING_BUFFERS = 2  # lowbit_adamw.offload.pipeline: gradient staging buffers in flight


def parse_size(text: str) -> int:
    """'24GiB', '80GB', '24G', '512MiB' -> bytes (GB and G are taken as GiB, as GPU makers' GB are GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 24GiB or 80GB")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index(m.group(2).upper() or "B"))


def _fake_parameters(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Swap every parameter and buffer for a tensor made in the active fake mode (tied weights stay tied)."""
    made = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype), requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)


def activation_bytes(model: str | nn.Module, batch: int, seq: int, checkpointing: bool = False,
                     dtype: torch.dtype | None = None) -> int:
    """Bytes autograd keeps for backward after one forward of ``batch`` x ``seq`` tokens (each storage
    once), counted under fake tensors. ``model`` is a name or config (built on the meta device) or a
    module (not modified: a fresh copy is built from its config when it has one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if isinstance(model, nn.Module) and hasattr(model, "config"):
        model = _from_config(model.config)
    elif isinstance(model, nn.Module):
        raise ValueError("activation_bytes needs a Hugging Face causal LM (a module with .config) or a model name")
    else:
        model = load_model(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    saved = _SavedBytes()
    with FakeTensorMode():
        _fake_parameters(model, dtype)
        ids = torch.zeros(batch, seq, dtype=torch.long)
        with saved:
            try:
                model(input_ids=ids, labels=ids)
            except TypeError:  # a bare encoder takes no labels: its outputs are what backward starts from
                model(input_ids=ids)
    return saved.bytes


def _from_config(config) -> nn.Module:
    kw = {}
    if getattr(config, "_attn_implementation", None):  # eager attention saves other tensors than SDPA
        kw["attn_implementation"] = config._attn_implementation
    with torch.device("meta"):
        return from_config(config, **kw)


@dataclass
class FitRow:
    config: str
    label: str
    weights: int
    grads: int
    state: int  # on the GPU
    activations: int
    host: int = 0  # host RAM the optimizer holds (offloaded state, weight and gradient copies)

    @property
    def total(self) -> int:
        """GPU bytes."""
        return self.weights + self.grads + self.state + self.activations


@dataclass
class FitReport:
    model: str
    dtype: str
    batch: int
    seq: int
    checkpointing: bool
    gpu_memory: int
    bucket_mb: float
    rows: list[FitRow] = field(default_factory=list)
    host_memory: int | None = None

    def fits(self, row: FitRow) -> bool:
        """The GPU holds its part and, when the host's memory is given, the host holds the rest."""
        return row.total <= self.gpu_memory and (self.host_memory is None or row.host <= self.host_memory)

    def table(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        head = (f"{self.model}, {self.dtype} weights, batch {self.batch} x {self.seq} tokens, activation checkpointing "
                f"{'on' if self.checkpointing else 'off'}, GPU {gib(self.gpu_memory)} GiB"
                + (f", host {gib(self.host_memory)} GiB" if self.host_memory is not None else "") + " (GiB per column; estimates)")
        host = self.host_memory is not None
        cols = ("configuration", "weights", "grads (peak)", "state", "activations", "GPU total") + (("host RAM",) if host else ()) + ("fits",)
        lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append(f"| {r.label} | {gib(r.weights)} | {gib(r.grads)} | {gib(r.state)} | {gib(r.activations)} | "
                         f"{gib(r.total)} | " + (f"{gib(r.host)} | " if host else "") + f"{'yes' if self.fits(r) else 'no'} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        for row, r in zip(d["rows"], self.rows):
            row.update(total=r.total, fits=self.fits(r))
        return d

    def figure(self):
        """The chart as a matplotlib figure: stacked GiB per configuration, each part and each total written
        on its bar, the GPU's memory as a line."""
        import textwrap

        plt = pyplot()

        fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(self.rows)), 4.5))
        parts = ("weights", "grads", "state", "activations")
        bottom = [0.0] * len(self.rows)
        top = max(r.total for r in self.rows) / 2**30
        for part, color in zip(parts, ("#4c72b0", "#dd8452", "#55a868", "#8172b2")):
            vals = [getattr(r, part) / 2**30 for r in self.rows]
            ax.bar(range(len(self.rows)), vals, bottom=bottom, label=part, color=color)
            for i, (b, v) in enumerate(zip(bottom, vals)):
                if v >= 0.06 * top:  # a part too thin for its number keeps it in the table
                    ax.text(i, b + v / 2, f"{v:.1f}", ha="center", va="center", fontsize=7, color="white")
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, (total, row) in enumerate(zip(bottom, self.rows)):
            host = f"\n+ host {row.host / 2**30:.1f}" if row.host else ""  # state kept in host RAM, beside the GPU's bar
            ax.text(i, total, f"{total:.1f} GiB{host}", ha="center", va="bottom", fontsize=7, fontweight="bold")
        ax.axhline(self.gpu_memory / 2**30, color="black", linestyle="--", label=f"GPU {self.gpu_memory / 2**30:.0f} GiB")
        ax.set_xticks(range(len(self.rows)), ["\n".join(textwrap.wrap(r.label, 16)) for r in self.rows], fontsize=7)
        ax.set_ylabel("GiB")
        ax.set_title(f"{self.model}, {self.dtype}, batch {self.batch} x {self.seq}, checkpointing "
                     f"{'on' if self.checkpointing else 'off'}"
                     + (f"; host {self.host_memory / 2**30:.0f} GiB" if self.host_memory is not None else ""), fontsize=9)
        ax.legend(fontsize=8)
        ax.set_ylim(top=max(top, self.gpu_memory / 2**30) * 1.15)
        fig.tight_layout()
        return fig

    def plot(self, path: str) -> str:
        plt = pyplot()
        fig = self.figure()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def fit_report(model: str | nn.Module, gpu_memory: int | str, batch: int = 1, seq: int = 2048, checkpointing: bool = False,
               dtype: torch.dtype | None = None, configs=None, bucket_mb: float = 64.0,
               host_memory: int | str | None = None) -> FitReport:
    """The fit table for ``model`` (a name from ``memory.MODEL_CONFIGS``, a config.json path, or an HF module).

    Gradients: every trainable parameter's, as after ``backward()``; with the step in backward at most
    one bucket (``bucket_mb``, AdamW8bit's ``step_in_backward_bucket_mb``) plus the largest gradient.
    ``host_memory``: also the rows of ``OFFLOAD_CONFIGS`` (state in host memory), with their host RAM;
    a row fits when both sides hold their part. ``configs``: keys of ``CONFIGS``/``OFFLOAD_CONFIGS``."""
    gpu = parse_size(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
    host_bytes = parse_size(host_memory) if isinstance(host_memory, str) else host_memory
    if configs is None:
        configs = tuple(CONFIGS) + (tuple(OFFLOAD_CONFIGS) if host_bytes is not None else ())
    built = load_model(model)
    specs = param_specs(built, dtype)
    weights = sum(torch.empty(p.shape, dtype=dtype or p.dtype, device="meta").nbytes for p in built.parameters())
    grad_sizes = [s.meta.nbytes for s in specs]
    acts = activation_bytes(model if isinstance(model, str) else built, batch, seq, checkpointing, dtype)
    name = model if isinstance(model, str) else type(model).__name__
    report = FitReport(name, str(dtype or next(built.parameters()).dtype).replace("torch.", ""), batch, seq, checkpointing, gpu,
                       bucket_mb, host_memory=host_bytes)
    bucket = min(sum(grad_sizes), int(bucket_mb * 2**20) + max(grad_sizes, default=0))
    for key in configs:
        if key in OFFLOAD_CONFIGS:
            report.rows.append(_offload_row(key, specs, weights, grad_sizes, bucket, acts))
            continue
        label, optimizer, in_backward = CONFIGS[key]
        grads = bucket if in_backward else sum(grad_sizes)
        report.rows.append(FitRow(key, label, weights, grads, estimate_state_bytes(optimizer, specs)["total"], acts))
    return report


def _offload_row(key: str, specs, weights: int, grad_sizes: list[int], bucket: int, acts: int) -> FitRow:
    label, optimizer, _ = OFFLOAD_CONFIGS[key]
    numel = sum(s.meta.numel() for s in specs)
    if optimizer is not None:  # ours: state + the host copy of the weights + the staging buffers
        host = estimate_state_bytes(optimizer, specs)["total"] + weights + STAGING_BUFFERS * bucket
        return FitRow(key, label, weights, bucket, 0, acts, host)
    if key == "torchao_offload":  # pinned weight and gradient copies + torch AdamW moments in the parameter dtype
        host = sum(4 * s.meta.nbytes for s in specs)
        return FitRow(key, label, weights, max(grad_sizes, default=0), 0, acts, host)
    elem = specs[0].meta.element_size() if specs else 2
    return FitRow(key, label, weights, min(sum(grad_sizes), DEEPSPEED_REDUCE_BUCKET_ELEMENTS * elem), 0, acts, 16 * numel)


__all__ = ["CONFIGS", "OFFLOAD_CONFIGS", "FitReport", "FitRow", "activation_bytes", "fit_report", "parse_size"]
