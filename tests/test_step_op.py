"""The step op (``torch.ops.lowbit_adamw.step_``) and its direct call in plain eager code.

Eager steps run the op's body without the dispatcher's Python layers (``ops.call_step_``); anything
that watches ops (a dispatch or function mode, torch.compile, tensor subclasses) goes through the op.
Both must give the same bits, bump the version counters of what they write (as torch's AdamW does),
and show as ``lowbit_adamw::step_`` in a profile."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit_adamw import AdamW8bit
from lowbit_adamw.step import ops

SIZES = (5000, 300, 7)  # two quantized tensors and one that keeps fp32 state (under min_8bit_size=64)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    return params, AdamW8bit(params, min_8bit_size=64, **kw)


def set_grads(params, step):
    g = torch.Generator().manual_seed(10 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [{}, dict(bits=4, amsgrad=True, ema_decay=0.9)])
def test_the_direct_call_and_the_dispatched_op_give_the_same_bits(kw, monkeypatch):
    direct_params, direct = make(**kw)
    op_params, dispatched = make(**kw)
    calls = []
    op = ops.step_
    monkeypatch.setattr(ops, "step_", lambda *a: calls.append(1) or op(*a))
    for step in range(3):
        set_grads(direct_params, step)
        set_grads(op_params, step)
        direct.step()
        assert not calls  # plain eager: the op's body, not the dispatcher
        log = OpLog()
        with log:
            dispatched.step()
        assert calls and "lowbit_adamw.step_.default" in log.names  # a dispatch mode sees the op itself
        calls.clear()
        for a, b in zip(direct_params, op_params):
            assert torch.equal(a, b)
            for k, v in direct.state[a].items():
                assert torch.equal(v, dispatched.state[b][k]), k


def test_a_step_bumps_the_versions_of_what_it_writes_as_torch_adamw_foreach_does():
    params, opt = make()
    set_grads(params, 0)
    opt.step()  # the first step creates the state
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(torch_params, foreach=True)  # (torch's fused kernel bumps none; its other two do)
    for p, tp in zip(params, torch_params):
        tp.grad = p.grad.clone()
    before = [p._version for p in torch_params]
    torch_opt.step()
    assert all(tp._version > v for tp, v in zip(torch_params, before))  # the contract: in-place writes are visible
    tensors = [t for p in params for t in [p, *(v for v in opt.state[p].values() if isinstance(v, torch.Tensor))]]
    before = [t._version for t in tensors]
    opt.step()
    stale = [i for i, (t, v) in enumerate(zip(tensors, before)) if t._version <= v]
    assert not stale, f"{len(stale)} of {len(tensors)} written tensors kept their version"


def test_a_weight_saved_for_backward_is_caught_when_the_step_overwrites_it():
    # What the version counters are for: autograd refuses to backpropagate through a weight the
    # optimizer changed after the forward pass saved it.
    params, opt = make()
    set_grads(params, 0)
    opt.step()
    loss = (params[0] * params[0]).sum()  # saves params[0] for backward
    set_grads(params, 1)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_an_eager_step_shows_as_the_op_in_a_profile():
    params, opt = make()
    set_grads(params, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "lowbit_adamw::step_" in {e.name for e in prof.events()}


def test_step_counters_of_another_shape_take_the_one_by_one_path():
    # A counter saved as a 1-element 1-d tensor cannot be stacked with 0-d ones: each is incremented
    # on its own, with the same result.
    a_params, a = make()
    b_params, b = make()
    for step in range(2):
        set_grads(a_params, step)
        set_grads(b_params, step)
        a.step()
        if step == 0:
            b.step()
            b.state[b_params[1]]["step"] = b.state[b_params[1]]["step"].reshape(1)
        else:
            b.step()
    assert float(b.state[b_params[1]]["step"]) == float(a.state[a_params[1]]["step"]) == 2.0
    for pa, pb in zip(a_params, b_params):
        assert torch.equal(pa, pb)
