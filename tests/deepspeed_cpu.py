"""Run a script with DeepSpeed's shared-memory all-reduce op left unbuilt (for tests/test_deepspeed.py).

On a CPU, DeepSpeed's torch backend builds that op (a C++ extension: 30-45 s on 2 cores) as it starts, for
inference's all-reduce; training reduces through torch.distributed and never calls it. The build is cached, but
keyed on the venv's torch headers: a new machine, or a venv at another path, builds it again.

    python -m torch.distributed.run --nproc-per-node=2 tests/deepspeed_cpu.py SCRIPT.py [args...]
"""
import importlib
import os
import runpy
import sys


def skip_shm_op():
    # importlib: `import deepspeed.comm.torch as m` binds deepspeed.comm's attribute `torch`, which is PyTorch
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


if __name__ == "__main__":
    skip_shm_op()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python SCRIPT.py` would
    runpy.run_path(sys.argv[0], run_name="__main__")
