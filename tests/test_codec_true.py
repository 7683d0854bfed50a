"""State codecs that stay true over long runs (format v4): v's dithered rounding does not drift, 4-bit m
has no sign bias, scales saturate instead of overflowing and flush denormals, and all four backends give
the same bits."""
import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit
from lowbit_adamw import format as fmt

from helpers import backends, dequantized

BACKENDS = backends(("torch", "compiled", "cpp"))


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def mixed_grads(step, n, dtype):
    """A gradient whose first half is homogeneous (v of a block within a few % of its largest: map B)
    and whose second half spans decades (map A), with blocks whose largest |g| is negative."""
    g = torch.Generator().manual_seed(100 + step)
    half = n // 2
    homogeneous = torch.randn(half, generator=g) * 0.1 + torch.where(torch.arange(half) % 512 < 256, 1.0, -1.0)
    spread = torch.randn(n - half, generator=g) * 10.0 ** (-3 * torch.rand(n - half, generator=g))
    return torch.cat([homogeneous, spread]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_every_backend_gives_the_same_bits_with_the_dither_and_both_maps(bits, dtype):
    n = 256 * 24 + 77
    runs = []
    for backend in BACKENDS:
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(n).to(dtype).to(device_of(backend)))
        opt = AdamW8bit([p], backend=backend, bits=bits, min_8bit_size=0, amsgrad=True, seed=3, lr=1e-3)
        for step in range(4):
            p.grad = mixed_grads(step, n, dtype).to(p.device)
            opt.step()
        runs.append((backend, p.detach().cpu(), {k: v.cpu() for k, v in opt.state[p].items()}))
    _, p0, s0 = runs[0]
    assert bits == 4 or (s0["exp_avg_sq_absmax"] < 0).any()  # map B is in use
    if bits == 4:
        assert (s0["exp_avg_absmax"] < 0).any()  # blocks whose largest |m| is negative
    for backend, p1, s1 in runs[1:]:
        assert torch.equal(p0, p1), backend
        for k in s0:
            assert torch.equal(s0[k], s1[k]), (backend, k)


def decoded(opt, p):
    return dequantized(opt, p, "exp_avg").reshape(-1), dequantized(opt, p, "exp_avg_sq").reshape(-1)


@pytest.mark.parametrize("bits", [8, 4])
def test_v_does_not_drift_over_3000_steps_of_stationary_noise(bits, monkeypatch):
    """Rounding v to nearest ratchets it upward (a step changes v by about 0.1%, less than half a code:
    only large upward moves survive); the dither keeps it unbiased. Nearest rounding is the control."""
    from lowbit_adamw.step import ops

    n = 16 * 1024
    gen = torch.Generator().manual_seed(1)
    sigma = 0.3 + 0.7 * torch.rand(n, generator=gen)  # v of a block spans 0.09..1 of its largest: map A
    grads = [torch.randn(n, generator=gen) * sigma for _ in range(3000)]
    biases = {}
    real = ops.adamw8bit_step
    for dither in (True, False):
        if not dither:  # the control: the same step with u = 1/2 (nearest in the value domain)
            monkeypatch.setattr(ops, "adamw8bit_step", lambda *a, **k: real(*a, **dict(k, v_dithers=None)))
        p = nn.Parameter(torch.zeros(n))
        opt = AdamW8bit([p], lr=0.0, weight_decay=0.0, bits=bits, min_8bit_size=0, backend="cpp")
        v_ref = torch.zeros(n)
        for g in grads:
            p.grad = g
            opt.step()
            v_ref.mul_(0.999).add_(g * g * (1 - 0.999))
        _, v = decoded(opt, p)
        biases[dither] = float((v - v_ref).mean() / v_ref.mean())
    # 8 bits round unbiased in 1 / sqrt(v) (lowbit_adamw.format), which leaves v slightly high (+1.3% here)
    assert abs(biases[True]) < (0.02 if bits == 8 else 0.03), biases
    assert biases[False] > 0.1, biases  # the control drifts: the test can fail


def steady_travel(backend, bits, grad, steps=100):
    """(our travel / fp32 AdamW's) per element under a constant gradient."""
    dev = device_of(backend)
    p, ref = nn.Parameter(torch.zeros(grad.numel(), device=dev)), nn.Parameter(torch.zeros(grad.numel()))
    opt = AdamW8bit([p], backend=backend, bits=bits, min_8bit_size=0, lr=1e-2, weight_decay=0.0)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        p.grad, ref.grad = grad.to(dev), grad.clone()
        opt.step()
        ref_opt.step()
    return p.detach().cpu() / ref.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_a_steady_gradient_of_either_sign_travels_as_far_as_fp32_adamw(backend, bits):
    """A block's largest |m| decodes exactly whatever its sign (4 bits: the scale's sign picks the side of
    the map), so a steady gradient of one magnitude per block moves every weight as fp32 AdamW does, in
    either direction. Magnitudes that differ within a block: within the code width per element at 8 bits;
    at 4 bits the zero-free v map overestimates the small v of a block (its smallest level is 1/16), so
    those weights move less, the same for either sign."""
    n = 256 * 8
    mags = torch.linspace(0.05, 1.0, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    per_block = mags[::256].repeat_interleave(256)
    for sign in (1.0, -1.0):
        assert steady_travel(backend, bits, sign * per_block).min() >= 0.95
    up, down = steady_travel(backend, bits, mags), steady_travel(backend, bits, -mags)
    if bits == 8:
        assert min(up.min(), down.min()) >= 0.95
    assert torch.allclose(up.mean(), down.mean(), rtol=0.01)  # no sign bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("spike,dtype", [(2e19, torch.float32), (1e30, torch.float32), (3e38, torch.bfloat16),
                                         (1e-40, torch.float32)])
def test_a_gradient_spike_or_denormal_gradients_give_no_nan(backend, bits, spike, dtype):
    """g = 2e19 squares to inf in fp32: v's scale saturates, that weight's update is 0 as in fp32 AdamW,
    and no NaN reaches its block. Gradients near 1e-40 make m's scale denormal: it is flushed to 0 rather
    than inverted (the inverse would overflow and flip m's sign)."""
    n = 256 * 6
    dev = device_of(backend)
    torch.manual_seed(0)
    w0 = torch.randn(n).to(dtype)
    p = nn.Parameter(w0.clone().to(dev))
    opt = AdamW8bit([p], backend=backend, bits=bits, min_8bit_size=0, lr=1e-3, weight_decay=0.0)
    for step in range(5):
        if spike < 1:
            g = torch.full((n,), spike) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
        else:
            g = torch.randn(n, generator=torch.Generator().manual_seed(step)) * 1e-2
            if step == 1:
                g[300] = spike
        p.grad = g.to(dtype).to(dev)
        opt.step()
        assert torch.isfinite(p).all(), step
        for k, v in opt.state[p].items():
            if v.dtype == torch.float32:
                assert torch.isfinite(v).all(), (step, k)
    if spike >= 1:
        moved = (p.detach().cpu().float() - w0.float()).abs()
        assert moved[300] <= 2e-3 * 1.01  # the spiked weight took about one lr-sized step, then stopped (v is huge)
        m, v = decoded(opt, p)
        assert v.cpu()[300] > 1e30
    else:
        m, _ = decoded(opt, p)
        assert (m.cpu() * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0) >= 0).all()  # never the wrong sign


def test_format_v3_state_decodes_unchanged_and_loads_without_conversion():
    p = nn.Parameter(torch.randn(256 * 5 + 3))
    opt = AdamW8bit([p], min_8bit_size=0, bits=4)
    for step in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    state = sd["state"][0]
    for name in ("exp_avg", "exp_avg_sq"):  # what v3 could have written: non-negative scales
        state[name + "_absmax"] = state[name + "_absmax"].abs()
    sd["lowbit_adamw"]["format_version"] = 3
    for g in sd["param_groups"]:
        g["lowbit_format_version"] = 3
    q = nn.Parameter(p.detach().clone())
    new = AdamW8bit([q], min_8bit_size=0, bits=4)
    new.load_state_dict(sd)
    for name in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
        assert torch.equal(new.state[q][name], state[name])
    assert new.state_dict()["lowbit_adamw"]["format_version"] == fmt.FORMAT_VERSION == 4
