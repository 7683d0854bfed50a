"""The non-finite rule around the step: clipping over what is applied, aliased parameters, and steps
that are interrupted (an exception from a later group, a KeyboardInterrupt mid-write)."""
import signal

import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit
from lowbit_adamw import format as fmt

from helpers import backends

BLOCK = 256
SIZES = (BLOCK * 12 + 5, 4000, 300)  # a partial last block, a whole one, a tensor in fp32 state


def make(backend, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(n, generator=g)) for n in SIZES]
    return ps, AdamW8bit([("a", ps[0]), ("b", ps[1]), ("c", ps[2])], backend=backend, min_8bit_size=1024, **kw)


def grads(step):
    g = torch.Generator().manual_seed(50 + step)
    return [torch.randn(n, generator=g) * 3.0 for n in SIZES]


@pytest.mark.parametrize("backend", backends(("torch", "compiled", "cpp")))
@pytest.mark.parametrize("option", [dict(max_grad_norm=2.0), dict(clip_norm=1.5), dict(max_grad_norm=2.0, clip_norm=1.5)])
def test_a_skipped_block_does_not_count_in_the_norm_and_inf_equals_nan(backend, option):
    results = {}
    for fault in ("inf", "nan", "zero"):
        ps, opt = make(backend, **option)
        for step in range(3):
            gs = grads(step)
            if step == 1:
                value = {"inf": float("inf"), "nan": float("nan")}.get(fault)
                if value is None:
                    gs[0][BLOCK * 2:BLOCK * 3] = 0.0  # the same block, finite and zero
                else:
                    gs[0][BLOCK * 2 + 7] = value
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
        results[fault] = ps, opt
    (pi, oi), (pn, on), (pz, oz) = results["inf"], results["nan"], results["zero"]
    for i in (1, 2):  # every other tensor: identical whatever the fault, and as if the block were zero
        assert torch.equal(pi[i], pn[i]) and torch.equal(pi[i], pz[i])
        for key, value in oi.state[pi[i]].items():
            assert torch.equal(value, on.state[pn[i]][key]) and torch.equal(value, oz.state[pz[i]][key]), key
    assert torch.equal(pi[0], pn[0])  # the faulty tensor too: its bad block skipped, the rest clipped alike
    assert not torch.isnan(pi[0]).any()


def test_overlapping_views_are_refused_and_disjoint_ones_are_not():
    base = torch.randn(64, 100)
    a = nn.Parameter(base[:40])
    b = nn.Parameter(base[30:])
    with pytest.raises(ValueError, match="'a' and parameter 'b' are views of the same memory"):
        AdamW8bit([("a", a), ("b", b)])
    opt = AdamW8bit([("a", a)])
    with pytest.raises(ValueError, match="views of the same memory"):
        opt.add_param_group({"params": [("b", b)]})
    assert len(opt.param_groups) == 1
    AdamW8bit([nn.Parameter(base[:30]), nn.Parameter(base[30:])])  # neighbours
    AdamW8bit([base[:, ::2].detach().requires_grad_(), base[:, 1::2].detach().requires_grad_()])  # interleaved


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_a_duplicate_parameter_is_stepped_twice_in_order_with_any_thread_count(backend):
    """torch warns and steps a parameter listed twice twice; here that is done deterministically (one
    bucket after the other), so the C++ step's threads never update one block at once."""
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(BLOCK * 40 + 3))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = AdamW8bit([p, p], backend=backend, min_8bit_size=0)
        for step in range(3):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
        results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    torch.set_num_threads(2)
    assert torch.equal(results[0][0], results[1][0])
    # and equal to stepping a single listing twice per gradient
    torch.manual_seed(0)
    q = nn.Parameter(torch.randn(BLOCK * 40 + 3))
    single = AdamW8bit([q], backend=backend, min_8bit_size=0)
    for step in range(3):
        for _ in range(2):
            q.grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(step))
            single.step()
    assert torch.equal(q, results[0][0]) and float(results[0][1]["step"]) == 6


def snapshot(opt):
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for g in opt.param_groups for p in g["params"]]


def assert_unchanged(opt, snap):
    now = snapshot(opt)
    for (p0, s0), (p1, s1) in zip(snap, now):
        assert torch.equal(p0, p1)
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k


@pytest.mark.parametrize("bad", [RuntimeError("schedule failed"), float("nan"), -1e-3])
def test_a_later_groups_lr_failing_leaves_everything_as_it_was(bad):
    a, b = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(5000))

    def lr(update):
        if isinstance(bad, Exception) and update == 1:
            raise bad
        return bad if update == 1 else 1e-3

    opt = AdamW8bit([{"params": [a]}, {"params": [b], "lr": lr}])
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    opt.step()  # update 0: fine
    snap = snapshot(opt)
    with pytest.raises((RuntimeError, ValueError), match="schedule failed|param group 1: its lr callable returned"):
        opt.step()
    assert_unchanged(opt, snap)
    assert opt._updates == 1
    # the same on the very first step: no state is created either
    c, d = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(5000))
    fresh = AdamW8bit([{"params": [c]}, {"params": [d], "lr": lambda u: float("nan")}])
    c.grad, d.grad = torch.randn(5000), torch.randn(5000)
    with pytest.raises(ValueError, match="param group 1"):
        fresh.step()
    assert not fresh.state[c] and not fresh.state[d]


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever the process inherited: a test suite started
    in the background of a non-interactive shell inherits SIGINT ignored, and Python then installs none."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_keyboard_interrupt_lands_after_the_writes_of_a_bucket(monkeypatch, python_sigint_handler):
    """SIGINT in the middle of the eager step (weights written, codes not yet): the interrupt is
    delivered once the bucket is written whole, and the next group's bucket is not started."""
    torch.manual_seed(0)
    base = [torch.randn(BLOCK * 30 + 9) for _ in range(2)]

    def two_groups():
        ps = [nn.Parameter(b.clone()) for b in base]
        return ps, AdamW8bit([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 1e-2}], backend="torch", min_8bit_size=0)

    ref_ps, ref = two_groups()
    ps, opt = two_groups()
    g = [torch.randn(b.shape) for b in base]
    for p, gr in zip(ref_ps, g):
        p.grad = gr.clone()
    ref.step()
    for p, gr in zip(ps, g):
        p.grad = gr.clone()
    real = fmt.encode_span
    fired = []

    def encode_then_interrupt(*args, **kwargs):
        if not fired:
            fired.append(1)
            signal.raise_signal(signal.SIGINT)  # arrives between the weights' write and the codes' write
        return real(*args, **kwargs)

    monkeypatch.setattr(fmt, "encode_span", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert fired
    # group 0: wholly new, exactly the uninterrupted step; group 1: wholly old (never started: its fresh
    # state, made in the step's first phase, is still at step 0, which is the same as no state)
    assert torch.equal(ps[0], ref_ps[0])
    for k, v in ref.state[ref_ps[0]].items():
        assert torch.equal(v, opt.state[ps[0]][k]), k
    assert torch.equal(ps[1], base[1]) and float(opt.state[ps[1]]["step"]) == 0


def one_chunked_tensor(monkeypatch):
    """One 8-bit tensor that the eager step writes in 7 chunks (weights, then codes, per chunk), its
    first step taken; and the same after an uninterrupted second step."""
    monkeypatch.setattr(fmt, "CHUNK_ELEMENTS", BLOCK * 4)
    torch.manual_seed(0)
    base, grads_ = torch.randn(BLOCK * 27 + 11), [torch.randn(BLOCK * 27 + 11) for _ in range(2)]
    pair = []
    for _ in range(2):
        p = nn.Parameter(base.clone())
        opt = AdamW8bit([p], backend="torch", min_8bit_size=0)
        p.grad = grads_[0].clone()
        opt.step()
        p.grad = grads_[1].clone()
        pair.append((p, opt))
    (ref_p, ref), (p, opt) = pair
    ref.step()
    return p, opt, ref_p, ref


def raise_in_the_third_chunk(monkeypatch, sig):
    real, calls = fmt.encode_span, []

    def encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # m and v per chunk: chunks 1 and 2 are written, chunk 3's weights too
            signal.raise_signal(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(fmt, "encode_span", encode)
    return calls


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="SIGALRM is POSIX")
def test_any_python_signal_handler_waits_for_the_tensor_to_be_written_whole(monkeypatch):
    """A KeyboardInterrupt raised by a handler of another signal (a timer's SIGALRM, say), in the middle of
    one tensor's eager step: the handler runs once, after the tensor is wholly new, and what it raises
    reaches the caller."""
    p, opt, ref_p, ref = one_chunked_tensor(monkeypatch)
    handled = []

    def handler(signum, frame):
        handled.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        calls = raise_in_the_third_chunk(monkeypatch, signal.SIGALRM)
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert handled == [signal.SIGALRM] and len(calls) == 14  # 7 chunks x (m, v): every chunk written
    assert torch.equal(p, ref_p)
    for k, v in ref.state[ref_p].items():
        assert torch.equal(v, opt.state[p][k]), k
    assert signal.getsignal(signal.SIGALRM) is previous


def test_an_ignored_sigint_stays_ignored_and_the_step_completes(monkeypatch):
    p, opt, ref_p, ref = one_chunked_tensor(monkeypatch)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        raise_in_the_third_chunk(monkeypatch, signal.SIGINT)
        opt.step()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.equal(p, ref_p)
