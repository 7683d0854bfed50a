"""The C++ CPU step (backend="cpp", the CPU default) against the eager PyTorch step: one spec, so the
same bits for every option, width, dtype and block size, on every CPU code path."""
import os
import warnings

import pytest
import torch

from lowbit_adamw import AdamW8bit
from lowbit_adamw import format as fmt
from lowbit_adamw.step import cpu_kernel
from helpers import m4_bound_probes

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no C++ compiler here")

# a partial last block, whole blocks only, an odd size (a padding nibble at 4 bits), a tiny tensor
SIZES = (300 * 256 + 77, 256 * 40, 5001, 3)


def twins(dtype, sizes=SIZES, **kw):
    torch.manual_seed(0)
    base = [torch.randn(n, dtype=dtype) for n in sizes]
    return [AdamW8bit([torch.nn.Parameter(b.clone()) for b in base], backend=backend, min_8bit_size=0, **kw)
            for backend in ("torch", "cpp")]


def step_both(opts, step, dtype, sizes=SIZES, poison=False):
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(n, generator=g) * 10.0 ** -(step % 3) for n in sizes]
    if poison:  # a NaN in one block, an Inf in another, a -Inf in a third
        grads[0][1000] = float("nan")
        grads[1][5] = float("inf")
        grads[2][4999] = -float("inf")
    for o in opts:
        for p, gr in zip(o.param_groups[0]["params"], grads):
            p.grad = gr.to(dtype)
        o.step()


def assert_same(eager, cpp):
    for pe, pc in zip(eager.param_groups[0]["params"], cpp.param_groups[0]["params"]):
        assert torch.equal(pe, pc)
        se, sc = eager.state[pe], cpp.state[pc]
        assert se.keys() == sc.keys()
        for k, v in se.items():
            assert torch.equal(v, sc[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kw", [dict(weight_decay=0.1), dict(amsgrad=True, maximize=True, lr=3e-2),
                                dict(bias_correction=False, lr=1e-2, clip_value=0.5),
                                dict(ema_decay=0.9, clip_norm=1.0, block_size=64), dict(amsgrad=True, ema_decay=0.99, block_size=4096)])
def test_cpp_step_gives_the_eager_bits(dtype, bits, kw):
    eager, cpp = twins(dtype, bits=bits, **kw)
    for step in range(4):
        step_both((eager, cpp), step, dtype)
        assert_same(eager, cpp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the test reads the gradient's bits in its own width
@pytest.mark.parametrize("bits", [8, 4])
def test_cpp_step_skips_nonfinite_blocks_like_eager(bits, dtype):
    eager, cpp = twins(dtype, bits=bits)
    step_both((eager, cpp), 0, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step_both((eager, cpp), 1, dtype, poison=True)
    assert_same(eager, cpp)
    assert eager.nonfinite_skipped == cpp.nonfinite_skipped and sum(cpp.nonfinite_skipped.values()) == 3


def test_many_tensors_go_in_one_call(monkeypatch):
    calls = []
    real = cpu_kernel.cpu_step
    monkeypatch.setattr(cpu_kernel, "cpu_step", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    sizes = [4096 + 2 * i for i in range(50)]
    eager, cpp = twins(torch.float32, sizes=sizes)
    step_both((eager, cpp), 0, torch.float32, sizes=sizes)
    assert calls == [50]
    assert_same(eager, cpp)


def test_fp16_takes_the_compiled_step(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernel, "cpu_step", lambda *a, **k: calls.append(1))
    for kw in ({}, dict(stochastic_rounding=True)):
        eager, cpp = twins(torch.float16, **kw)
        step_both((eager, cpp), 0, torch.float16)
        assert_same(eager, cpp)
    assert not calls


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_stochastic_rounding_in_the_cpp_step_gives_the_eager_bits(bits, monkeypatch):
    """The counter-based random numbers (lowbit_adamw.format.rng) are the same in C++ and in the eager step."""
    eager, cpp = twins(torch.bfloat16, stochastic_rounding=True, bits=bits, lr=3e-4)
    calls = []
    real = cpu_kernel.cpu_step
    monkeypatch.setattr(cpu_kernel, "cpu_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    for step in range(3):
        step_both((eager, cpp), step, torch.bfloat16)
        assert_same(eager, cpp)
    assert calls
    # and the rounding is stochastic: some weights moved by less than half an ulp's worth of update
    plain, _ = twins(torch.bfloat16, bits=bits, lr=3e-4)
    for step in range(3):
        step_both((plain,), step, torch.bfloat16)
    assert any(not torch.equal(a, b) for a, b in zip(plain.param_groups[0]["params"], cpp.param_groups[0]["params"]))


def test_auto_backend_uses_the_cpp_step_on_cpu():
    assert AdamW8bit([torch.nn.Parameter(torch.randn(8192))])._resolve_backend(torch.device("cpu")) == "cpp"


def test_a_failed_build_falls_back_to_the_compiled_step(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernel, "_lib", {})
    with pytest.warns(RuntimeWarning, match="C.. CPU step could not be built"):
        assert not cpu_kernel.available()
    assert AdamW8bit([torch.nn.Parameter(torch.randn(8192))])._resolve_backend(torch.device("cpu")) == "compiled"


def test_the_library_is_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_ADAMW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_lib", {})
    assert cpu_kernel.available()
    path = cpu_kernel.library_path()[0]
    assert path.parent == tmp_path and path.exists()
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernel, "_lib", {})
    assert cpu_kernel.available() and path.stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_a_truncated_library_in_the_cache_is_rebuilt_not_loaded(monkeypatch, tmp_path):
    assert cpu_kernel.available()  # built in the usual cache by now: a copy of it (one build fewer) seeds this one
    built = cpu_kernel.library_path()[0]
    monkeypatch.setenv("LOWBIT_ADAMW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_lib", {})
    path = cpu_kernel.library_path()[0]
    whole = built.read_bytes()
    path.with_suffix(".sha256").write_text(built.with_suffix(".sha256").read_text())
    # What a full disk or a killed copy leaves (dlopen of it: SIGBUS). A new file, not this one cut in place:
    # this process has the library mapped, and cutting a mapped file would fault here, not in the code tested.
    bad = tmp_path / "truncated"
    bad.write_bytes(whole[: len(whole) // 3])
    os.replace(bad, path)
    assert not cpu_kernel._intact(path)
    assert cpu_kernel.available()
    assert cpu_kernel._intact(path) and path.stat().st_size > len(whole) // 3  # rebuilt, and its checksum matches


def test_a_compiler_that_stalls_is_given_up_on(monkeypatch, tmp_path):
    fake = tmp_path / "stalling-c++"
    fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo fake 1.0; exit 0; fi\nsleep 60\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("LOWBIT_ADAMW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWBIT_ADAMW_BUILD_TIMEOUT", "1")
    monkeypatch.setattr(cpu_kernel, "_lib", {})
    with pytest.warns(RuntimeWarning, match="did not finish within 1 s"):
        assert not cpu_kernel.available()


@pytest.mark.parametrize("bits", [8, 4])
def test_cpp_step_propagates_nonfinite_like_eager_when_told_to_ignore(bits):
    eager, cpp = twins(torch.float32, bits=bits, nonfinite="ignore")
    step_both((eager, cpp), 0, torch.float32, poison=True)
    for pe, pc in zip(eager.param_groups[0]["params"], cpp.param_groups[0]["params"]):
        torch.testing.assert_close(pc, pe, rtol=0, atol=0, equal_nan=True)
        for k, v in eager.state[pe].items():
            torch.testing.assert_close(cpp.state[pc][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert eager.param_groups[0]["params"][0].isnan().any()


@pytest.mark.parametrize("kw", [dict(lr=1e39), dict(lr=1e-3, loss_scale=1e-40)])
def test_scalars_beyond_fp32_range_become_fp32_infinity_as_in_eager(kw):
    # lr / bc1 (or the gradient multiplier 1 / loss_scale) is finite in float64 and overflows fp32: the
    # packed arguments must carry inf, as every other backend's fp32 rounding does, not raise.
    eager, cpp = twins(torch.float32, sizes=(5001, 3), **kw)
    step_both((eager, cpp), 0, torch.float32, sizes=(5001, 3))
    for pe, pc in zip(eager.param_groups[0]["params"], cpp.param_groups[0]["params"]):
        assert not torch.isfinite(pe).all()
        torch.testing.assert_close(pe, pc, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bits", [8, 4])
def test_cpp_step_gives_the_eager_bits_when_a_flat_block_saturates(bits):
    # a whole block of gradient spikes (every g * g overflows to inf): v's scale saturates at FLT_MAX in a flat block
    # (map B at 8 bits), whose top code decodes back to inf; the block's decode map is chosen once per block
    flat = 256 if bits == 8 else 128
    sizes = (flat * 3 + 10,)
    eager, cpp = twins(torch.float32, sizes=sizes, bits=bits)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        grad = torch.randn(sizes[0], generator=g) * 1e-2
        if step == 1:
            grad[flat:2 * flat] = (2e19 + 1e19 * torch.rand(flat, generator=g)) * torch.sign(torch.randn(flat, generator=g))
        for o in (eager, cpp):
            o.param_groups[0]["params"][0].grad = grad.clone()
            o.step()
        assert_same(eager, cpp)
        if step >= 1:
            scale = cpp.state[cpp.param_groups[0]["params"][0]]["exp_avg_sq_absmax"].reshape(-1)[1]
            assert scale.abs() == torch.finfo(torch.float32).max and (scale < 0) == (bits == 8), (step, scale)


@pytest.mark.parametrize("bits", [8, 4])
def test_cpp_step_without_the_v_dither_gives_the_eager_bits_in_both_v_maps(bits, monkeypatch):
    # v_dithers=None (the functional API's default: u = 1/2) has its own loops in the C++ encode, one
    # per 8-bit v map; the first half of each gradient is flat (|g| in [0.8, 1]: every block's v within
    # a factor of 2 of its largest, map B), the rest Gaussian (map A).
    from lowbit_adamw.step import ops

    real = ops.adamw8bit_step
    monkeypatch.setattr(ops, "adamw8bit_step", lambda *a, **k: real(*a, **dict(k, v_dithers=None)))
    sizes = (256 * 12 + 40, 5001)
    eager, cpp = twins(torch.float32, sizes=sizes, bits=bits)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = []
        for n in sizes:
            gr = torch.randn(n, generator=g)
            half = n // 2
            gr[:half] = (0.8 + 0.2 * torch.rand(half, generator=g)) * torch.sign(torch.randn(half, generator=g))
            grads.append(gr)
        for o in (eager, cpp):
            for p, gr in zip(o.param_groups[0]["params"], grads):
                p.grad = gr.clone()
            o.step()
        assert_same(eager, cpp)
    if bits == 8:  # both maps were exercised: map B blocks carry a negative scale
        scales = cpp.state[cpp.param_groups[0]["params"][0]]["exp_avg_sq_absmax"]
        assert (scales < 0).any() and (scales > 0).any()


def test_4bit_m_codes_at_every_bound_match_the_spec():
    # With beta1 = 0 the new m is the gradient itself; each block holds a 1 (its scale) and values on, just
    # below and just above every midpoint of the 4-bit m map, where the C++ step's binary search must count
    # exactly as the spec does (random steps rarely land there).
    probes = torch.cat([m4_bound_probes(), torch.tensor([0.0, -0.0, 1.0, -1.0])])
    block = 128
    per_block = block - 1
    n_blocks = -(-probes.numel() // per_block)
    g = torch.zeros(n_blocks, block)
    g[:, 0] = 1.0
    flat = torch.cat([probes, torch.zeros(n_blocks * per_block - probes.numel())])
    g[:, 1:] = flat.view(n_blocks, per_block)
    g = g.reshape(-1)
    codes = {}
    for backend in ("torch", "cpp"):
        p = torch.nn.Parameter(torch.zeros(g.numel()))
        opt = AdamW8bit([p], backend=backend, bits=4, block_size=block, betas=(0.0, 0.999), min_8bit_size=0)
        p.grad = g.clone()
        opt.step()
        codes[backend] = fmt.unpack_nibbles(opt.state[p]["exp_avg_codes"], g.numel())
    assert torch.equal(codes["cpp"], codes["torch"])
    assert torch.equal(codes["cpp"].float(), fmt.m4_encode(g))
