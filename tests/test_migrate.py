"""Checkpoints that move between optimizers (lowbit_adamw.migrate): torch, bitsandbytes and torchao AdamW
state loaded into AdamW8bit with a warning; AdamW8bit state written for torch and bitsandbytes from the
file alone (``lowbit-adamw convert``)."""
import io
import warnings

import pytest
import torch

from lowbit_adamw import AdamW8bit, migrate, to_torch_adamw_state_dict
from lowbit_adamw.cli import main as cli_main

bnb = pytest.importorskip("bitsandbytes")
torchao_optim = pytest.importorskip("torchao.optim")


def params():
    g = torch.Generator().manual_seed(1)
    # 256 x 70 quantizes in torchao (a multiple of its block) and bitsandbytes (>= 4096); 100 stays 32-bit in both
    return [torch.nn.Parameter(torch.randn(256, 70, generator=g)), torch.nn.Parameter(torch.randn(100, generator=g))]


def run(opt, ps, steps, seed=2):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def reference(sd):
    """The moments a state dict holds, decoded independently of migrate: each optimizer's own dequantization."""
    out = {}
    for pid, s in sd["state"].items():
        s = migrate._bnb_state(s)
        if "state1" in s:
            if s["state1"].dtype == torch.uint8:
                m = bnb.functional.dequantize_blockwise(s["state1"], absmax=s["absmax1"], code=s["qmap1"], blocksize=256)
                v = bnb.functional.dequantize_blockwise(s["state2"], absmax=s["absmax2"], code=s["qmap2"], blocksize=256)
            else:
                m, v = s["state1"], s["state2"]
        else:
            m, v = (x.dequantize() if hasattr(x, "dequantize") else x for x in (s["exp_avg"], s["exp_avg_sq"]))
        out[pid] = (m.float(), v.float())
    return out


FOREIGN = {
    "torch AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), "torch.optim.AdamW"),
    "bnb AdamW8bit": (lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3), "bitsandbytes AdamW state dict (32-bit, 8-bit state)"),
    "bnb AdamW 32-bit": (lambda ps: bnb.optim.AdamW(ps, lr=1e-3), "bitsandbytes AdamW state dict (32-bit state)"),
    "bnb PagedAdamW8bit": (lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-3), "bitsandbytes AdamW state dict (32-bit, 8-bit"),
    "torchao AdamW8bit": (lambda ps: torchao_optim.AdamW8bit(ps, lr=1e-3), "torchao AdamW state dict (OptimState8bit"),
    "torchao AdamW4bit": (lambda ps: torchao_optim.AdamW4bit(ps, lr=1e-3), "torchao AdamW state dict (OptimState4bit"),
}


@pytest.mark.filterwarnings("ignore:Paged optimizers")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(FOREIGN))
def test_foreign_state_loads_converted_with_a_warning(name, bits):
    make, said = FOREIGN[name]
    ps = params()
    other = make(ps)
    run(other, ps, 5)
    buf = io.BytesIO()
    torch.save(other.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # as Trainer reads optimizer.pt
    ref = reference(sd)

    mine_params = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    mine = AdamW8bit(mine_params, lr=1e-3, bits=bits)
    with pytest.warns(UserWarning, match="converted") as rec:
        mine.load_state_dict(sd)
    message = " ".join(str(w.message) for w in rec if "converted" in str(w.message))
    assert said in message and "2 parameters" in message
    back = to_torch_adamw_state_dict(mine)
    tol = {8: 0.02, 4: 0.2}[bits]
    for pid, (m, v) in ref.items():
        got = back["state"][pid]
        assert got["exp_avg"].shape == m.shape
        assert float(got["step"]) == 5.0
        assert (got["exp_avg"] - m).abs().max() <= tol * m.abs().max()
        assert (got["exp_avg_sq"] - v).abs().max() <= tol * v.abs().max()
    assert mine._updates == 5  # the run goes on where the other optimizer stopped
    # and it steps on from there like the optimizer that wrote it
    run(other, ps, 3, seed=3)
    run(mine, mine_params, 3, seed=3)
    for a, b in zip(ps, mine_params):
        assert (a - b).abs().max() < 5e-3 * 8  # 8 updates of at most ~lr each, apart by their rounding only


def test_unknown_state_dict_is_refused_naming_what_loads():
    opt = AdamW8bit(params())
    with pytest.raises(ValueError, match="bitsandbytes' AdamW or torchao's AdamW"):
        opt.load_state_dict({"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"params": [0, 1], "lr": 1}]})


def test_bnb_tensor_wise_8bit_state_decodes_with_its_max():
    # bitsandbytes' older tensor-wise 8-bit state (block_wise=False, gone from its current optimizers): one max per tensor
    qmap = bnb.functional.create_dynamic_map(signed=True)
    uqmap = bnb.functional.create_dynamic_map(signed=False)
    codes = torch.randint(0, 256, (64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sd = {"state": {0: {"step": 3, "state1": codes, "qmap1": qmap, "max1": torch.tensor([0.25]), "new_max1": torch.tensor([0.25]),
                        "state2": codes.flip(0), "qmap2": uqmap, "max2": torch.tensor([2.0])}},
          "param_groups": [{"params": [0], "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}]}
    assert migrate.identify(sd) == "bitsandbytes"
    form, _ = migrate.to_torch_form(sd)
    assert torch.equal(form["state"][0]["exp_avg"], qmap[codes.long()] * 0.25)
    assert torch.equal(form["state"][0]["exp_avg_sq"], uqmap[codes.flip(0).long()] * 2.0)
    p = torch.nn.Parameter(torch.zeros(64, 80))
    with pytest.warns(UserWarning, match="bitsandbytes AdamW state dict \\(8-bit state\\)"):
        AdamW8bit([p]).load_state_dict(sd)


@pytest.mark.parametrize("bits", [8, 4])
def test_lowbit_to_torch_from_the_file_alone_equals_the_live_conversion(bits):
    ps = params() + [torch.nn.Parameter(torch.randn(2, 48, 5, 7).to(memory_format=torch.channels_last))]
    opt = AdamW8bit(ps, bits=bits, amsgrad=True, min_8bit_size=0)
    run(opt, ps, 4)
    live = to_torch_adamw_state_dict(opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    offline = migrate.lowbit_to_torch(torch.load(buf, weights_only=True))
    assert offline["param_groups"] == live["param_groups"]
    for pid, s in live["state"].items():
        assert set(offline["state"][pid]) == set(s)
        for k, v in s.items():
            assert torch.equal(offline["state"][pid][k], v), (pid, k)
    t_params = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    t = torch.optim.AdamW(t_params, amsgrad=True)
    t.load_state_dict(offline)
    run(t, t_params, 1)  # torch steps on it


def test_lowbit_to_bnb_loads_and_steps_in_bitsandbytes():
    ps = params()
    opt = AdamW8bit(ps, lr=1e-3)
    run(opt, ps, 5)
    torch_form = to_torch_adamw_state_dict(opt)
    out = migrate.lowbit_to_bnb(opt.state_dict())
    big, small = out["state"][0], out["state"][1]
    assert big["state1"].dtype == torch.uint8 and big["absmax1"].numel() == -(-256 * 70 // 256)
    assert small["state1"].dtype == torch.float32  # under bitsandbytes' min_8bit_size, as bitsandbytes keeps it
    b_params = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    b = bnb.optim.AdamW8bit(b_params, lr=1e-3)
    b.load_state_dict(out)
    decoded = reference(b.state_dict())
    m, v = decoded[0]
    ref_m = torch_form["state"][0]["exp_avg"]
    assert (m - ref_m).abs().max() <= 0.02 * ref_m.abs().max()
    assert b.state[b_params[0]]["step"] == 5
    run(opt, ps, 2, seed=3)
    run(b, b_params, 2, seed=3)
    assert all((x - y).abs().max() < 1e-2 for x, y in zip(ps, b_params))


def test_state_dict_without_shapes_names_the_live_converter():
    opt = AdamW8bit(params())
    run(opt, opt.param_groups[0]["params"], 1)
    sd = opt.state_dict()
    del sd["lowbit_adamw"]["params"]
    with pytest.raises(ValueError, match="to_torch_adamw_state_dict"):
        migrate.lowbit_to_torch(sd)


def test_convert_command_rewrites_optimizer_pt_and_keeps_the_original(tmp_path, capsys):
    ps = params()
    opt = AdamW8bit(ps)
    run(opt, ps, 2)
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    assert cli_main(["convert", str(ckpt), "--to", "torch"]) == 0
    assert "torch.optim.AdamW" in capsys.readouterr().out
    converted = torch.load(ckpt / "optimizer.pt", weights_only=True)
    kept = torch.load(ckpt / "optimizer.lowbit.pt", weights_only=True)
    assert migrate.identify(converted) == "torch" and migrate.identify(kept) == "lowbit"
    # a second conversion is refused and says where the original is
    assert cli_main(["convert", str(ckpt), "--to", "bnb"]) == 2
    assert "optimizer.lowbit.pt" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "missing"), "--to", "torch"]) == 2


def test_no_warning_for_own_state():
    ps = params()
    opt = AdamW8bit(ps)
    run(opt, ps, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamW8bit(params()).load_state_dict(opt.state_dict())


def test_load_hooks_run_once_for_a_converted_state_dict():
    ps = params()
    other = torch.optim.AdamW(ps)
    run(other, ps, 1)
    opt = AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in ps])
    calls = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    with pytest.warns(UserWarning, match="converted a torch.optim.AdamW state dict"):
        opt.load_state_dict(other.state_dict())
    assert calls == ["pre", "post"]
