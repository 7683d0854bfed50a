"""The torch.compile'd CPU step (backend="compiled", the CPU default) against the eager PyTorch step
it is compiled from: same spec, so codes agree except at rounding ties (one code apart) and
parameters to within an ulp or two of fp32 reassociation."""
import warnings

import pytest
import torch

from lowbit_adamw import AdamW8bit
from lowbit_adamw import functional as F

pytestmark = pytest.mark.skipif(not F.compiled_available(), reason="torch.compile has no C++ compiler here")

SIZES = (300 * 256 + 77, 256 * 40, 5000)  # a partial last block, whole blocks only, and a small tensor


def twin_optimizers(dtype, **kw):
    torch.manual_seed(0)
    base = [torch.randn(n, dtype=dtype) for n in SIZES]
    opts = []
    for backend in ("torch", "compiled"):
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        opts.append(AdamW8bit(ps, backend=backend, min_8bit_size=0, **kw))
    return opts


def grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(n, generator=g) * 10.0 ** -(step % 3) for n in SIZES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(weight_decay=0.1), dict(amsgrad=True, maximize=True), dict(bias_correction=False, lr=1e-2)])
def test_compiled_step_matches_eager_step(dtype, kw):
    eager, compiled = twin_optimizers(dtype, **kw)
    for step in range(3):
        for o in (eager, compiled):
            for p, g in zip(o.param_groups[0]["params"], grads(step)):
                p.grad = g.to(dtype)
            o.step()
        # Hold both to the same state after each step so differences cannot compound.
        for pe, pc in zip(eager.param_groups[0]["params"], compiled.param_groups[0]["params"]):
            se, sc = eager.state[pe], compiled.state[pc]
            for key in se:
                if key.endswith("_codes"):
                    diff = (se[key].int() - sc[key].int()).abs()
                    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (key, diff.max(), (diff > 0).sum())
                elif key.endswith("_absmax"):
                    torch.testing.assert_close(sc[key], se[key], rtol=1e-6, atol=0)
            ulp = torch.finfo(dtype).eps
            assert ((pc.float() - pe.float()).abs() <= 2 * ulp * pe.float().abs().clamp_min(1e-3) + 1e-7).float().mean() > 0.999
            with torch.no_grad():
                pc.copy_(pe)
            for key in se:
                if isinstance(se[key], torch.Tensor):
                    sc[key].copy_(se[key])


def test_auto_backend_uses_the_compiled_step_on_cpu():
    opt = AdamW8bit([torch.nn.Parameter(torch.randn(8192))])
    assert opt._resolve_backend(torch.device("cpu")) == "compiled"
    assert AdamW8bit([torch.nn.Parameter(torch.randn(8))], backend="torch")._resolve_backend(torch.device("cpu")) == "torch"


def test_stochastic_rounding_goes_eager_and_stays_seeded(monkeypatch):
    called = []
    monkeypatch.setattr(F, "_compiled_spans", lambda *a, **k: called.append(1) or 0)
    p = torch.nn.Parameter(torch.randn(4096, dtype=torch.bfloat16))
    opt = AdamW8bit([p], backend="compiled", stochastic_rounding=True)
    p.grad = torch.randn_like(p)
    opt.step()
    assert not called


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken():
        def fn(*a, **k):
            raise RuntimeError("no compiler")
        return fn

    monkeypatch.setattr(F, "_compiled_block_step", broken)
    monkeypatch.setitem(F._compiled, "ok", True)
    eager, compiled = twin_optimizers(torch.float32)
    for o in (eager, compiled):
        for p, g in zip(o.param_groups[0]["params"], grads(0)):
            p.grad = g
    eager.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled.step()
    assert any("torch.compile of the CPU step failed" in str(w.message) for w in caught)
    assert F._compiled["ok"] is False
    for pe, pc in zip(eager.param_groups[0]["params"], compiled.param_groups[0]["params"]):
        assert torch.equal(pe, pc)  # the eager path did all of it, exactly
