"""The PyTorch step against torch.optim.AdamW (fp32) and bitsandbytes' AdamW8bit (second reference).

Tolerance: 8-bit state differs from fp32 state by its quantization error (a few % of each moment,
see test_format), so trajectories drift apart slowly. We hold the drift of the parameters, relative to
how far fp32 AdamW moved them, under 10% after 150 steps on a real LM, and under bitsandbytes'
AdamW8bit drift on the same run: that is the 8-bit error users already accept.
"""
import pytest
import torch

from lowbit_adamw import AdamW8bit

from helpers import tiny_model, train

STEPS = 150


def drift(model, ref, init):
    num = sum((p - q).norm() ** 2 for p, q in zip(model.parameters(), ref.parameters())) ** 0.5
    den = sum((q - p0).norm() ** 2 for q, p0 in zip(ref.parameters(), init)) ** 0.5
    return (num / den).item()


@pytest.fixture(scope="module")
def runs():
    init = [p.detach().clone() for p in tiny_model().parameters()]
    out = {}
    for name in ("torch", "lowbit", "bnb"):
        model = tiny_model()
        if name == "torch":
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        elif name == "lowbit":
            opt = AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=1024)
        else:
            bnb = pytest.importorskip("bitsandbytes")
            opt = bnb.optim.AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=1024)
        out[name] = (model, train(model, opt, STEPS), opt)
    return init, out


def test_trajectory_stays_close_to_fp32_adamw(runs):
    init, out = runs
    ref_model, ref_losses, _ = out["torch"]
    model, losses, opt = out["lowbit"]
    assert any("exp_avg_codes" in s for s in opt.state.values())
    assert drift(model, ref_model, init) < 0.10
    tail = lambda xs: sum(xs[-20:]) / 20  # noqa: E731
    assert abs(tail(losses) - tail(ref_losses)) / tail(ref_losses) < 0.02


def test_error_not_larger_than_bitsandbytes(runs):
    init, out = runs
    ours = drift(out["lowbit"][0], out["torch"][0], init)
    theirs = drift(out["bnb"][0], out["torch"][0], init)
    assert ours <= theirs, (ours, theirs)


@pytest.mark.parametrize("amsgrad,maximize,wd", [(False, False, 0.0), (True, False, 0.1), (False, True, 0.01)])
def test_fp32_state_params_match_torch_exactly(amsgrad, maximize, wd):
    """Small tensors keep fp32 state and go through torch's own fused AdamW: bit-identical to it."""
    a = torch.nn.Parameter(torch.randn(30, 40))
    b = torch.nn.Parameter(a.detach().clone())
    oa = torch.optim.AdamW([a], lr=1e-2, amsgrad=amsgrad, maximize=maximize, weight_decay=wd, fused=True)
    ob = AdamW8bit([b], lr=1e-2, amsgrad=amsgrad, maximize=maximize, weight_decay=wd)
    for _ in range(10):
        g = torch.randn(30, 40)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)
    assert "exp_avg" in ob.state[b] and ob.state[b]["exp_avg"].dtype == torch.float32


def test_amsgrad_and_maximize_8bit_track_torch():
    for kw in (dict(amsgrad=True), dict(maximize=True), dict(weight_decay=0.5)):
        a = torch.nn.Parameter(torch.randn(5000))
        b = torch.nn.Parameter(a.detach().clone())
        p0 = a.detach().clone()
        oa = torch.optim.AdamW([a], lr=1e-2, **kw)
        ob = AdamW8bit([b], lr=1e-2, **kw)
        for _ in range(30):
            g = torch.randn(5000) * 0.1 + 0.05
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        assert ((a - b).norm() / (a - p0).norm()).item() < 0.05, kw


def test_bias_correction_off_matches_formula():
    p = torch.nn.Parameter(torch.randn(4096))
    p0 = p.detach().clone()
    opt = AdamW8bit([p], lr=1e-2, weight_decay=0.0, bias_correction=False)
    g = torch.randn(4096)
    p.grad = g
    opt.step()
    # t=1 without correction: m = 0.1 g, v = 0.001 g^2, update = lr * 0.1 g / (sqrt(0.001) |g| + eps)
    expected = p0 - 1e-2 * 0.1 * g / ((0.001 * g * g).sqrt() + 1e-8)
    assert torch.allclose(p, expected, rtol=1e-5, atol=1e-7)
