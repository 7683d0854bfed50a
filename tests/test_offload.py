"""offload="cpu": state in host memory, the step on a worker thread, weights copied back.

The CPU stands in for the device (lowbit_adamw.offload.pipeline.StandInTransport): the same staging buffers,
host weight copies, worker thread and events as on a GPU, so the pipeline is held here to the
on-device step bit for bit. tests/gpu and benchmarks/gpu_offload_check.py do the same on a GPU.
"""
import io
import warnings

import pytest
import torch

from helpers import data, tiny_model
from lowbit_adamw import AdamW8bit
from lowbit_adamw.offload import pipeline as offloading

CAP_MB = 0.03  # several buckets per backward (and several pieces per offloaded step) on the tiny model


def train(offload, dtype=torch.float32, steps=3, opt_kw=None, model=None, state_dict=None, between=None, nan_at=None):
    model = model or tiny_model(dim=64, layers=2, dtype=dtype)
    kw = dict(lr=3e-3, min_8bit_size=1024, weight_decay=0.1, step_in_backward_bucket_mb=CAP_MB, seed=3)
    kw.update(opt_kw or {})
    if offload:
        kw["offload"] = "cpu"
    opt = AdamW8bit(model.named_parameters(), **kw)
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    it = data(seq_len=32)
    calls = steps * opt.accumulation_steps
    for i in range(calls):
        x, y = next(it)
        if nan_at is not None and i == nan_at:
            model.loss(x, y).backward()
            next(model.parameters()).grad.view(-1)[5] = float("nan")
        else:
            model.loss(x, y).backward()
        opt.step()
        if not opt.step_in_backward or i % opt.accumulation_steps == opt.accumulation_steps - 1:
            sched.step()
        opt.zero_grad()
        if between is not None:
            between(model, i)
    return model, opt


def assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(pa, pb), name
        sa, sb = oa.state[pa], ob.state[pb]
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k].cpu(), sb[k].cpu()), (name, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_offloaded_step_equals_the_on_device_step(dtype, bits):
    kw = dict(bits=bits, stochastic_rounding=dtype == torch.bfloat16)
    on, off = train(False, dtype, opt_kw=kw), train(True, dtype, opt_kw=kw)
    assert_same(on, off)
    pipe = next(iter(off[1]._offload.pipelines.values()))
    assert pipe.staging.count <= 2  # reused staging buffers, not one per bucket
    assert len(pipe.arena.chunks) == 1  # one arena for every weight copy


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_backward_overlapped_equals_the_plain_loop(bits, dtype):
    kw = dict(bits=bits, clip_norm=0.5, ema_decay=0.9, amsgrad=True)
    plain = train(False, dtype, opt_kw=kw)
    sib = train(True, dtype, opt_kw=dict(kw, step_in_backward=True))
    assert_same(plain, sib)
    assert all(p.grad is None for p in sib[0].parameters())  # freed as each bucket went down


def test_global_clipping_in_backward_waits_for_the_end_and_equals_the_plain_step():
    kw = dict(max_grad_norm=0.05)  # small enough that it clips every step
    plain = train(False, opt_kw=kw)
    sib = train(True, opt_kw=dict(kw, step_in_backward=True))
    assert_same(plain, sib)
    with pytest.raises(ValueError, match="max_grad_norm"):
        AdamW8bit(tiny_model().parameters(), step_in_backward=True, max_grad_norm=1.0)  # on-device: still refused
    with pytest.raises(ValueError, match="offload='cpu' in every param group"):
        m = tiny_model()
        AdamW8bit([{"params": [m.embed.weight], "offload": None}, {"params": list(m.head.parameters())}],
                  offload="cpu", step_in_backward=True, max_grad_norm=1.0)


@pytest.mark.parametrize("kw", [dict(accumulation_steps=3), dict(max_grad_norm=0.05), dict(nonfinite="skip"),
                                dict(ema_decay=0.5, ema_overwrite_frequency=2)], ids=["accumulation", "clipping", "skip", "ema"])
def test_what_other_offloaders_refuse_equals_the_on_device_step(kw):
    nan_at = 1 if kw.get("nonfinite") else None
    on, off = train(False, opt_kw=kw, nan_at=nan_at), train(True, opt_kw=kw, nan_at=nan_at)
    assert_same(on, off)
    if nan_at is not None:
        assert on[1].nonfinite_skipped == off[1].nonfinite_skipped and off[1].nonfinite_skipped


def test_weights_changed_outside_the_optimizer_are_picked_up():
    """The host keeps a copy of the weights; an in-place write elsewhere (a weight reload, a user's edit)
    must reach it before the next step, or the step would undo it."""
    def edit(model, i):
        if i == 0:
            with torch.no_grad():
                next(model.parameters()).mul_(0.5)
        if i == 1:
            model.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()})

    assert_same(train(False, between=edit), train(True, between=edit))


def test_checkpoints_move_between_offloaded_and_on_device_state():
    """Saved on one side, resumed on the other (through torch.save), equals resuming on the device."""
    model, opt = train(False, steps=2)
    reference = train(False, steps=2, model=model, state_dict=opt.state_dict())
    for first, second in ((True, False), (False, True), (True, True)):
        model, opt = train(first, steps=2)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        resumed = train(second, steps=2, model=model, state_dict=torch.load(buf, weights_only=True))
        assert_same(reference, resumed)


def test_a_group_switched_live_moves_its_state_as_it_is():
    (model, opt), (ref_model, ref_opt) = train(True, steps=2), train(False, steps=2)
    for g in opt.param_groups:
        g["offload"] = None
    x, y = next(data(seq_len=32, seed=5))
    for m, o in ((model, opt), (ref_model, ref_opt)):
        m.loss(x, y).backward()
        o.step()
    assert_same((ref_model, ref_opt), (model, opt))


def test_bad_offload_values_are_refused_naming_the_option():
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        AdamW8bit(tiny_model().parameters(), offload="gpu")
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        AdamW8bit([{"params": tiny_model().parameters(), "offload": "nvme"}])


def test_a_compiled_step_runs_the_offloaded_buckets_eagerly():
    results = []
    for compile_step in (False, True):
        model = tiny_model(dim=64, layers=2)
        opt = AdamW8bit(model.parameters(), offload="cpu", min_8bit_size=1024, lr=1e-2)
        step = torch.compile(opt.step) if compile_step else opt.step
        for x, y in zip(range(2), data()):
            model.loss(*y).backward()
            step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_failed_bucket_step_is_raised_after_every_bucket_finished():
    pipe = offloading.OffloadPipeline(torch.device("cpu"))
    ran = []
    p = torch.zeros(10)
    for k in range(3):
        staged = pipe.stage([p], [torch.ones(10)], None)

        def step(w, g, m, k=k):
            ran.append(k)
            if k == 0:
                raise RuntimeError("boom")
            return k
        pipe.submit(staged, step)
    with pytest.raises(RuntimeError, match="boom"):
        pipe.drain()
    assert ran == [0, 1, 2] and not pipe.pending
    pipe.close()


def test_arena_slices_are_aligned_and_keep_the_layout():
    arena = offloading.HostArena(offloading.StandInTransport(), expected=None)
    a = arena.tensor_like(torch.empty(3, 5, dtype=torch.bfloat16))
    b = arena.tensor_like(torch.empty(2, 3, 4, 7).to(memory_format=torch.channels_last))
    assert a.data_ptr() % offloading.ALIGN == 0 and b.data_ptr() % offloading.ALIGN == 0
    assert b.stride() == torch.empty(2, 3, 4, 7).to(memory_format=torch.channels_last).stride()
    assert len(arena.chunks) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.copy_(torch.randn(2, 3, 4, 7))


def test_the_memory_monitor_reports_offloaded_state_as_host_memory():
    from lowbit_adamw.memory import MemoryMonitor, optimizer_state_bytes

    rows = {}
    for offload in (False, True):
        model, opt = train(offload, steps=2)
        mon = MemoryMonitor(opt, model=model)
        mon.record()
        rows[offload] = (mon.report().rows[0], mon.history[-1], opt)
    on_device, device_rec, device_opt = rows[False]
    offloaded, host_rec, host_opt = rows[True]
    state = optimizer_state_bytes(host_opt)["total"]
    assert state > 0 and state == optimizer_state_bytes(device_opt)["total"]
    assert on_device.state == state and on_device.offloaded == 0 and device_rec["host_bytes"] == 0
    pinned = host_opt.offload_host_bytes()
    assert pinned > 0
    assert offloaded.state == 0  # every group is offloaded: nothing of it is device state
    assert offloaded.offloaded == state + pinned == host_rec["host_bytes"]
    assert optimizer_state_bytes(host_opt, "host")["total"] == state
    assert optimizer_state_bytes(host_opt, "device")["total"] == 0
    with pytest.raises(ValueError, match="where must be"):
        optimizer_state_bytes(host_opt, "gpu")
