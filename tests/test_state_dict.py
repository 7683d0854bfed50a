import io

import pytest
import torch
from torch import nn

from lowbit_adamw import AdamW8bit, load_torch_adamw_state_dict, to_torch_adamw_state_dict

from helpers import dequantized, tiny_model, train


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_save_resume_continues_exactly(dtype, amsgrad):
    model = tiny_model(dtype=dtype)
    opt = AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=1024, amsgrad=amsgrad)
    train(model, opt, 3)
    saved_model = roundtrip(model.state_dict())
    saved_opt = roundtrip(opt.state_dict())
    expected = train(model, opt, 3, seed=1)

    model2 = tiny_model(seed=5, dtype=dtype)
    model2.load_state_dict(saved_model)
    opt2 = AdamW8bit(model2.parameters(), lr=999.0, min_8bit_size=1024, amsgrad=amsgrad)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == 3e-3
    for p in model2.parameters():
        s = opt2.state[p]
        if "exp_avg_codes" in s:
            assert s["exp_avg_codes"].dtype == torch.uint8 and s["exp_avg_absmax"].dtype == torch.float32
        else:
            assert s["exp_avg"].dtype == torch.float32
        assert s["step"].dtype == torch.float32 and s["step"].device.type == "cpu"
    assert train(model2, opt2, 3, seed=1) == expected


def test_state_moves_to_parameter_device():
    p = nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    q = nn.Parameter(torch.empty(5000, device="meta"))  # GPU<->CPU moves are in tests/gpu
    opt2 = AdamW8bit([q])
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    s = opt2.state[q]
    assert s["exp_avg_codes"].device.type == "meta" and s["exp_avg_codes"].dtype == torch.uint8
    assert s["exp_avg_absmax"].dtype == torch.float32 and s["step"].device.type == "cpu"


def test_other_block_size_or_format_is_refused():
    p = nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([p], block_size=128)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="block_size=128"):
        AdamW8bit([p]).load_state_dict(sd)
    sd["lowbit_adamw"]["format_version"] = 99
    with pytest.raises(ValueError, match="format version 99"):
        AdamW8bit([p], block_size=128).load_state_dict(sd)
    # a torch AdamW state dict is not refused but converted, and says so (tests/test_migrate.py has the others)
    t = torch.optim.AdamW([p])
    t.step()
    with pytest.warns(UserWarning, match="converted a torch.optim.AdamW state dict: 1 parameters"):
        AdamW8bit([p]).load_state_dict(t.state_dict())
    with pytest.raises(ValueError, match="torch.optim.AdamW, bitsandbytes' AdamW or torchao's AdamW"):
        AdamW8bit([p]).load_state_dict({"state": {}, "param_groups": [{"params": [0], "momentum": 0.9}]})


def test_corrupt_state_is_refused_with_the_parameter_named():
    model = nn.Linear(100, 100)
    opt = AdamW8bit(model.named_parameters())
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_absmax"] = sd["state"][0]["exp_avg_absmax"].half()
    with pytest.raises(ValueError, match="'weight'"):
        AdamW8bit(nn.Linear(100, 100).named_parameters()).load_state_dict(sd)


def test_convert_to_torch_adamw_and_back():
    model = tiny_model()
    opt = AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=1024)
    train(model, opt, 5)
    tsd = roundtrip(to_torch_adamw_state_dict(opt))
    torch_opt = torch.optim.AdamW(model.parameters())
    torch_opt.load_state_dict(tsd)
    assert torch_opt.param_groups[0]["lr"] == 3e-3
    for p in model.parameters():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(torch_opt.state[p][name], dequantized(opt, p, name))
    train(model, torch_opt, 2)  # torch continues from it

    # and back: quantizing the torch state gives the state its dequantized value encodes
    back = AdamW8bit(model.parameters(), min_8bit_size=1024)
    load_torch_adamw_state_dict(back, roundtrip(torch_opt.state_dict()))
    for p in model.parameters():
        for name in ("exp_avg", "exp_avg_sq"):
            ref = torch_opt.state[p][name]
            got = dequantized(back, p, name)
            assert (got - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-12
        assert back.state[p]["step"].item() == 7
    train(model, back, 2)


def test_empty_state_dict_round_trip():
    p = nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([p])
    opt2 = AdamW8bit([p])
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    p.grad = torch.randn_like(p)
    opt2.step()


# ---- every load checked: a state with a step holds every moment of one form, each of the right dtype and finite ----


def stepped(amsgrad=False, named=True, steps=1):
    """A 5000-element weight in 8-bit state and a 100-element bias in fp32 state (under min_8bit_size)."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(100))
    opt = AdamW8bit([("w", w), ("b", b)] if named else [w, b], min_8bit_size=1024, amsgrad=amsgrad)
    for _ in range(steps):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    return (w, b), opt


def fresh_state(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), k


CORRUPTIONS = {
    # (which parameter, what is done to its saved state, what the error says)
    "fp32 m missing": (1, lambda s: s.pop("exp_avg"), r"no 'exp_avg' \(exp_avg's full-precision"),
    "fp32 v missing": (1, lambda s: s.pop("exp_avg_sq"), r"no 'exp_avg_sq'"),
    "fp32 m NaN": (1, lambda s: s["exp_avg"].__setitem__(3, float("nan")), r"saved exp_avg has 1 value\(s\) that are NaN"),
    "fp32 v Inf": (1, lambda s: s["exp_avg_sq"].__setitem__(5, float("inf")), r"saved exp_avg_sq has 1 value"),
    "fp32 v negative": (1, lambda s: s["exp_avg_sq"].__setitem__(5, -1.0), r"negative \(a second moment"),
    "fp32 m as int": (1, lambda s: s.__setitem__("exp_avg", s["exp_avg"].long()), r"dtype torch.int64; moments are floating"),
    "fp32 m complex": (1, lambda s: s.__setitem__("exp_avg", s["exp_avg"].to(torch.complex64)), r"complex"),
    "f64 overflows fp32": (1, lambda s: s.__setitem__("exp_avg", s["exp_avg"].double().fill_(1e300)), r"NaN or infinite"),
    "step only": (1, lambda s: [s.pop(k) for k in ("exp_avg", "exp_avg_sq")], r"has a step but no moments"),
    "8-bit v missing": (0, lambda s: [s.pop("exp_avg_sq_codes"), s.pop("exp_avg_sq_absmax")], r"no 'exp_avg_sq_codes'"),
    "8-bit step only": (0, lambda s: [s.pop(k) for k in list(s) if k != "step"], r"no moments \(neither 8-bit"),
    "mixed forms": (0, lambda s: [s.pop("exp_avg_sq_codes"), s.pop("exp_avg_sq_absmax"),
                                  s.__setitem__("exp_avg_sq", torch.zeros(5000))], r"full-precision exp_avg_sq; a parameter's moments"),
    "meta moment": (1, lambda s: s.__setitem__("exp_avg", torch.empty(100, device="meta")), r"meta tensor"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_an_incomplete_or_corrupt_parameter_state_is_refused_before_anything_is_replaced(case):
    index, corrupt, message = CORRUPTIONS[case]
    _, saved = stepped()
    sd = roundtrip(saved.state_dict())
    corrupt(sd["state"][index])
    (w, b), opt = stepped(steps=2)  # the loading optimizer has state of its own, which it keeps
    before, groups = fresh_state(opt), [dict(g) for g in opt.param_groups]
    name = "wb"[index]
    with pytest.raises(ValueError, match=rf"param group 0, parameter {index} \('{name}', .*state dict key {index}\): .*" + message):
        opt.load_state_dict(sd)
    assert_state_equal(before, fresh_state(opt))
    assert [dict(g) for g in opt.param_groups] == groups
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()  # and it still steps


@pytest.mark.parametrize("amsgrad_state", ["fp32", "8-bit"])
def test_amsgrad_needs_its_max_moment_in_either_form(amsgrad_state):
    _, saved = stepped(amsgrad=True)
    sd = roundtrip(saved.state_dict())
    index, key = (1, "max_exp_avg_sq") if amsgrad_state == "fp32" else (0, "max_exp_avg_sq_codes")
    sd["state"][index].pop(key)
    sd["state"][index].pop("max_exp_avg_sq_absmax", None)
    _, opt = stepped(amsgrad=True)
    with pytest.raises(ValueError, match=f"no '{key}'.*amsgrad=True"):
        opt.load_state_dict(sd)
    # the same state saved without amsgrad loads: the max moment is not needed there
    sd["param_groups"][0]["amsgrad"] = False
    (w, b), plain = stepped()
    plain.load_state_dict(sd)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    plain.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_moments_of_another_float_dtype_are_cast_with_a_warning_and_step_as_saved(dtype):
    """float64 (or 16-bit) fp32-state moments take the state's dtype, said once; the step then continues as
    it would from the fp32 values the cast gives."""
    _, saved = stepped()
    sd = roundtrip(saved.state_dict())
    exact = {k: v.clone() for k, v in sd["state"][1].items()}
    for k in ("exp_avg", "exp_avg_sq"):
        exact[k] = exact[k].to(dtype).float()  # the values the cast must give
        sd["state"][1][k] = sd["state"][1][k].to(dtype)
    (w, b), opt = stepped()
    with pytest.warns(UserWarning, match=rf"cast 2 saved full-precision tensor\(s\).*exp_avg {str(dtype)[6:]} -> float32"):
        opt.load_state_dict(sd)
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt.state[b][k].dtype == torch.float32 and torch.equal(opt.state[b][k], exact[k])
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    assert torch.isfinite(b).all()


def test_a_meta_parameter_loads_meta_moments_without_reading_them():
    _, saved = stepped()
    sd = roundtrip(saved.state_dict())
    w, b = nn.Parameter(torch.empty(5000, device="meta")), nn.Parameter(torch.empty(100, device="meta"))
    opt = AdamW8bit([("w", w), ("b", b)], min_8bit_size=1024)
    opt.load_state_dict(sd)
    assert opt.state[b]["exp_avg"].device.type == "meta" and opt.state[b]["exp_avg"].dtype == torch.float32


def test_load_torch_adamw_state_dict_hands_other_kinds_to_the_converter():
    """Given bitsandbytes', torchao's or our own state dict, the torch-AdamW loader does not read it as
    torch's (which kept only each parameter's step): ours loads as it is, the others convert as
    load_state_dict converts them, anything else is refused."""
    (w, b), ours = stepped()
    sd = ours.state_dict()
    (w2, b2), other = stepped(steps=3)
    load_torch_adamw_state_dict(other, roundtrip(sd))
    assert_state_equal(fresh_state(ours), {id(q): s for q, s in zip((w, b), fresh_state(other).values())})

    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5000))
    peer = bnb.optim.AdamW8bit([p])
    p.grad = torch.randn_like(p)
    peer.step()
    via_loader, direct = AdamW8bit([nn.Parameter(p.detach().clone())]), AdamW8bit([nn.Parameter(p.detach().clone())])
    with pytest.warns(UserWarning, match="converted a bitsandbytes AdamW state dict"):
        load_torch_adamw_state_dict(via_loader, roundtrip(peer.state_dict()))
    with pytest.warns(UserWarning, match="converted a bitsandbytes AdamW state dict"):
        direct.load_state_dict(roundtrip(peer.state_dict()))
    (s1,), (s2,) = via_loader.state.values(), direct.state.values()
    assert set(s1) == {"step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"}
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    q = via_loader.param_groups[0]["params"][0]
    q.grad = torch.randn_like(q)
    via_loader.step()
    with pytest.raises(ValueError, match="torch.optim.AdamW, bitsandbytes' AdamW or torchao's AdamW"):
        load_torch_adamw_state_dict(via_loader, {"state": {}, "param_groups": [{"params": [0], "momentum": 0.9}]})


def test_a_torch_adamw_state_without_moments_is_refused_naming_the_key():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5000))
    t = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p)
    t.step()
    sd = t.state_dict()
    del sd["state"][0]["exp_avg_sq"]
    opt = AdamW8bit([p])
    with pytest.raises(ValueError, match="no 'exp_avg_sq_codes'"):
        load_torch_adamw_state_dict(opt, sd)
    assert not opt.state[p]
