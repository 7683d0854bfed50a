"""Calls a bitsandbytes or torch user makes, and inputs that used to be accepted and then go silently
wrong: each is now correct behaviour, or a clear error naming the parameter and the fix."""
import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit

from helpers import dequantized


def problem(n=6000, seed=0):
    torch.manual_seed(seed)
    target = torch.randn(n)
    return nn.Parameter(torch.zeros(n)), target


def descend(opt, p, target, steps=20):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((p - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- bitsandbytes' calls -------------------------------------------------------------------------

def test_bitsandbytes_positional_call_descends_and_means_what_bitsandbytes_means():
    p, target = problem()
    opt = AdamW8bit([p], 1e-1, (0.9, 0.999), 1e-8, 0.0, False, 32)  # bnb: ..., amsgrad, optim_bits
    losses = descend(opt, p, target)
    assert losses[-1] < 0.5 * losses[0]  # gradient descent, not ascent
    assert opt.param_groups[0]["maximize"] is False and "exp_avg" in opt.state[p]  # optim_bits=32: fp32 state
    q = nn.Parameter(torch.zeros(100))
    opt8 = AdamW8bit([q], 1e-2, (0.9, 0.999), 1e-8, 0.0, False, 8, None, 0)  # ..., optim_bits, args, min_8bit_size
    q.grad = torch.ones(100)
    opt8.step()
    assert "exp_avg_codes" in opt8.state[q]
    with pytest.raises(TypeError, match="by name"):
        AdamW8bit([q], 1e-2, (0.9, 0.999), 1e-8, 0.0, False, 8, None, 0, 100)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(percentile_clipping=5), ValueError, "percentile_clipping=5.*max_grad_norm"),
    (dict(max_unorm=1.0), ValueError, "max_unorm=1.0.*max_grad_norm"),
    (dict(skip_zeros=True), ValueError, "skip_zeros=True"),
    (dict(block_wise=False), ValueError, "block_wise=False"),
    (dict(optim_bits=16), ValueError, "optim_bits must be 8 or 32.*bits=4"),
    (dict(args=object()), ValueError, "args="),
    (dict(capturable=True), ValueError, "capturable=True"),
    (dict(differentiable=True), ValueError, "differentiable=True"),
    (dict(decoupled_weight_decay=False), ValueError, "decoupled_weight_decay=False"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
])
def test_options_that_would_change_the_update_are_refused_with_the_alternative(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdamW8bit([nn.Parameter(torch.zeros(10))], **kwargs)


def test_is_paged_is_accepted_with_a_warning_and_torch_keywords_are_accepted():
    with pytest.warns(UserWarning, match="not paged"):
        AdamW8bit([nn.Parameter(torch.zeros(10))], is_paged=True)
    AdamW8bit([nn.Parameter(torch.zeros(10))], capturable=False, differentiable=False, foreach=None, fused=None)


@pytest.fixture
def bnb_manager():
    bnb = pytest.importorskip("bitsandbytes")
    mng = bnb.optim.GlobalOptimManager.get_instance()
    saved = (dict(mng.pid2config), dict(mng.index2config), list(mng.module_weight_config_triple))
    yield mng
    mng.pid2config, mng.index2config, mng.module_weight_config_triple = saved


def test_global_optim_manager_overrides_are_honoured(bnb_manager):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(500, 64), nn.Linear(64, 300))
    bnb_manager.register_module_override(model[0], "weight", {"optim_bits": 32})  # how scripts keep embeddings in 32 bits
    small = nn.Parameter(torch.randn(1000))
    bnb_manager.override_config(small, "min_8bit_size", 100)
    opt = AdamW8bit([*model.parameters(), small])
    model[0](torch.tensor([1, 2])).sum().backward()
    model[1].weight.grad = torch.randn_like(model[1].weight)
    small.grad = torch.randn_like(small)
    opt.step()
    assert "exp_avg" in opt.state[model[0].weight]  # 32-bit state, as bitsandbytes would keep it
    assert "exp_avg_codes" in opt.state[model[1].weight] and "exp_avg_codes" in opt.state[small]
    bnb_manager.override_config(small, "lr", 0.1)
    with pytest.raises(ValueError, match="GlobalOptimManager overrides \\['lr'\\].*its own param group"):
        AdamW8bit([small])


# ---- inputs that used to go wrong silently --------------------------------------------------------

def test_nonfinite_raise_updates_no_group_before_raising():
    a, b = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([{"params": [a]}, {"params": [b], "lr": 1e-2}], nonfinite="raise")
    a.grad, b.grad = torch.randn(5000), torch.full((5000,), float("nan"))
    a0 = a.detach().clone()
    with pytest.raises(FloatingPointError, match="nothing was updated"):
        opt.step()
    assert torch.equal(a, a0) and not opt.state[a] and opt._updates == 0


@pytest.mark.parametrize("change", [dict(bits=4), dict(block_size=128), dict(bits=4, block_size=64)])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_changing_a_groups_bits_or_block_size_reencodes_its_state(change, backend):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64, 97))
    opt = AdamW8bit([p], backend=backend, min_8bit_size=0)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    before = {n: dequantized(opt, p, n).clone() for n in ("exp_avg", "exp_avg_sq")}
    opt.param_groups[0].update(change)
    p.grad = torch.zeros_like(p)
    with pytest.warns(UserWarning, match="re-encoded"):
        opt.step()
    bits, block = opt.param_groups[0]["bits"], opt.param_groups[0]["block_size"]
    from lowbit_adamw import format as fmt

    assert opt.state[p]["exp_avg_codes"].numel() == fmt.codes_numel(p.numel(), bits)
    assert opt.state[p]["exp_avg_absmax"].numel() == fmt.num_blocks(p.numel(), block)
    after = dequantized(opt, p, "exp_avg")
    # a zero gradient: m decays by beta1 and is re-encoded twice at the new width (4-bit levels are up to
    # 0.225 of the block maximum apart)
    tol = 0.25 if bits == 4 else 0.05
    assert (after - 0.9 * before["exp_avg"]).abs().max() <= tol * before["exp_avg"].abs().max()


def _saved_state():
    p = nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([("w", p)])
    p.grad = torch.randn_like(p)
    opt.step()
    return p, opt.state_dict()


@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd["state"][0]["exp_avg_absmax"].__setitem__(3, float("nan")), "'w'.*NaN, infinite or negative"),
    (lambda sd: sd["state"][0]["exp_avg_absmax"].__setitem__(0, -1.0), "'w'.*NaN, infinite or negative"),  # 8-bit m: >= 0
    (lambda sd: sd["state"][0]["exp_avg_sq_absmax"].__setitem__(1, float("inf")), "'w'.*exp_avg_sq_absmax.*NaN, infinite"),
    (lambda sd: sd["state"][0].__setitem__("step", torch.tensor(float("nan"))), "'w'.*step is nan"),
    (lambda sd: sd["state"][0].__setitem__("step", -2), "'w'.*step is -2"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", float("nan")), "param group 0.*learning rate"),
    (lambda sd: sd["param_groups"][0].__setitem__("betas", (0.9, 1.0)), "param group 0.*beta parameter at index 1"),
    (lambda sd: sd["lowbit_adamw"].__setitem__("updates", -1), "updates must be a non-negative int"),
])
def test_a_corrupt_state_dict_is_refused_and_changes_nothing(corrupt, match):
    p, sd = _saved_state()
    corrupt(sd)
    opt = AdamW8bit([("w", p)], lr=0.5)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert not opt.state and opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("kwargs,match", [(dict(bits=8.0), "bits must be 8 or 4"), (dict(block_size=256.0), "block_size"),
                                          (dict(min_8bit_size=10.5), "min_8bit_size"), (dict(accumulation_steps=2.0), "accumulation_steps"),
                                          (dict(lr=float("inf")), "learning rate"), (dict(eps=float("nan")), "epsilon"),
                                          (dict(step_in_backward=True, step_in_backward_bucket_mb=0.0), "bucket_mb must be > 0")])
def test_numbers_of_the_wrong_kind_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([nn.Parameter(torch.zeros(10))], **kwargs)


def test_an_infinite_bucket_steps_once_at_the_end_of_backward():
    from helpers import data, tiny_model

    runs = []
    for kw in (dict(step_in_backward=True, step_in_backward_bucket_mb=math.inf), {}):
        model = tiny_model()
        opt = AdamW8bit(model.parameters(), min_8bit_size=1024, **kw)
        it = data()
        for _ in range(2):
            x, y = next(it)
            opt.zero_grad()
            model.loss(x, y).backward()
            opt.step()
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


# ---- exact resume ------------------------------------------------------------------------------

def schedule(update):
    return 1e-2 / (1 + update)


@pytest.mark.parametrize("how", ["state_dict", "pickle"])
def test_resume_is_exact_with_a_callable_lr_ema_overwrite_and_stochastic_rounding(how):
    def make(p):
        return AdamW8bit([p], lr=schedule, ema_decay=0.9, ema_overwrite_frequency=3, stochastic_rounding=True,
                         min_8bit_size=0, accumulation_steps=2)

    torch.manual_seed(0)
    start = torch.randn(3000).to(torch.bfloat16)
    grads = [torch.randn(3000, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16) for k in range(12)]

    def feed(opt, p, ks):
        for k in ks:
            if p.grad is None:
                p.grad = grads[k].clone()
            else:
                p.grad += grads[k]
            opt.step()
            opt.zero_grad()

    p = nn.Parameter(start.clone())
    whole = make(p)
    feed(whole, p, range(12))

    q = nn.Parameter(start.clone())
    first = make(q)
    feed(first, q, range(6))  # 3 updates: the EMA was just written into the weights
    if how == "state_dict":
        buf = io.BytesIO()
        torch.save({"model": q.detach().clone(), "opt": first.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        r = nn.Parameter(saved["model"])
        torch.manual_seed(123)  # another process: torch's global generator is elsewhere
        second = make(r)
        second.load_state_dict(saved["opt"])
    else:
        second = pickle.loads(pickle.dumps(first))
        r = second.param_groups[0]["params"][0]
    feed(second, r, range(6, 12))
    assert torch.equal(p, r)
    assert torch.equal(whole.state[p]["ema"], second.state[r]["ema"])
    assert second._updates == whole._updates == 6


def test_a_copy_has_its_own_settings_and_caches():
    p, target = problem()
    opt = AdamW8bit([p], nonfinite="ignore", backend="torch", ema_decay=0.5)
    descend(opt, p, target, steps=2)
    twin = copy.deepcopy(opt)
    assert twin.nonfinite == "ignore" and twin.backend == "torch" and twin.ema_decay == 0.5
    assert twin._cache_ids is not opt._cache_ids and twin._reporter is not opt._reporter
