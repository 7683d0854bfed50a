"""torch.optim.AdamW's contract, held to AdamW8bit with torch's own optimizer test inputs.

``torch.testing._internal.common_optimizers`` (shipped in the torch wheel) is the database torch's
``test/test_optim.py`` is driven by. Its AdamW inputs (``optim_inputs_func_adamw``, the cliquey
``foreach``/``fused`` flags, ``optim_error_inputs_func_adamw``) drive the checks below, written here,
of what torch's generic tests check: errors, state dict round trips and hooks, copies, tensor and
Python-number ``step``, param groups and schedulers, non-contiguous and ``channels_last`` parameters,
float64, complex, meta, closures, step hooks and printing.

Three variants: as shipped (tensors under 4096 elements keep fp32 state and go to torch's own fused
AdamW, so small problems are torch's AdamW), and ``min_8bit_size=0`` at 8 and 4 bits, so the quantized
path is what is tested. Where AdamW8bit deliberately differs (quantized moments) the difference is
bounded and the test says why.
"""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit

common = pytest.importorskip("torch.testing._internal.common_optimizers")
OptimizerErrorEnum = common.OptimizerErrorEnum


class AdamW8bitAll8(AdamW8bit):
    """Every tensor quantized at 8 bits."""

    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("min_8bit_size", 0)
        super().__init__(params, *args, **kwargs)


class AdamW8bitAll4(AdamW8bit):
    """Every tensor quantized at 4 bits."""

    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("min_8bit_size", 0)
        kwargs.setdefault("bits", 4)
        super().__init__(params, *args, **kwargs)


VARIANTS = (AdamW8bit, AdamW8bitAll8, AdamW8bitAll4)
INFOS = {cls: common.OptimizerInfo(cls, optim_inputs_func=common.optim_inputs_func_adamw,
                                   optim_error_inputs_func=common.optim_error_inputs_func_adamw,
                                   supported_impls=("foreach", "fused"), supports_fused_on=("cpu",),
                                   has_capturable_arg=True)
         for cls in VARIANTS}


def optim_inputs(cls):
    """torch's AdamW inputs for the CPU, with each cliquey flag (foreach, fused) off and on."""
    return common._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, INFOS[cls])


CASES = [(cls, inp) for cls in VARIANTS for inp in optim_inputs(cls)]
IDS = [f"{cls.__name__}-{inp.desc}" for cls, inp in CASES]


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(37, 61), nn.Tanh(), nn.Linear(61, 5))  # awkward sizes: partial blocks
    return m.to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 37, generator=g).to(dtype), torch.randn(16, 5, generator=g).to(dtype)


def closure_for(m, opt, step, dtype=torch.float32):
    x, y = batch(step, dtype)

    def closure():
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def run(m, opt, steps, start=0):
    return [float(opt.step(closure_for(m, opt, start + k))) for k in range(steps)]


def assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---- errors ---------------------------------------------------------------------------------------

# torch refuses a Tensor lr or Tensor betas with foreach=True because its foreach kernels cannot take
# them. AdamW8bit reads them as numbers each step and hands torch's AdamW floats, so it accepts them.
ACCEPTED_DELIBERATELY = ("lr as Tensor doesn't work with foreach & not capturable",
                         r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True")


@pytest.mark.parametrize("cls", VARIANTS, ids=lambda c: c.__name__)
def test_error_inputs(cls):
    for err in common.optim_error_inputs_func_adamw("cpu", torch.float32):
        inp = err.optimizer_error_input
        params = inp.params if inp.params is not None else [nn.Parameter(torch.randn(3, 2))]
        if inp.desc in ACCEPTED_DELIBERATELY:
            opt = cls(params, **inp.kwargs)
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            opt.step()
            continue
        assert err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR, inp.desc
        if issubclass(err.error_type, Warning):
            with pytest.warns(err.error_type, match=err.error_regex):
                cls(params, **inp.kwargs)
        else:
            with pytest.raises(err.error_type, match=err.error_regex):
                cls(params, **inp.kwargs)


def test_keyword_only_after_amsgrad_as_torch():
    import inspect

    ours = inspect.signature(AdamW8bit.__init__).parameters
    theirs = inspect.signature(torch.optim.AdamW.__init__).parameters
    for name, p in theirs.items():
        if p.kind == inspect.Parameter.KEYWORD_ONLY:
            assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY and ours[name].default == p.default, name
        elif name != "self":
            assert list(ours).index(name) == list(theirs).index(name), name
    assert AdamW8bit([nn.Parameter(torch.zeros(2))]).defaults.keys() >= torch.optim.AdamW([nn.Parameter(torch.zeros(2))]).defaults.keys()


# ---- every torch input: it runs, and it follows torch's AdamW --------------------------------------

@pytest.mark.parametrize("cls,inp", CASES, ids=IDS)
def test_follows_torch_adamw(cls, inp):
    """Shipped: this model's tensors are all under min_8bit_size, so the update is torch's fused AdamW:
    equal to torch's own to float rounding. Quantized: bounded by the 8/4-bit moments."""
    ref_model, our_model = model(), model()
    ref = torch.optim.AdamW(ref_model.parameters(), **{k: v for k, v in inp.kwargs.items()})
    ours = cls(our_model.parameters(), **inp.kwargs)
    run(ref_model, ref, 6)
    run(our_model, ours, 6)
    start = model()
    for p0, pr, po in zip(start.parameters(), ref_model.parameters(), our_model.parameters()):
        travel = (pr - p0).norm()
        err = (po - pr).norm()
        if cls is AdamW8bit:
            torch.testing.assert_close(po, pr, rtol=1e-5, atol=1e-6)
        else:
            assert err <= (0.1 if cls is AdamW8bitAll8 else 0.35) * travel + 1e-7, (inp.desc, float(err / travel))


# ---- state dict, hooks, copies ---------------------------------------------------------------------

@pytest.mark.parametrize("cls,inp", CASES, ids=IDS)
def test_state_dict_round_trip_continues_bit_for_bit(cls, inp):
    m = model()
    opt = cls(m.parameters(), **inp.kwargs)
    run(m, opt, 3)
    saved = torch.load(io.BytesIO(_save(opt.state_dict())), weights_only=True)
    m2 = copy.deepcopy(m)
    opt2 = cls(m2.parameters(), **inp.kwargs)
    opt2.load_state_dict(saved)
    assert_states_equal(opt.state_dict()["state"][0], opt2.state_dict()["state"][0])
    run(m, opt, 3, start=3)
    run(m2, opt2, 3, start=3)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("cls", VARIANTS, ids=lambda c: c.__name__)
def test_python_number_step_loads_as_a_tensor(cls):
    m = model()
    opt = cls(m.parameters())
    run(m, opt, 2)
    sd = opt.state_dict()
    as_number = copy.deepcopy(sd)
    for s in as_number["state"].values():
        s["step"] = float(s["step"])
    m2, m3 = copy.deepcopy(m), copy.deepcopy(m)
    o2, o3 = cls(m2.parameters()), cls(m3.parameters())
    o2.load_state_dict(sd)
    o3.load_state_dict(as_number)
    assert all(isinstance(s["step"], torch.Tensor) and s["step"].dtype == torch.float32 for s in o3.state.values())
    run(m2, o2, 2, start=2)
    run(m3, o3, 2, start=2)
    for a, b in zip(m2.parameters(), m3.parameters()):
        assert torch.equal(a, b)


def test_state_dict_and_load_state_dict_hooks_run():
    m = model()
    opt = AdamW8bitAll8(m.parameters())
    run(m, opt, 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd pre"))

    def post(o, sd):
        calls.append("sd post")
        assert "lowbit_adamw" in sd  # the post hook sees the whole state dict
        sd["user"] = 1
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["user"] == 1

    def pre_load(o, sd):
        calls.append("load pre")
        sd = dict(sd)
        sd.pop("user")
        sd["param_groups"] = [dict(g, lr=0.5) for g in sd["param_groups"]]  # a pre-hook may rewrite it
        return sd

    opt2 = AdamW8bitAll8(copy.deepcopy(m).parameters())
    opt2.register_load_state_dict_pre_hook(pre_load)
    opt2.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    opt2.load_state_dict(sd)
    assert calls == ["sd pre", "sd post", "load pre", "load post"]
    assert opt2.param_groups[0]["lr"] == 0.5


def _configured(cls):
    return dict(nonfinite="raise", ema_decay=0.9, accumulation_steps=2, backend="torch", clip_norm=1.0, seed=5)


@pytest.mark.parametrize("cls", VARIANTS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_every_setting_and_continue_alike(cls, how):
    """torch's Optimizer.__getstate__ keeps defaults, state and param_groups only; AdamW8bit's
    settings (backend, non-finite rule, EMA, accumulation phase, seed) must survive a copy too."""
    m = model()
    opt = cls(m.parameters(), **_configured(cls))
    run(m, opt, 4)  # at a window boundary of the accumulation (torch's Parameter copies drop .grad)
    if how == "deepcopy":
        opt2 = copy.deepcopy(opt)
    elif how == "pickle":
        opt2 = pickle.loads(pickle.dumps(opt))
    else:
        opt2 = torch.load(io.BytesIO(_save(opt)), weights_only=False)
    m2 = copy.deepcopy(m)  # the same structure, holding the copy's parameters (swapped in below)
    params2 = [p for g in opt2.param_groups for p in g["params"]]
    assert all(p2 is not p for p2, p in zip(params2, m.parameters()))
    for (name, _), p2 in zip(list(m2.named_parameters()), params2):
        mod_name, attr = name.rsplit(".", 1)
        setattr(m2.get_submodule(mod_name), attr, p2)
    for key in ("backend", "nonfinite", "ema_decay", "accumulation_steps", "seed", "_calls", "_updates"):
        assert getattr(opt2, key) == getattr(opt, key), key
    run(m, opt, 4, start=4)
    run(m2, opt2, 4, start=4)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for p, p2 in zip(m.parameters(), m2.parameters()):
        assert_states_equal(opt.state[p], opt2.state[p2])


# ---- param groups, schedulers, closures, hooks, printing -------------------------------------------

@pytest.mark.parametrize("cls", VARIANTS, ids=lambda c: c.__name__)
def test_param_groups_and_torchs_scheduler_inputs(cls):
    for make in [lambda o: torch.optim.lr_scheduler.StepLR(o, gamma=0.9, step_size=2), torch.optim.lr_scheduler.ReduceLROnPlateau]:
        ref_m, our_m = model(), model()
        groups = lambda mm: [{"params": mm[0].parameters(), "lr": 3e-2}, {"params": mm[2].parameters(), "weight_decay": 0.0}]  # noqa: E731
        ref, ours = torch.optim.AdamW(groups(ref_m), lr=1e-2), cls(groups(our_m), lr=1e-2)
        s_ref, s_ours = make(ref), make(ours)
        for k in range(6):
            for mm, o, s in ((ref_m, ref, s_ref), (our_m, ours, s_ours)):
                loss = o.step(closure_for(mm, o, k))
                s.step(loss) if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) else s.step()
            assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
        assert ours.param_groups[1]["weight_decay"] == 0.0


def test_closure_is_called_once_and_its_loss_returned():
    m = model()
    opt = AdamW8bitAll8(m.parameters())
    calls = []
    inner = closure_for(m, opt, 0)

    def closure():
        calls.append(1)
        return inner()

    loss = opt.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor)


def test_step_pre_and_post_hooks_and_global_hooks():
    m = model()
    opt = AdamW8bitAll8(m.parameters())
    seen = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    h3 = register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global pre"))
    try:
        opt.step(closure_for(m, opt, 0))
    finally:
        h3.remove()
    h1.remove()
    h2.remove()
    opt.step(closure_for(m, opt, 1))
    assert seen == ["global pre", "pre", "post"]


def test_printing():
    opt = AdamW8bit([nn.Parameter(torch.zeros(3))], lr=0.25)
    text = repr(opt)
    assert text.startswith("AdamW8bit (") and "Parameter Group 0" in text and "lr: 0.25" in text and "bits: 8" in text


# ---- layouts and dtypes ------------------------------------------------------------------------------

def _memory_order(t):
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


@pytest.mark.parametrize("cls", VARIANTS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("make", ["channels_last", "transposed"])
def test_non_contiguous_params_step_in_memory_order_and_keep_their_layout(cls, make):
    """A dense parameter with any strides is stepped over its storage, in memory order: the same bits
    as a flat parameter holding that storage, with the layout kept."""
    torch.manual_seed(0)
    if make == "channels_last":
        p = nn.Parameter(torch.randn(8, 6, 5, 7).to(memory_format=torch.channels_last))
    else:
        p = nn.Parameter(torch.randn(70, 61).t())
    flat = nn.Parameter(_memory_order(p.detach()).clone())
    a, b = cls([p], lr=1e-2), cls([flat], lr=1e-2)
    for k in range(3):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(k))
        p.grad = torch.empty_like(p).copy_(g)  # autograd's layout: the parameter's strides
        flat.grad = _memory_order(p.grad).clone()
        a.step()
        b.step()
    assert torch.equal(_memory_order(p.detach()), flat.detach())
    assert p.stride() == (torch.empty_like(p).stride())  # still its own layout
    if make == "channels_last":
        assert p.is_contiguous(memory_format=torch.channels_last)
    for key, value in a.state[p].items():
        if key.endswith(("_codes", "_absmax")):
            assert torch.equal(value, b.state[flat][key]), key


def test_a_gradient_in_another_layout_and_a_parameter_with_gaps():
    torch.manual_seed(0)
    base = torch.randn(40, 130)
    p = nn.Parameter(base.t().contiguous().t())  # transposed storage
    q = nn.Parameter(base.clone())
    a, b = AdamW8bitAll8([p]), AdamW8bitAll8([q])
    for k in range(2):
        g = torch.randn(40, 130, generator=torch.Generator().manual_seed(k))
        p.grad, q.grad = g.clone(), g.t().contiguous().t().clone()  # p's grad row-major, q's column-major
        a.step()
        b.step()
    # each is stepped in its own storage order; both are within the 8-bit bound of torch's AdamW
    assert (p - q).abs().max() < 1e-2
    holder = torch.randn(12, 2 * 301)
    gappy = holder[:, ::2].detach().requires_grad_()  # a leaf with gaps: stepped through a contiguous copy
    twin = nn.Parameter(gappy.detach().clone())
    a, b = AdamW8bitAll8([gappy]), AdamW8bitAll8([twin])
    for k in range(2):
        g = torch.randn(12, 301, generator=torch.Generator().manual_seed(k))
        gappy.grad, twin.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(gappy.detach(), twin.detach()) and gappy.stride() == (2 * 301, 2)


@pytest.mark.parametrize("inp", common.optim_inputs_func_adamw("cpu"), ids=lambda i: i.desc)
def test_float64_keeps_float64_state_and_follows_torch(inp):
    ref_m, our_m = model(dtype=torch.float64), model(dtype=torch.float64)
    ref = torch.optim.AdamW(ref_m.parameters(), fused=True, **inp.kwargs)
    ours = AdamW8bitAll8(our_m.parameters(), **inp.kwargs)  # min_8bit_size=0, yet float64 is never quantized
    for k in range(4):
        ref.step(closure_for(ref_m, ref, k, torch.float64))
        ours.step(closure_for(our_m, ours, k, torch.float64))
    for pr, po in zip(ref_m.parameters(), our_m.parameters()):
        assert torch.equal(pr, po)  # torch's own fused AdamW does the step
        assert ours.state[po]["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize("cls", VARIANTS, ids=lambda c: c.__name__)
def test_complex_params_are_stepped_as_view_as_real(cls):
    torch.manual_seed(0)
    z = nn.Parameter(torch.randn(33, 40, dtype=torch.complex64))
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())
    a, b = cls([z], lr=1e-2, weight_decay=0.1), cls([r], lr=1e-2, weight_decay=0.1)
    for k in range(3):
        g = torch.randn(33, 40, dtype=torch.complex64, generator=torch.Generator().manual_seed(k))
        z.grad, r.grad = g.clone(), torch.view_as_real(g).clone()
        a.step()
        b.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    if cls is AdamW8bit:  # full-precision state, complex as torch keeps it, and torch's own result
        assert a.state[z]["exp_avg"].dtype == torch.complex64
        zt = nn.Parameter(torch.randn(33, 40, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)))
        zo = nn.Parameter(zt.detach().clone())
        ta, oa = torch.optim.AdamW([zt], lr=1e-2), AdamW8bit([zo], lr=1e-2)
        for k in range(3):
            g = torch.randn(33, 40, dtype=torch.complex64, generator=torch.Generator().manual_seed(k))
            zt.grad, zo.grad = g.clone(), g.clone()
            ta.step()
            oa.step()
        torch.testing.assert_close(zo, zt)


@pytest.mark.parametrize("cls", VARIANTS, ids=lambda c: c.__name__)
def test_meta_device_parameters_step_without_touching_memory(cls):
    p = nn.Parameter(torch.empty(300, 70, device="meta"))
    q = nn.Parameter(torch.empty(10, device="meta"))
    opt = cls([p, q], max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            p.grad, q.grad = torch.empty_like(p), torch.empty_like(q)
            opt.step()
    assert all(t.device.type == "meta" for s in opt.state.values() for k, t in s.items() if k != "step")
    assert float(opt.state[p]["step"]) == 2
    opt.state_dict()


@pytest.mark.parametrize("cls", (AdamW8bitAll8, AdamW8bitAll4), ids=lambda c: c.__name__)
def test_channels_last_state_converts_to_torch_adamw_and_back_and_across_layouts(cls):
    from lowbit_adamw import load_torch_adamw_state_dict, to_torch_adamw_state_dict

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 6, 5, 7).to(memory_format=torch.channels_last))
    opt = cls([p])
    for k in range(3):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k)).to(memory_format=torch.channels_last)
        opt.step()
    tsd = to_torch_adamw_state_dict(opt)
    torch_opt = torch.optim.AdamW([p])
    torch_opt.load_state_dict(tsd)
    m = torch_opt.state[p]["exp_avg"]
    back = cls([p])
    load_torch_adamw_state_dict(back, tsd)
    for key in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
        assert torch.equal(back.state[p][key], opt.state[p][key]), key  # 4-bit m too: its scale's sign (format v4)
    # into a contiguous parameter (another storage order): re-encoded, the same moments to the code width
    q = nn.Parameter(p.detach().contiguous())
    other = cls([q])
    with pytest.warns(UserWarning, match="another memory layout"):
        other.load_state_dict(opt.state_dict())
    m_other = to_torch_adamw_state_dict(other)["state"][0]["exp_avg"]
    assert (m_other - m).abs().max() <= (0.25 if cls is AdamW8bitAll4 else 0.02) * m.abs().max()
