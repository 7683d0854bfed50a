"""The Triton kernel (under TRITON_INTERPRET=1 on CPU, compiled on GPU) against the PyTorch step.

Both follow lowbit_adamw.format.step_spec to the bit (one rounded op at a time, IEEE division and square
root), so under the interpreter they agree exactly. The assertions use the principled bound of
tests/helpers.py, which also holds on a GPU: codes may differ only next to a rounding boundary of the
oracle's own companded value, parameters by at most one ulp of their dtype.
"""
import pytest
import torch
import triton
import triton.language as tl

from lowbit_adamw import StepScalars, adamw8bit_step
from lowbit_adamw import format as fmt
from lowbit_adamw.format.step_spec import state_names
from helpers import assert_codes_match, assert_params_within_ulp, m4_bound_probes, oracle_moments
from lowbit_adamw.step.kernel_launch import triton_available
from lowbit_adamw.kernels.adamw8bit import _decode_m, _encode_m

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [3000, 1, 4097, 0, 77 * 130, 65]  # not block multiples, one element, empty
BPP = 16  # blocks per program: large programs keep the interpreter fast


def make_bucket(sizes, dtype, amsgrad, block, bits=8):
    params, grads, states = [], [], []
    for n in sizes:
        params.append((torch.randn(n) * 0.5).to(dtype).to(DEVICE))
        grads.append((torch.randn(n) * torch.rand(n) ** 3).to(dtype).to(DEVICE))
        st = {"step": torch.tensor(3.0)}
        for name in state_names(amsgrad):
            signed = fmt.is_signed(name)
            x = torch.randn(n) * 0.1 if signed else torch.rand(n) ** 4 * 0.01
            if n > 10:
                x[: n // 10] = 0  # some all-zero blocks and exact zeros
            st[name + "_codes"], st[name + "_absmax"] = fmt.quantize_blockwise(x.to(DEVICE), signed, block, bits)
        states.append(st)
    return params, grads, states


def clone_bucket(params, grads, states):
    return [p.clone() for p in params], [g.clone() for g in grads], [{k: v.clone() for k, v in s.items()} for s in states]


def views_at_odd_offsets(sizes, dtype):
    """A bucket of views into one flat buffer at offsets that are not multiples of 16 (general variant)."""
    params, grads, states = make_bucket(sizes, dtype, False, 64)
    flat = torch.zeros(sum(sizes) + 3 * len(sizes), dtype=dtype, device=DEVICE)
    out, at = [], 3
    for p in params:
        v = flat[at: at + p.numel()]
        v.copy_(p)
        out.append(v)
        at += p.numel() + 3
    return out, grads, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "flags",
    [
        dict(),
        dict(amsgrad=True),
        dict(maximize=True, weight_decay=0.1),
        dict(bias_correction=False, weight_decay=0.0),
    ],
)
@pytest.mark.parametrize("variant", ["split", "general"])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_torch_step(dtype, flags, variant, bits):
    if bits == 4 and dtype == torch.float16 and flags.get("maximize"):
        pytest.skip("covered by the other 4-bit cases: keeps the interpreter time down")
    block = 64
    sc = StepScalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=flags.get("weight_decay", 0.01),
                     amsgrad=flags.get("amsgrad", False), maximize=flags.get("maximize", False),
                     bias_correction=flags.get("bias_correction", True))
    # SIZES mixes sizes that are multiples of 16 (aligned variant) with odd ones (general variant)
    bucket = make_bucket(SIZES + [16 * 40], dtype, sc.amsgrad, block, bits)
    pa, ga, sa = clone_bucket(*bucket)
    pb, gb, sb = clone_bucket(*bucket)
    for step in range(3):  # several steps: state produced by the kernel is read back by the kernel
        before = clone_bucket(pa, ga, sa)
        for s in sa + sb + before[2]:
            s["step"] += 1
        adamw8bit_step(pa, ga, sa, sc, block_size=block, backend="torch", bits=bits)
        if variant == "general":
            from lowbit_adamw.step.kernel_launch import triton_step_8bit

            triton_step_8bit(pb, gb, sb, sc, block_size=block, blocks_per_program=BPP, force_general=True, bits=bits)
        else:
            adamw8bit_step(pb, gb, sb, sc, block_size=block, backend="triton", blocks_per_program=BPP, bits=bits)
        for i, (a, b, x, y) in enumerate(zip(pa, pb, sa, sb)):
            assert_params_within_ulp(a, b, where=f"tensor {i} step {step}")
            if a.numel():
                moments = oracle_moments(before[0][i], before[1][i], before[2][i], sc, block, bits=bits)
                assert_codes_match(x, y, moments, block, where=f"tensor {i} step {step}: ", bits=bits)
                for k in x:  # the interpreter computes the spec's bits exactly
                    assert torch.equal(x[k], y[k]), f"tensor {i} step {step}: {k}"
            b.copy_(a)  # hold both to the same state so differences cannot compound
            for k, v in x.items():
                y[k].copy_(v)


def test_aligned_and_general_variants_give_the_same_bits():
    from lowbit_adamw.step import kernel_launch as KL

    sc = StepScalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    sizes = [16 * 100, 64 * 7, 4096]
    bucket = make_bucket(sizes, torch.bfloat16, False, 64)
    names = state_names(False)
    assert all(KL.is_aligned(p, g, s, names) for p, g, s in zip(*bucket))
    pa, ga, sa = clone_bucket(*bucket)
    pb, gb, sb = clone_bucket(*bucket)
    for s in sa + sb:
        s["step"] += 1
    KL.triton_step_8bit(pa, ga, sa, sc, block_size=64, blocks_per_program=BPP)
    KL.triton_step_8bit(pb, gb, sb, sc, block_size=64, blocks_per_program=BPP, force_general=True)
    for a, b, x, y in zip(pa, pb, sa, sb):
        assert torch.equal(a, b) and all(torch.equal(v, y[k]) for k, v in x.items())


def test_views_at_odd_offsets_go_to_the_general_variant(monkeypatch):
    from lowbit_adamw.step import kernel_launch as KL

    launched = []
    import lowbit_adamw.kernels as K

    def recording(*a, **k):
        launched.append((k["aligned"], a[4]))  # (variant, number of tensors)
        return K.adamw8bit.launch_adamw8bit(*a, **k)

    monkeypatch.setattr(K, "launch_adamw8bit", recording)
    sc = StepScalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    views, grads, states = views_at_odd_offsets([16 * 30, 64 * 5], torch.float32)
    ref = clone_bucket(views, grads, states)
    aligned, ag, ast = make_bucket([16 * 30], torch.float32, False, 64)
    for s in states + ast + ref[2]:
        s["step"] += 1
    KL.triton_step_8bit(views + aligned, grads + ag, states + ast, sc, block_size=64, blocks_per_program=BPP)
    assert sorted(launched) == [(False, 2), (True, 1)]
    adamw8bit_step(ref[0], ref[1], ref[2], sc, block_size=64, backend="torch")
    for a, b in zip(views, ref[0]):
        assert torch.equal(a, b)


def test_skip_flags_leave_tensors_untouched():
    from lowbit_adamw.step.kernel_launch import triton_step_8bit

    sc = StepScalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    params, grads, states = make_bucket([300, 500, 700], torch.float32, False, 64)
    before = clone_bucket(params, grads, states)
    skip = torch.tensor([False, True, False], device=DEVICE)
    triton_step_8bit(params, grads, states, sc, block_size=64, blocks_per_program=BPP, skip=skip)
    assert torch.equal(params[1], before[0][1])
    assert all(torch.equal(states[1][k], v) for k, v in before[2][1].items())
    assert not torch.equal(params[0], before[0][0]) and not torch.equal(params[2], before[0][2])


def test_plan_is_cached_and_rebuilt_when_a_tensor_moves():
    sc = StepScalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    params, grads, states = make_bucket([300, 500], torch.float32, False, 64)
    cache = {}
    adamw8bit_step(params, grads, states, sc, block_size=64, backend="triton", blocks_per_program=BPP, plan_cache=cache)
    plan = next(iter(cache.values()))
    grads = [g.clone() for g in grads]  # new grad tensors (zero_grad(set_to_none=True)) do not rebuild
    adamw8bit_step(params, grads, states, sc, block_size=64, backend="triton", blocks_per_program=BPP, plan_cache=cache)
    assert next(iter(cache.values())) is plan and len(cache) == 1
    params[0] = params[0].clone()  # a reallocated parameter does
    adamw8bit_step(params, grads, states, sc, block_size=64, backend="triton", blocks_per_program=BPP, plan_cache=cache)
    assert next(iter(cache.values())) is not plan and len(cache) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_stochastic_rounding(dtype):
    """The kernel draws lowbit_adamw.format.rng's counter-based numbers: the eager step's bits exactly, and
    stochastic rounding follows fp32 on average where round-to-nearest would never move."""
    from lowbit_adamw.format import rng

    n = 20000
    sc = StepScalars(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, stochastic_rounding=True)
    sc_nearest = StepScalars(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    p = torch.ones(n, dtype=dtype, device=DEVICE)
    p_eager = torch.ones(n, dtype=dtype)
    ref = torch.ones(n, dtype=torch.float32, device=DEVICE)
    names = state_names(False)
    states = [{"step": torch.tensor(0.0)} for _ in range(3)]
    for s in states:
        for name in names:
            s[name + "_codes"], s[name + "_absmax"] = fmt.quantize_blockwise(torch.zeros(n, device=DEVICE), fmt.is_signed(name), 256)
    st, st_eager, st_ref = states
    st_eager = {k: v.cpu() for k, v in st_eager.items()}
    for step in range(1, 21):
        g = torch.ones(n, device=DEVICE)
        for s in (st, st_eager, st_ref):
            s["step"] += 1
        key = [rng.tensor_key(3, rng.STREAM_WEIGHTS, 0, step)]
        adamw8bit_step([p], [g.to(dtype)], [st], sc, block_size=256, backend="triton", blocks_per_program=BPP, sr_keys=key)
        adamw8bit_step([p_eager], [g.cpu().to(dtype)], [st_eager], sc, block_size=256, backend="torch", sr_keys=key)
        adamw8bit_step([ref], [g], [st_ref], sc_nearest, block_size=256, backend="torch")
        assert torch.equal(p.cpu(), p_eager)
    # round-to-nearest would never move from 1.0; stochastic rounding follows fp32 on average
    assert abs(p.float().mean().item() - ref.mean().item()) < 2e-4
    from lowbit_adamw.step.functional import _toward_zero

    lo = _toward_zero(ref, dtype)
    hi = (lo.view(torch.int16) + 1).view(dtype)
    assert (p == hi).any() and (p != hi).any()


def test_optimizer_uses_kernel_when_forced():
    from lowbit_adamw import AdamW8bit

    a = torch.nn.Parameter(torch.randn(5000, device=DEVICE))
    b = torch.nn.Parameter(a.detach().clone())
    oa = AdamW8bit([a], backend="torch")
    ob = AdamW8bit([b], backend="triton")
    for _ in range(3):
        g = torch.randn(5000, device=DEVICE)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    from lowbit_adamw.step import ops

    assert [len(ops.plan_cache(i)) for i in ob._cache_ids.values()] == [1]  # one plan, built once


def test_every_bucket_launches_under_its_own_device(monkeypatch):
    # Triton launches on the current CUDA device; with device_map="auto" buckets live on several GPUs.
    # On the CPU a recording stand-in shows the guard is entered around each bucket's launch.
    import contextlib

    from lowbit_adamw import AdamW8bit
    from lowbit_adamw.step import kernel_launch as KL
    import lowbit_adamw.kernels as K

    events = []

    def guard(device):
        events.append(("enter", device))
        return contextlib.nullcontext()

    def launch(*a, **k):
        events.append(("launch", a[0][0].device))
        return K.adamw8bit.launch_adamw8bit(*a, **k)

    monkeypatch.setattr(KL, "device_guard", guard)
    monkeypatch.setattr(K, "launch_adamw8bit", launch)
    ps = [torch.nn.Parameter(torch.randn(5000, device=DEVICE)), torch.nn.Parameter(torch.randn(5000, device=DEVICE).bfloat16())]
    opt = AdamW8bit(ps, backend="triton")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    events.clear()
    opt.step()  # tables cached: only the launches themselves now
    launches = [i for i, e in enumerate(events) if e[0] == "launch"]
    assert len(launches) == 2  # one bucket per dtype
    for prev, i in zip([-1] + launches, launches):  # a guard for that bucket's device since the last launch
        assert ("enter", events[i][1]) in events[prev + 1:i], events


def test_device_guard_names_the_bucket_device():
    from lowbit_adamw.step.kernel_launch import device_guard

    g = device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1  # entered only on a GPU machine
    with device_guard(torch.device("cpu")):
        pass


def test_tables_go_to_the_gpu_without_a_host_sync():
    # a plain .to(cuda) from pageable memory waits for the stream; pinned + non_blocking does not
    from lowbit_adamw.step.kernel_launch import upload

    calls = []

    class HostTable:  # stands in for a CPU tensor on a machine without CUDA
        def pin_memory(self):
            calls.append("pin")
            return self

        def to(self, device, non_blocking=False):
            calls.append((device.type, non_blocking))
            return self

    upload(HostTable(), torch.device("cuda", 1))
    assert calls == ["pin", ("cuda", True)]
    t = torch.arange(3)
    assert upload(t, torch.device("cpu")) is t


@triton.jit
def _m4_probe(s_ptr, code_ptr, level_ptr, n, BLOCK: tl.constexpr, M4_LEVELS: tl.constexpr, M4_BOUNDS: tl.constexpr):
    offs = tl.arange(0, BLOCK)[None, :]
    s = tl.load(s_ptr + offs, mask=offs < n, other=0.0)
    tl.store(code_ptr + offs, _encode_m(s, 1.0, 4, M4_BOUNDS), mask=offs < n)
    tl.store(level_ptr + offs, _decode_m((offs % 16).to(tl.float32), 1.0, 4, M4_LEVELS))


def test_4bit_m_codes_and_levels_match_the_spec_at_every_bound():
    # The kernel finds a 4-bit m code by a binary search over the midpoints and a level by a select tree on the
    # code's bits; the spec counts midpoints and indexes M4_LEVELS. Random steps rarely land on a midpoint:
    # here every midpoint, its neighbouring floats, the levels, +-0, +-1, beyond, +-inf and NaN.
    s = torch.cat([m4_bound_probes(), torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, float("inf"), -float("inf"), float("nan")])])
    s = torch.cat([s, torch.linspace(-1.2, 1.2, 301)]).to(DEVICE)
    block = 512
    codes = torch.full((s.numel(),), -1.0, device=DEVICE)
    levels = torch.empty(block, device=DEVICE)
    _m4_probe[(1,)](s, codes, levels, s.numel(), BLOCK=block, M4_LEVELS=fmt.M4_LEVELS, M4_BOUNDS=fmt.M4_BOUNDS)
    assert torch.equal(codes.cpu(), fmt.m4_encode(s.cpu()))
    assert torch.equal(levels.cpu(), torch.tensor(fmt.M4_LEVELS).repeat(block // 16))
