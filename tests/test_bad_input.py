import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=0.9), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(block_size=100), "block_size"),
        (dict(min_8bit_size=-1), "min_8bit_size"),
        (dict(backend="cuda"), "backend"),
        (dict(nonfinite="zero"), "nonfinite"),
    ],
)
def test_invalid_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([nn.Parameter(torch.zeros(10))], **kwargs)


def test_invalid_group_settings_are_checked_too():
    opt = AdamW8bit([nn.Parameter(torch.zeros(10))])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(10))], "lr": -1})


def test_sparse_gradient():
    emb = nn.Embedding(100, 64, sparse=True)
    opt = AdamW8bit(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="'weight' has a sparse gradient"):
        opt.step()


def test_integer_parameters_are_refused_by_name():
    with pytest.raises(TypeError, match="'w': dtype torch.int32 is not supported"):
        AdamW8bit([("w", torch.zeros(10, dtype=torch.int32))])


def test_non_leaf_parameter():
    x = torch.zeros(10, requires_grad=True) * 2
    with pytest.raises(ValueError, match="non-leaf"):
        AdamW8bit([x])


def test_add_param_group_that_fails_validation_is_not_kept():
    opt = AdamW8bit([nn.Parameter(torch.zeros(10))])
    for bad in ({"lr": -1.0}, {"betas": (0.9, 1.5)}, {"bits": 8.0}, {"block_size": 100}):
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(10))], **bad})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.int64)]})
    assert len(opt.param_groups) == 1


def test_grad_dtype_mismatch():
    # torch's grad setter refuses other dtypes and devices; .data swaps get past it, we catch them
    p = nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([("w", p)])
    p.grad = torch.randn(5000)
    p.grad.data = torch.randn(5000, dtype=torch.bfloat16)  # torch's setter does not check .data
    with pytest.raises(RuntimeError, match="'w' has dtype torch.float32 but its gradient has dtype torch.bfloat16"):
        opt.step()


def test_nonfinite_raise_mode_changes_nothing():
    a = nn.Parameter(torch.randn(5000))
    b = nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([("a", a), ("b", b)], nonfinite="raise")
    a.grad = torch.randn(5000)
    b.grad = torch.full((5000,), float("nan"))
    a0 = a.detach().clone()
    with pytest.raises(FloatingPointError, match="'b'"):
        opt.step()
    assert torch.equal(a, a0) and not opt.state[a]
