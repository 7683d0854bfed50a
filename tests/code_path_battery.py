"""Run as a script under one ATEN_CPU_CAPABILITY: a fixed battery of steps over the options, widths and weight
dtypes with each backend named (eager ``torch`` by default; ``triton`` under the interpreter, ``cpp``), printed
as one SHA-256 per backend of every resulting weight and state byte, with the capability torch ran under.
tests/test_cpu_code_paths.py compares the digests across backends and code paths. The inputs come from numpy:
torch.randn's own bits follow the code path."""
import hashlib
import json
import sys
import warnings

import numpy as np
import torch

from lowbit_adamw import AdamW8bit

SIZES = (256 * 9 + 77, 128 * 5, 3001)  # partial last blocks at both default block sizes, and an odd length
CASES = [
    dict(),
    dict(bits=4),
    dict(amsgrad=True, maximize=True, weight_decay=0.1),
    dict(bits=4, amsgrad=True, ema_decay=0.9),
    dict(clip_value=0.05, bias_correction=False, lr=1e-2),
    dict(bits=4, clip_value=0.05),
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def battery(seed: int = 0, backend: str = "torch") -> dict[str, str]:
    """{weight dtype: digest}; the C++ step takes fp32 and bf16 weights (fp16 ones go to the compiled step)."""
    warnings.simplefilter("ignore")  # the skipped blocks' warning, every case
    out = {}
    for dtype in DTYPES if backend != "cpp" else DTYPES[:2]:
        digest = hashlib.sha256()
        rounding = [dict(stochastic_rounding=True), dict(bits=4, stochastic_rounding=True)] if dtype == torch.bfloat16 else []
        for kw in CASES + rounding:
            g = np.random.default_rng(seed)  # numpy: torch.randn's bits follow the code path
            params = [torch.nn.Parameter((torch.from_numpy(g.standard_normal(n, dtype=np.float32)) * 0.5).to(dtype))
                      for n in SIZES]
            opt = AdamW8bit(params, backend=backend, min_8bit_size=0, seed=seed, **kw)
            for step in range(4):
                for p in params:
                    grad = torch.from_numpy(g.standard_normal(p.numel(), dtype=np.float32)) * 10.0 ** -(step % 3)
                    if step == 2:
                        grad[5] = float("nan")  # one non-finite block, skipped
                    p.grad = grad.to(dtype)
                opt.step()
            for p in params:
                digest.update(p.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
                for key, value in sorted(opt.state[p].items()):
                    if isinstance(value, torch.Tensor):
                        digest.update(key.encode() + value.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[str(dtype)] = digest.hexdigest()
    return out


if __name__ == "__main__":
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    backends = sys.argv[2].split(",") if len(sys.argv) > 2 else ["torch"]
    print(json.dumps(dict(capability=torch.backends.cpu.get_cpu_capability(), digests={b: battery(seed, b) for b in backends})))
