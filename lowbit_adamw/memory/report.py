"""MemoryRow and MemoryReport: the table, JSON and chart of an estimate or a measurement."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or an ImportError that says what to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("a memory chart (PNG) needs matplotlib, which is not installed: pip install 'lowbit-adamw[cli]' "
                          "(or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt




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
        causes = self.meta.get("full_state_causes")
        if causes:
            lines.append("full-precision state kept for: " + "; ".join(
                f"{c['tensors']} tensor(s) by {cause} ({c['bytes'] / div:.3f} {unit})" for cause, c in causes.items()))
        acc = self.meta.get("gradient_accumulation")
        if acc:
            lines.append(f"gradient accumulation over {acc['steps']} micro-steps: {acc['extra_bytes']} extra bytes ({acc['where']})")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Stacked bars per optimizer (and, when measured, a per-step curve) as a PNG at ``path``."""
        plt = pyplot()
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
