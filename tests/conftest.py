import os

import torch

# The Triton kernels run on CPU tensors under the interpreter; it must be set before triton compiles
# anything. On a CUDA machine the GPU tests use the real compiler instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
