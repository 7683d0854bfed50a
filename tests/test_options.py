"""Keras/MLX-style options (clip_value, clip_norm, max_grad_norm, loss_scale, accumulation_steps,
callable lr) and GradScaler's fused path. Each is held to a plain implementation of its formula:
the option applied inside the step must equal feeding the transformed gradient to a plain step,
on the eager path, the compiled path and the Triton kernel (under the interpreter)."""

import warnings

import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit

from helpers import backends

SIZES = (256 * 20 + 33, 5000, 300)  # a partial block, and one small tensor kept in fp32 state


def dev(backend="torch"):
    """The Triton backend runs on CUDA tensors on a GPU machine, on CPU tensors under the interpreter."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def params(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(device)) for n in SIZES]


def grad_stream(steps, scale=1.0):
    g = torch.Generator().manual_seed(7)
    return [[torch.randn(n, generator=g) * scale * (3.0 if k % 2 else 0.2) for n in SIZES] for k in range(steps)]


def assert_same(a, b):
    """The same bits: the option inside the step and the transformed gradient outside take the same
    fp32 operations (lowbit_adamw.format.step_spec), on the same backend."""
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert torch.equal(pa, pb), (pa - pb).abs().max()
        for key, va in a.state[pa].items():
            vb = b.state[pb][key]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), key


def run_pair(backend, option_kw, transform, steps=3, feed=lambda g: g):
    """Optimizer with the option, fed feed(g); plain optimizer fed transform(g). Must end identical."""
    a = AdamW8bit(params(device=dev(backend)), backend=backend, min_8bit_size=1024, **option_kw)
    b = AdamW8bit(params(device=dev(backend)), backend=backend, min_8bit_size=1024)
    for gs in grad_stream(steps):
        gs = [g.to(dev(backend)) for g in gs]
        for p, g in zip(a.param_groups[0]["params"], gs):
            p.grad = feed(g.clone())
        for p, g in zip(b.param_groups[0]["params"], transform(gs)):
            p.grad = g.clone()
        a.step()
        b.step()
    return a, b


@pytest.mark.parametrize("backend", backends())
def test_clip_value_is_an_element_clamp(backend):
    a, b = run_pair(backend, dict(clip_value=0.5), lambda gs: [g.clamp(-0.5, 0.5) for g in gs])
    assert_same(a, b)


@pytest.mark.parametrize("backend", backends())
def test_loss_scale_divides_the_gradient(backend):
    a, b = run_pair(backend, dict(loss_scale=1024.0), lambda gs: gs, feed=lambda g: g * 1024.0)
    assert_same(a, b)


def spec_norm(g, quantized=True, block=256):
    """lowbit_adamw.step.clipping's norm, written out: per block, then over the blocks (fp32); a tensor in
    fp32 state (the 300-element one) as a whole."""
    g = g.reshape(-1).float()
    if not quantized:
        return torch.linalg.vector_norm(g)
    n = g.numel() // block * block
    parts = [torch.linalg.vector_norm(g[:n].view(-1, block), dim=1)]
    if n < g.numel():
        parts.append(torch.linalg.vector_norm(g[n:].view(1, -1), dim=1))
    return torch.linalg.vector_norm(torch.cat(parts))


def quantized_sizes():
    return [n >= 1024 for n in SIZES]  # min_8bit_size=1024 in run_pair


@pytest.mark.parametrize("backend", backends())
def test_clip_norm_per_tensor(backend):
    c = 5.0

    def clipped(gs):
        out = []
        for g, q in zip(gs, quantized_sizes()):
            n = spec_norm(g, q)
            out.append(g * torch.where(n > c, torch.tensor(c) / n, torch.ones_like(n)))  # (c / n would round twice: reciprocal, multiply)
        return out

    a, b = run_pair(backend, dict(clip_norm=c), clipped)
    assert_same(a, b)


@pytest.mark.parametrize("backend", backends())
def test_max_grad_norm_matches_clip_grad_norm_(backend):
    def clipped(gs):
        total = torch.linalg.vector_norm(torch.stack([spec_norm(g, q) for g, q in zip(gs, quantized_sizes())]))
        coef = torch.clamp(torch.tensor(4.0) / (total + 1e-6), max=1.0)  # clip_grad_norm_'s rule, in fp32
        return [g * coef for g in gs]

    a, b = run_pair(backend, dict(max_grad_norm=4.0), clipped)
    assert_same(a, b)
    # and against torch's own clip_grad_norm_ (its own summation order: allow the last bits)
    c = AdamW8bit(params(device=dev(backend)), backend=backend, min_8bit_size=1024)
    for gs in grad_stream(3):
        for p, g in zip(c.param_groups[0]["params"], gs):
            p.grad = g.to(p.device)
        torch.nn.utils.clip_grad_norm_(c.param_groups[0]["params"], 4.0)
        c.step()
    for pa, pc in zip(a.param_groups[0]["params"], c.param_groups[0]["params"]):
        torch.testing.assert_close(pa, pc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
def test_accumulation_steps_updates_every_n_calls_with_the_mean(backend):
    n = 3
    a = AdamW8bit(params(device=dev(backend)), backend=backend, min_8bit_size=1024, accumulation_steps=n)
    b = AdamW8bit(params(device=dev(backend)), backend=backend, min_8bit_size=1024)
    stream = [[g.to(dev(backend)) for g in gs] for gs in grad_stream(2 * n)]
    start = [p.detach().clone() for p in a.param_groups[0]["params"]]
    for k, gs in enumerate(stream):
        for p, g in zip(a.param_groups[0]["params"], gs):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)  # what autograd does without zeroing
        a.step()
        a.zero_grad()
        if k == 0:  # mid-accumulation: nothing moved, nothing zeroed
            assert all(torch.equal(p, s) for p, s in zip(a.param_groups[0]["params"], start))
            assert all(p.grad is not None for p in a.param_groups[0]["params"])
        if k % n == n - 1:
            window = stream[k - n + 1:k + 1]
            for i, p in enumerate(b.param_groups[0]["params"]):
                total = window[0][i].clone()
                for gs2 in window[1:]:
                    total.add_(gs2[i])
                p.grad = total * (1.0 / n)
            b.step()
            assert all(p.grad is None for p in a.param_groups[0]["params"])  # zeroed after the update
    assert_same(a, b)
    assert {float(s["step"]) for s in a.state.values()} == {2.0}


def test_accumulation_detects_a_reset_gradient():
    a = AdamW8bit(params(), accumulation_steps=2)
    for p in a.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    a.step()
    for p in a.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)  # what model.zero_grad() + backward gives: a new .grad
    with pytest.raises(RuntimeError, match="reset between micro-steps"):
        a.step()


def test_callable_lr_gets_the_update_count():
    seen = []

    def schedule(step):
        seen.append(step)
        return 1e-2 / (1 + step)

    a = AdamW8bit(params(), lr=schedule, min_8bit_size=1024)
    b = AdamW8bit(params(), lr=1e-2, min_8bit_size=1024)
    for k, gs in enumerate(grad_stream(3)):
        for o in (a, b):
            for p, g in zip(o.param_groups[0]["params"], gs):
                p.grad = g.clone()
        b.param_groups[0]["lr"] = 1e-2 / (1 + k)
        a.step()
        b.step()
    assert seen == [0, 1, 2]
    assert_same(a, b)


@pytest.mark.parametrize("backend", backends())
def test_grad_scaler_fused_path_unscales_inside_and_skips_on_inf(backend):
    assert AdamW8bit._step_supports_amp_scaling
    d = dev(backend)
    a = AdamW8bit(params(device=d), backend=backend, min_8bit_size=1024)
    b = AdamW8bit(params(device=d), backend=backend, min_8bit_size=1024)
    scaler = torch.amp.GradScaler(d, init_scale=2.0**10, growth_interval=1000)
    for k, gs in enumerate(grad_stream(3)):
        gs = [g.to(d) for g in gs]
        scaler.scale(torch.ones((), device=d))  # what scaler.scale(loss) does each iteration (creates the scale lazily)
        for p, g in zip(a.param_groups[0]["params"], gs):
            p.grad = g * scaler.get_scale()  # what backward of a scaled loss gives
        if k == 1:
            a.param_groups[0]["params"][0].grad[3] = float("inf")
        raw = [p.grad.clone() for p in a.param_groups[0]["params"]]
        scaler.step(a)
        scaler.update()
        # The fused path: gradients were not unscaled in place by the scaler.
        assert all(torch.equal(p.grad, r) for p, r in zip(a.param_groups[0]["params"], raw))
        if k != 1:
            for p, g in zip(b.param_groups[0]["params"], gs):
                p.grad = g.clone()
            b.step()
    assert scaler.get_scale() == 2.0**9
    assert_same(a, b)


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match="clip_value and clip_norm are exclusive"):
        AdamW8bit(params(), clip_value=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        AdamW8bit(params(), accumulation_steps=0)
    with pytest.raises(ValueError, match="loss_scale must be > 0"):
        AdamW8bit(params(), loss_scale=0.0)
    with pytest.raises(ValueError, match="Invalid clip_norm"):
        AdamW8bit(params(), clip_norm=-1.0)
    a = AdamW8bit(params(), accumulation_steps=2)
    a.grad_scale, a.found_inf = torch.tensor(2.0), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="accumulation_steps > 1 with GradScaler"):
        a.step()


def plain_ema(weights_per_step, decay):
    """Keras' formula: the first update copies the weights, then ema = decay * ema + (1 - decay) * w."""
    ema = None
    for w in weights_per_step:
        ema = w.float().clone() if ema is None else ema * decay + w.float() * (1.0 - decay)
    return ema


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_follows_the_plain_formula(backend, dtype):
    decay = 0.9
    a = AdamW8bit([torch.nn.Parameter(p.detach().to(dtype)) for p in params(device=dev(backend))], backend=backend,
                  min_8bit_size=1024, ema_decay=decay)
    history = [[] for _ in SIZES]
    for gs in grad_stream(4):
        for p, g in zip(a.param_groups[0]["params"], gs):
            p.grad = g.to(device=p.device, dtype=dtype)
        a.step()
        for h, p in zip(history, a.param_groups[0]["params"]):
            h.append(p.detach().clone())
    for h, p in zip(history, a.param_groups[0]["params"]):
        ema = a.state[p]["ema"]
        assert ema.dtype == torch.float32
        # step_spec: ema * mom + w * (1 - mom), each op rounded on its own, 1 - mom rounded once on the host
        assert torch.equal(ema, plain_ema(h, decay))


def test_ema_state_dict_round_trip_and_copy_to_params():
    a = AdamW8bit(params(), min_8bit_size=1024, ema_decay=0.5, ema_overwrite_frequency=None)
    for gs in grad_stream(2):
        for p, g in zip(a.param_groups[0]["params"], gs):
            p.grad = g.clone()
        a.step()
    sd = a.state_dict()
    b = AdamW8bit(params(), min_8bit_size=1024, ema_decay=0.5)
    b.load_state_dict(sd)
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert torch.equal(a.state[pa]["ema"], b.state[pb]["ema"])
    b.copy_ema_to_params()
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert torch.equal(pb, a.state[pa]["ema"])
    from lowbit_adamw.memory import optimizer_state_bytes

    assert optimizer_state_bytes(a)["ema"] == 4 * sum(SIZES)
    with pytest.raises(RuntimeError, match="without ema_decay"):
        AdamW8bit(params()).copy_ema_to_params()
    # converting to torch's AdamW format and back keeps the EMA
    from lowbit_adamw import load_torch_adamw_state_dict, to_torch_adamw_state_dict

    c = AdamW8bit(params(), min_8bit_size=1024, ema_decay=0.5)
    load_torch_adamw_state_dict(c, to_torch_adamw_state_dict(a))
    for pa, pc in zip(a.param_groups[0]["params"], c.param_groups[0]["params"]):
        assert torch.equal(a.state[pa]["ema"], c.state[pc]["ema"])
    d = AdamW8bit(params(), min_8bit_size=1024, ema_decay=0.5)  # and through load_state_dict's converter
    with pytest.warns(UserWarning, match="converted a torch.optim.AdamW state dict"):
        d.load_state_dict(to_torch_adamw_state_dict(a))
    for pa, pd in zip(a.param_groups[0]["params"], d.param_groups[0]["params"]):
        assert torch.equal(a.state[pa]["ema"], d.state[pd]["ema"])


def test_ema_overwrite_frequency_writes_the_average_into_the_weights():
    a = AdamW8bit(params(), min_8bit_size=1024, ema_decay=0.9, ema_overwrite_frequency=2)
    for k, gs in enumerate(grad_stream(3)):
        for p, g in zip(a.param_groups[0]["params"], gs):
            p.grad = g.clone()
        a.step()
        same = [torch.equal(p, a.state[p]["ema"]) for p in a.param_groups[0]["params"]]
        # update 1: the average starts at the weights; 2: overwritten into them; 3: they part again
        assert all(same) if k < 2 else not any(same)
    with pytest.raises(ValueError, match="ema_overwrite_frequency needs ema_decay"):
        AdamW8bit(params(), ema_overwrite_frequency=2)


def test_first_step_says_when_min_8bit_size_keeps_most_state_fp32():
    # LoRA with r=8 on a 384-wide model: every adapter matrix has 3072 elements, under min_8bit_size=4096
    adapters = [nn.Parameter(torch.randn(8, 384) * 0.01) for _ in range(26)]
    big = nn.Parameter(torch.randn(64, 128))  # quantized
    opt = AdamW8bit(adapters + [big], lr=1e-3)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match=r"26 tensors \(91% of the parameters with state\) keep fp32 state.*"
                                         r"min_8bit_size=0 would save 0\.45 MiB"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once only
        zero = AdamW8bit(adapters, lr=1e-3, min_8bit_size=0)
        zero.step()
        assert all("exp_avg_codes" in zero.state[p] for p in adapters)
        few = AdamW8bit([big] + adapters[:3], lr=1e-3)  # a few small tensors (biases, norms): nothing to say
        few.step()
