"""``torch.compile`` of the optimizer step: one op per bucket (``torch.ops.lowbit_adamw.step_``), no graph
break with ``fullgraph=True``, the eager step's bits, and no recompile when a scheduler changes a
tensor lr. The graphs are compiled with the ``aot_eager`` backend (what dynamo and AOT autograd see,
without spending the suite's time in inductor; the ops are opaque to inductor too)."""
import copy

import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # dynamo caches compiled code per code object (optimizer.step's wrapper is shared by every optimizer)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pair(seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(37, 300), nn.Tanh(), nn.Linear(300, 7)).to(device)  # 11100 and 2100 weights, small biases
    m2 = copy.deepcopy(m)
    return m, AdamW8bit(m.parameters(), **kw), m2, AdamW8bit(m2.parameters(), **copy.deepcopy(kw))


def backward(m, k, device="cpu"):
    x = torch.randn(16, 37, generator=torch.Generator().manual_seed(k)).to(device)
    m.zero_grad()
    (m(x * (k + 1)) ** 2).mean().backward()


class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)


def assert_same(m, opt, m2, opt2):
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key


@pytest.mark.parametrize("kw", [dict(min_8bit_size=1024), dict(min_8bit_size=1024, bits=4, amsgrad=True),
                                dict(min_8bit_size=1024, ema_decay=0.9, max_grad_norm=0.5, weight_decay=0.1),
                                dict(min_8bit_size=1024, clip_norm=0.1, maximize=True, nonfinite="ignore")],
                         ids=["8bit", "4bit-amsgrad", "ema-max_grad_norm", "clip_norm-maximize"])
def test_fullgraph_compile_gives_the_eager_bits_without_recompiling(kw):
    m, opt, m2, opt2 = pair(**kw)
    backend = CountingBackend()
    step = torch.compile(opt.step, fullgraph=True, backend=backend)
    for k in range(4):
        backward(m, k)
        backward(m2, k)
        step()
        opt2.step()
        assert_same(m, opt, m2, opt2)
    assert backend.graphs == 1


def test_a_scheduler_filling_a_tensor_lr_does_not_recompile():
    m, opt, m2, opt2 = pair(min_8bit_size=1024, lr=torch.tensor(1e-2))
    s, s2 = torch.optim.lr_scheduler.StepLR(opt, 1, 0.8), torch.optim.lr_scheduler.StepLR(opt2, 1, 0.8)
    backend = CountingBackend()

    @torch.compile(backend=backend)  # the scheduler wraps opt.step in a function dynamo does not trace (as for torch's AdamW)
    def step():
        opt.step()

    for k in range(4):
        backward(m, k)
        backward(m2, k)
        step()
        opt2.step()
        s.step()
        s2.step()
        assert_same(m, opt, m2, opt2)
    assert backend.graphs == 1
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.8**4)


def test_nonfinite_counts_of_a_compiled_step_are_reported_at_the_next_eager_call():
    m, opt, _, _ = pair(min_8bit_size=1024)
    step = torch.compile(opt.step, fullgraph=True, backend=CountingBackend())
    for k in range(2):
        backward(m, k)
        m[0].weight.grad[0, 0] = float("nan")
        step()
    with pytest.warns(RuntimeWarning, match=r"parameter 0 of its param group \(shape \(300, 37\)\) \(2 blocks of 256\)"):
        assert opt.nonfinite_skipped == {"parameter 0 of its param group (shape (300, 37))": 2}


def test_fullgraph_compile_under_the_triton_interpreter():
    from lowbit_adamw.step.kernel_launch import triton_available

    if not triton_available():
        pytest.skip("needs Triton's interpreter or a GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, opt, m2, opt2 = pair(device=device, min_8bit_size=1024, backend="triton")
    step = torch.compile(opt.step, fullgraph=True, backend=CountingBackend())
    for k in range(2):
        backward(m, k, device)
        backward(m2, k, device)
        step()
        opt2.step()
        assert_same(m, opt, m2, opt2)
