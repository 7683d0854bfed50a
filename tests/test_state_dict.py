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
