"""The default non-finite rule (lowbit_adamw.format.step_spec): a quantization block whose gradient holds NaN
or Inf keeps its parameter values, codes, scale and EMA bit for bit, the rest of the tensor updates,
inside the step's own pass on every backend, and a warning names the tensor."""
import warnings

import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit
from lowbit_adamw.step.kernel_launch import triton_available

N, BLOCK = 5000, 256  # 19 whole blocks and a short one
BACKENDS = ["torch", "compiled", "cpp"] + (["triton"] if triton_available() else [])


def run(backend, bad_at=(17, 4999), ema=False):
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(N))
    b = nn.Parameter(torch.randn(N))
    opt = AdamW8bit([("a", a), ("b", b)], backend=backend, ema_decay=0.9 if ema else None)
    for p in (a, b):
        p.grad = torch.randn(N)
    opt.step()
    before = a.detach().clone(), {k: v.clone() for k, v in opt.state[a].items()}, b.detach().clone()
    a.grad = torch.randn(N)
    for i, bad in zip(bad_at, (float("nan"), float("inf"), -float("inf"))):
        a.grad[i] = bad
    b.grad = torch.randn(N)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return opt, a, b, before, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def block_of(i):
    return slice(i // BLOCK * BLOCK, min(N, (i // BLOCK + 1) * BLOCK)), i // BLOCK


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_block_is_left_exactly_as_it_was_and_the_rest_updates(backend):
    opt, a, b, (a0, s0, b0), messages = run(backend, ema=True)
    st = opt.state[a]
    bad_blocks = [block_of(i) for i in (17, 4999)]
    for sl, blk in bad_blocks:
        assert torch.equal(a[sl], a0[sl])
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[name + "_codes"][sl], s0[name + "_codes"][sl])
            assert torch.equal(st[name + "_absmax"][blk], s0[name + "_absmax"][blk])
        assert torch.equal(st["ema"][sl], s0["ema"][sl])
    good = torch.ones(N, dtype=torch.bool)
    for sl, _ in bad_blocks:
        good[sl] = False
    assert (a[good] != a0[good]).float().mean() > 0.99  # the other 18 blocks moved
    assert torch.isfinite(a).all() and torch.isfinite(st["exp_avg_absmax"]).all()
    assert not torch.equal(b, b0)
    assert float(st["step"]) == 2  # the tensor's step count advances
    assert any("'a' (2 blocks of 256)" in m for m in messages), messages
    assert not any("'b'" in m for m in messages)
    assert opt.nonfinite_skipped == {"parameter 'a'": 2}


def test_every_backend_gives_the_same_bits_around_bad_blocks():
    results = [run(be) for be in BACKENDS]
    ref_opt, ref_a, ref_b = results[0][:3]
    for opt, a, b, *_ in results[1:]:
        assert torch.equal(a, ref_a) and torch.equal(b, ref_b)
        assert all(torch.equal(v, opt.state[a][k]) for k, v in ref_opt.state[ref_a].items())


@pytest.mark.parametrize("backend", ["compiled", "cpp"])
def test_default_step_has_no_checking_pass(monkeypatch, backend):
    def forbidden(*a, **k):
        raise AssertionError("the default rule needs no separate pass over the gradients")

    monkeypatch.setattr(AdamW8bit, "_check_all_finite", forbidden)
    opt, a, *_ = run(backend)
    assert opt.nonfinite_skipped == {"parameter 'a'": 2}


def test_fp32_state_tensor_is_skipped_whole():
    w = nn.Parameter(torch.randn(100))  # below min_8bit_size: fp32 state, torch's fused AdamW
    big = nn.Parameter(torch.randn(N))
    opt = AdamW8bit([("w", w), ("big", big)])
    for p in (w, big):
        p.grad = torch.randn_like(p)
    opt.step()
    w0, s0 = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
    w.grad = torch.randn(100)
    w.grad[3] = float("nan")
    big.grad = torch.randn(N)
    with pytest.warns(RuntimeWarning, match="'w'"):
        opt.step()
    assert torch.equal(w, w0)
    assert torch.equal(opt.state[w]["exp_avg"], s0["exp_avg"]) and torch.equal(opt.state[w]["exp_avg_sq"], s0["exp_avg_sq"])
    assert float(opt.state[w]["step"]) == 2
    assert opt.nonfinite_skipped == {"parameter 'w'": 1}


def test_counts_on_a_device_are_read_only_once_they_have_landed():
    # On a GPU the counts travel to pinned host memory with a non-blocking copy; the step never waits.
    class Event:
        done = False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    opt = AdamW8bit([nn.Parameter(torch.randn(10))])
    ev = Event()
    opt._reporter.pending.append((torch.tensor([0, 3], dtype=torch.int32), ["x", "y"], 256, ev))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt._reporter.report(wait=False)  # not landed: nothing read, nothing said
    assert len(opt._reporter.pending) == 1
    with pytest.warns(RuntimeWarning, match=r"y \(3 blocks of 256\)"):
        assert opt.nonfinite_skipped == {"y": 3}  # reading the totals waits for the copy
    assert not opt._reporter.pending


def test_nonfinite_ignore_does_not_check():
    a = nn.Parameter(torch.randn(N))
    opt = AdamW8bit([a], nonfinite="ignore", backend="torch")
    a.grad = torch.randn(N)
    a.grad[0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.isnan(a[:BLOCK]).any()  # NaN propagates, as in torch
