"""offload="cpu" on a real GPU: side streams, pinned buffers, the host step against the on-GPU step
(skipped without CUDA; tests/test_offload.py holds the same pipeline to the bit on the CPU stand-in)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from helpers import data, tiny_model  # noqa: E402
from lowbit_adamw import AdamW8bit  # noqa: E402


def train(offload, step_in_backward, dtype, steps=3):
    model = tiny_model(dim=64, layers=2, dtype=dtype).cuda()
    opt = AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=0, offload="cpu" if offload else None,
                    step_in_backward=step_in_backward, step_in_backward_bucket_mb=0.03, seed=3)
    it = data(seq_len=32)
    for _ in range(steps):
        x, y = next(it)
        model.loss(x.cuda(), y.cuda()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step_in_backward", [False, True])
def test_offloaded_step_on_gpu_equals_the_on_gpu_step(dtype, step_in_backward):
    (ma, oa), (mb, ob) = train(False, step_in_backward, dtype), train(True, step_in_backward, dtype)
    # Every tensor has quantized state (min_8bit_size=0): one spec on both sides (Triton here, C++ on the
    # host), so the runs agree to the bit; torch's fused AdamW for fp32 state has CUDA and CPU kernels that need not.
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert pb.is_cuda and all(t.device.type == "cpu" for t in ob.state[pb].values())
        assert "exp_avg_codes" in oa.state[pa] and torch.equal(pa, pb)
        for k in oa.state[pa]:
            assert torch.equal(oa.state[pa][k].cpu(), ob.state[pb][k]), k
    assert ob.offload_host_bytes() > 0 and all(b.is_pinned() for pipe in ob._offload.pipelines.values()
                                               for b in pipe.arena.chunks)
