"""The torch.compile'd CPU step (backend="compiled": the CPU default where the C++ step cannot be built, and
the path for dtypes it does not take) against the eager PyTorch step
it is compiled from: same spec, so codes agree except at rounding ties (one code apart) and
parameters to within an ulp or two of fp32 reassociation."""
import warnings

import pytest
import torch

from lowbit_adamw import AdamW8bit
from lowbit_adamw.step import functional as F
from helpers import assert_codes_match, assert_params_within_ulp, oracle_moments

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
@pytest.mark.parametrize("kw", [dict(weight_decay=0.1), dict(amsgrad=True, maximize=True), dict(bias_correction=False, lr=1e-2),
                                dict(bits=4, weight_decay=0.1), dict(bits=4, amsgrad=True, ema_decay=0.9)])
def test_compiled_step_matches_eager_step(dtype, kw):
    eager, compiled = twin_optimizers(dtype, **kw)
    bits, block = eager.param_groups[0]["bits"], eager.param_groups[0]["block_size"]
    for step in range(3):
        before = {}
        for pe, g in zip(eager.param_groups[0]["params"], grads(step)):
            if eager.state[pe]:
                before[pe] = (pe.detach().clone(), {k: v.clone() for k, v in eager.state[pe].items()}, g.to(dtype))
        for o in (eager, compiled):
            for p, g in zip(o.param_groups[0]["params"], grads(step)):
                p.grad = g.to(dtype)
            o.step()
        # Hold both to the same state after each step so differences cannot compound.
        for i, (pe, pc) in enumerate(zip(eager.param_groups[0]["params"], compiled.param_groups[0]["params"])):
            se, sc = eager.state[pe], compiled.state[pc]
            if pe in before:  # from the second step on the oracle's moments can be recomputed from the saved state
                p0, s0, g = before[pe]
                s0["step"] += 1
                moments = oracle_moments(p0, g, s0, eager._step_scalars(eager.param_groups[0]), block, bits=bits)
                assert_codes_match(se, sc, moments, block, where=f"tensor {i} step {step}: ", bits=bits)
            assert_params_within_ulp(pe, pc, where=f"tensor {i} step {step}")
            with torch.no_grad():
                pc.copy_(pe)
            for key in se:
                if isinstance(se[key], torch.Tensor):
                    sc[key].copy_(se[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_and_eager_give_the_same_bits(dtype, bits):
    # step_spec: one rounded operation at a time, correctly rounded sqrt, so no ISA can make them differ
    eager, compiled = twin_optimizers(dtype, weight_decay=0.1, amsgrad=True, bits=bits)
    for step in range(3):
        for o in (eager, compiled):
            for p, g in zip(o.param_groups[0]["params"], grads(step)):
                p.grad = g.to(dtype)
            o.step()
    for pe, pc in zip(eager.param_groups[0]["params"], compiled.param_groups[0]["params"]):
        assert torch.equal(pe, pc)
        assert all(torch.equal(v, compiled.state[pc][k]) for k, v in eager.state[pe].items())


def test_auto_backend_uses_the_compiled_step_on_cpu_without_the_cpp_step(monkeypatch):
    from lowbit_adamw.step import cpu_kernel

    monkeypatch.setitem(cpu_kernel._lib, "lib", None)
    opt = AdamW8bit([torch.nn.Parameter(torch.randn(8192))])
    assert opt._resolve_backend(torch.device("cpu")) == "compiled"
    assert AdamW8bit([torch.nn.Parameter(torch.randn(8))], backend="torch")._resolve_backend(torch.device("cpu")) == "torch"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_compiled_and_gives_the_eager_bits(dtype, monkeypatch):
    """The compiled step draws the same counter-based numbers (lowbit_adamw.format.rng) as the eager one."""
    called = []
    real = F._compiled_spans
    monkeypatch.setattr(F, "_compiled_spans", lambda *a, **k: called.append(1) or real(*a, **k))
    torch.manual_seed(0)
    base = torch.randn(256 * 9 + 31, dtype=dtype)
    ps = [torch.nn.Parameter(base.clone()) for _ in range(2)]
    opts = [AdamW8bit([p], backend=b, stochastic_rounding=True, seed=7, lr=1e-4, min_8bit_size=0) for p, b in zip(ps, ("torch", "compiled"))]
    for step in range(3):
        g = torch.randn(base.shape, generator=torch.Generator().manual_seed(step)).to(dtype)
        for p, o in zip(ps, opts):
            p.grad = g.clone()
            o.step()
        assert torch.equal(ps[0], ps[1])
    assert called


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
