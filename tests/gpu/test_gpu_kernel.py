"""Compiled Triton kernel on CUDA against the PyTorch step (skipped without CUDA)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from lowbit_adamw import AdamW8bit, StepScalars, adamw8bit_step  # noqa: E402
from lowbit_adamw import format as fmt  # noqa: E402
from lowbit_adamw.format.step_spec import state_names  # noqa: E402
from helpers import assert_codes_match, assert_params_within_ulp, oracle_moments  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_compiled_kernel_matches_torch_step(dtype, amsgrad):
    sizes = [1, 4097, 1 << 20 | 77, 4096 * 11008 // 64, 0, 300]
    sc = StepScalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=amsgrad)
    buckets = []
    for _ in range(2):
        torch.manual_seed(0)
        params = [torch.randn(n, device="cuda").to(dtype) for n in sizes]
        grads = [torch.randn(n, device="cuda").to(dtype) for n in sizes]
        states = []
        for n in sizes:
            s = {"step": torch.tensor(0.0)}
            for name in state_names(amsgrad):
                s[name + "_codes"], s[name + "_absmax"] = fmt.quantize_blockwise(torch.zeros(n, device="cuda"), fmt.is_signed(name))
            states.append(s)
        buckets.append((params, grads, states))
    for step in range(3):
        before = [(p.clone(), g.clone(), {k: v.clone() for k, v in s.items()}) for p, g, s in zip(*buckets[0])]
        for backend, (params, grads, states) in zip(("torch", "triton"), buckets):
            for s in states:
                s["step"] += 1
            adamw8bit_step(params, grads, states, sc, backend=backend)
        for i, (a, b, sa, sb) in enumerate(zip(buckets[0][0], buckets[1][0], buckets[0][2], buckets[1][2])):
            assert_params_within_ulp(a, b, where=f"tensor {i} step {step}")
            if a.numel():
                p0, g0, s0 = before[i]
                s0["step"] += 1
                assert_codes_match(sa, sb, oracle_moments(p0, g0, s0, sc, fmt.DEFAULT_BLOCK_SIZE), fmt.DEFAULT_BLOCK_SIZE,
                                   where=f"tensor {i} step {step}: ")
            b.copy_(a)  # hold both to the same state so differences cannot compound
            for k, v in sa.items():
                sb[k].copy_(v)


def test_state_saved_on_gpu_loads_on_cpu_and_back():
    p = torch.nn.Parameter(torch.randn(10000, device="cuda"))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().cpu())
    cpu_opt = AdamW8bit([q])
    cpu_opt.load_state_dict(sd)
    assert cpu_opt.state[q]["exp_avg_codes"].device.type == "cpu"
    r = torch.nn.Parameter(p.detach().clone())
    gpu_opt = AdamW8bit([r])
    gpu_opt.load_state_dict(cpu_opt.state_dict())
    for k, v in opt.state[p].items():
        assert torch.equal(gpu_opt.state[r][k].cpu(), v.cpu())
