"""Compiled Triton kernel on CUDA against the PyTorch step (skipped without CUDA)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from lowbit_adamw import AdamW8bit, StepScalars, adamw8bit_step  # noqa: E402
from lowbit_adamw import format as fmt  # noqa: E402
from lowbit_adamw.functional import state_names  # noqa: E402


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
    for _ in range(3):
        for backend, (params, grads, states) in zip(("torch", "triton"), buckets):
            for s in states:
                s["step"] += 1
            adamw8bit_step(params, grads, states, sc, backend=backend)
    for a, b, sa, sb in zip(buckets[0][0], buckets[1][0], buckets[0][2], buckets[1][2]):
        tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert ((a.float() - b.float()).abs() <= tol * a.float().abs().clamp_min(1e-3) * 1.01).all()
        for name in state_names(amsgrad):
            d = (sa[name + "_codes"].int() - sb[name + "_codes"].int()).abs()
            if d.numel():
                assert d.max() <= 1 and (d > 0).float().mean() < 1e-3
            torch.testing.assert_close(sa[name + "_absmax"], sb[name + "_absmax"], rtol=1e-5, atol=0)


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
