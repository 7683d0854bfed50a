import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit
from lowbit_adamw.memory import optimizer_state_bytes

from helpers import tiny_model, train


def quad_problem(n=5000, dtype=torch.float32):
    target = torch.randn(n)
    p = nn.Parameter(torch.zeros(n, dtype=dtype))
    return p, target


def test_defaults_match_torch_adamw():
    p = nn.Parameter(torch.zeros(10))
    ours, theirs = AdamW8bit([p]).defaults, torch.optim.AdamW([p]).defaults
    for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "fused"):
        assert ours[k] == theirs[k], k


def test_closure_is_called_and_loss_returned():
    p, target = quad_problem()
    opt = AdamW8bit([p], lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = ((p - target) ** 2).sum()
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(50):
        last = opt.step(closure).item()
    assert len(calls) == 51 and last < 0.1 * first


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, 5, 0.5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 20),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20),  # cycles betas[0]
        lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.001, 0.05, step_size_up=5),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, total_iters=10),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o),
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o, [torch.optim.lr_scheduler.ConstantLR(o, 0.5, 3), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], [3]
        ),
    ],
)
def test_schedulers_drive_the_step(make):
    """Each scheduler's lr/betas reach the update: our 8-bit run follows the fp32 torch run with the same schedule."""
    runs = []
    for cls in (torch.optim.AdamW, AdamW8bit):
        torch.manual_seed(0)
        p, target = quad_problem()
        opt = cls([p], lr=0.01)
        sched = make(opt)
        lrs = []
        for _ in range(20):
            opt.zero_grad()
            loss = ((p - target) ** 2).sum()
            loss.backward()
            opt.step()
            lrs.append((opt.param_groups[0]["lr"], tuple(opt.param_groups[0]["betas"])))
            sched.step(loss.item()) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) else sched.step()
        runs.append((p.detach(), lrs))
    (pa, la), (pb, lb) = runs
    assert la == lb
    assert (pa - pb).norm() / pa.norm() < 0.05  # 8-bit moments (v dithered: unbiased over long runs, noisier over 20 steps)


def test_lr_as_tensor_and_param_groups_with_own_settings():
    a = nn.Parameter(torch.ones(5000))
    b = nn.Parameter(torch.ones(5000))
    opt = AdamW8bit([{"params": [a]}, {"params": [b], "lr": 0.0, "weight_decay": 0.0}], lr=torch.tensor(0.1), weight_decay=0.0)
    a.grad = torch.ones(5000)
    b.grad = torch.ones(5000)
    opt.step()
    assert torch.allclose(a, torch.full_like(a, 0.9), atol=1e-5)  # first Adam step moves by lr
    assert torch.equal(b, torch.ones(5000))


def test_add_param_group_and_zero_grad():
    a = nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([a])
    b = nn.Parameter(torch.randn(6000))
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert opt.param_groups[1]["block_size"] == 256 and opt.param_groups[1]["lr"] == 0.5
    b0 = b.detach().clone()
    b.grad = torch.randn(6000)
    opt.step()
    assert not torch.equal(b, b0) and "exp_avg_codes" in opt.state[b]
    opt.zero_grad()
    assert b.grad is None


def test_fp32_state_by_param_module_and_type():
    model = tiny_model()
    opt = AdamW8bit(model.parameters(), fp32_state=[nn.Embedding], model=model, min_8bit_size=1024)
    train(model, opt, 2)
    assert "exp_avg" in opt.state[model.embed.weight] and opt.state[model.embed.weight]["exp_avg"].dtype == torch.float32
    assert "exp_avg_codes" in opt.state[model.head.weight]
    # by module, after training started: converted in place (dequantized), training continues
    opt.force_fp32_state(model.head)
    assert "exp_avg" in opt.state[model.head.weight] and "exp_avg_codes" not in opt.state[model.head.weight]
    train(model, opt, 1)
    # by parameter, and per group
    p = nn.Parameter(torch.randn(8192))
    opt2 = AdamW8bit([p], fp32_state=[p])
    q = nn.Parameter(torch.randn(8192))
    opt2.add_param_group({"params": [q], "fp32_state": True})
    p.grad, q.grad = torch.randn(8192), torch.randn(8192)
    opt2.step()
    assert "exp_avg" in opt2.state[p] and "exp_avg" in opt2.state[q]
    with pytest.raises(ValueError, match="model="):
        AdamW8bit([p], fp32_state=[nn.Embedding])


def test_min_8bit_size_and_state_bytes_per_param():
    big = nn.Parameter(torch.randn(1_000_003))
    small = nn.Parameter(torch.randn(4095))
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert "exp_avg_codes" in opt.state[big] and "exp_avg" in opt.state[small]
    quantized = sum(t.numel() * t.element_size() for k, t in opt.state[big].items() if k != "step")
    assert quantized / big.numel() <= 2.04
    report = optimizer_state_bytes(opt)
    assert report["full"] == 2 * 4 * 4095
    assert report["codes"] == 2 * 1_000_003


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_and_stochastic_rounding_keeps_tiny_updates(dtype):
    # lr so small that every update is far below half a 16-bit ulp of 1.0
    results = {}
    for sr in (False, True):
        torch.manual_seed(0)
        p = nn.Parameter(torch.ones(20000, dtype=dtype))
        opt = AdamW8bit([p], lr=1e-4, weight_decay=0.0, stochastic_rounding=sr)
        for _ in range(50):
            p.grad = torch.ones_like(p)
            opt.step()
        assert p.dtype == dtype
        results[sr] = p.float().mean().item()
    expected = 1.0 - 50 * 1e-4
    assert results[False] == 1.0  # round-to-nearest loses every step
    assert abs(results[True] - expected) < 1e-3  # stochastic rounding keeps them on average


def test_16bit_params_with_fp32_state_use_fp32_moments():
    p = nn.Parameter(torch.randn(100, dtype=torch.bfloat16))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_bucket_with_mixed_dtypes_and_kinds():
    ps = [nn.Parameter(torch.randn(5000, dtype=d)) for d in (torch.float32, torch.bfloat16, torch.float16)]
    ps += [nn.Parameter(torch.randn(10, dtype=d)) for d in (torch.float32, torch.bfloat16)]
    opt = AdamW8bit(ps)
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(ps, before))


def test_named_parameters_are_used_in_messages():
    model = nn.Linear(100, 100)
    opt = AdamW8bit(model.named_parameters(), nonfinite="raise")
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    with pytest.raises(FloatingPointError, match="'weight'"):
        opt.step()


@pytest.mark.parametrize("zero3", [False, True])
def test_fp32_choices_of_replaced_parameters_are_said_once_with_their_bytes(zero3):
    """DeepSpeed swaps flat partitions into the param groups after the optimizer is built (simulated here
    without DeepSpeed, as its ZeRO-1/2 optimizer does it): an fp32-state choice cannot follow a parameter
    there, and the first step says so, once, with the state it no longer keeps in fp32. ZeRO-3 also empties
    the partitioned parameters (their size kept as ``ds_numel``): the count is still the parameter's."""
    import warnings

    import torch

    from lowbit_adamw import AdamW8bit

    emb, lin = torch.nn.Embedding(64, 32), torch.nn.Linear(32, 300)
    unused = torch.nn.Embedding(10, 32)  # named for fp32 but never given to the optimizer: nothing to say
    params = [emb.weight, *lin.parameters()]
    opt = AdamW8bit(params, fp32_state=[emb, unused], min_8bit_size=0)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    opt.param_groups[0]["params"] = [flat]
    if zero3:
        for p in params:
            p.ds_numel, p.data = p.numel(), torch.empty(0)
    for step in range(2):
        flat.grad = torch.randn_like(flat)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        said = [str(w.message) for w in caught if "no longer among" in str(w.message)]
        if step == 0:
            # 2,048 embedding elements: 8 B each in fp32 against 2.03125 B at 8 bits
            assert len(said) == 1 and "1 parameter(s)" in said[0] and "2,048 elements" in said[0], said
            assert f"{2048 * (8 - 2.03125) / 2**20:.2f} MiB" in said[0]
        else:
            assert not said
    assert "exp_avg_codes" in opt.state[flat]


def test_a_lost_fp32_choice_is_priced_with_the_width_of_its_own_group():
    import warnings

    emb, lin = torch.nn.Embedding(64, 32), torch.nn.Linear(32, 300)
    opt = AdamW8bit([{"params": [lin.weight]}, {"params": [emb.weight], "bits": 4}], fp32_state=[emb], min_8bit_size=0)
    flat = torch.nn.Parameter(torch.cat([lin.weight.detach().reshape(-1), emb.weight.detach().reshape(-1)]))
    opt.param_groups[0]["params"], opt.param_groups[1]["params"] = [flat], []
    flat.grad = torch.randn_like(flat)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    said = [str(w.message) for w in caught if "no longer among" in str(w.message)]
    # 2,048 elements of a 4-bit group (blocks of 128): 8 B each in fp32 against 1.0625
    assert len(said) == 1 and "get 4-bit state" in said[0] and f"{2048 * (8 - 1.0625) / 2**20:.2f} MiB" in said[0], said


def _swap_in(module, name, opt):
    """What accelerate's FSDP2 preparation does after the optimizer is built: a new parameter takes the old one's
    place in its module (fully_shard) and in the optimizer's groups (fsdp2_switch_optimizer_parameters)."""
    old = module._parameters[name]
    new = torch.nn.Parameter(old.detach().clone())
    setattr(module, name, new)
    for g in opt.param_groups:
        g["params"] = [new if q is old else q for q in g["params"]]
    return new


@pytest.mark.parametrize("how", ["module", "module_type", "tensor_with_model", "tensor_alone"])
def test_fp32_choices_follow_a_parameter_swapped_into_their_module(how):
    """An fp32-state choice made by module (or by tensor with model=) is kept by the parameter that takes the
    chosen one's place in its module after construction; a bare tensor with no model cannot be followed,
    and the first step says so."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 300))
    choice = {"module": dict(fp32_state=[model[0]]), "module_type": dict(fp32_state=[torch.nn.Embedding], model=model),
              "tensor_with_model": dict(fp32_state=[model[0].weight], model=model),
              "tensor_alone": dict(fp32_state=[model[0].weight])}[how]
    opt = AdamW8bit(model.parameters(), min_8bit_size=0, **choice)
    emb, lin = _swap_in(model[0], "weight", opt), _swap_in(model[1], "weight", opt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    said = [str(w.message) for w in caught if "no longer among" in str(w.message)]
    assert "exp_avg_codes" in opt.state[lin]  # an unchosen swapped-in parameter still gets 8-bit state
    if how == "tensor_alone":
        assert "exp_avg_codes" in opt.state[emb] and len(said) == 1 and "model= was given" in said[0], said
    else:
        assert "exp_avg" in opt.state[emb] and "exp_avg_codes" not in opt.state[emb] and not said, said
        assert opt.state_dict()["param_groups"]  # the optimizer still saves as usual



def test_nothing_is_said_when_the_chosen_parameters_are_still_the_optimizers():
    import warnings

    import torch

    from lowbit_adamw import AdamW8bit

    emb = torch.nn.Embedding(64, 32)
    opt = AdamW8bit(emb.parameters(), fp32_state=[emb], min_8bit_size=0)
    emb.weight.grad = torch.randn_like(emb.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert "exp_avg" in opt.state[emb.weight]
