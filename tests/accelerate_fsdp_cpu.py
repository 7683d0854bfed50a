"""Run a script with accelerate's FSDP plugin kept on a CPU-only machine (for tests/test_accelerate_fsdp2.py).

On CPU ranks accelerate sets ``MULTI_CPU`` and drops the FSDP plugin that ``TrainingArguments(fsdp=...)``
builds, so a run without a GPU would test DDP instead. This keeps the plugin (``DistributedType.FSDP``);
the rest of accelerate's FSDP2 path (``fully_shard``, the parameter swap in the optimizer, sharded
checkpoints) then runs as on GPUs, over gloo.

    python -m torch.distributed.run --nproc-per-node=2 tests/accelerate_fsdp_cpu.py SCRIPT.py [args...]
"""
import os
import runpy
import sys

import accelerate.state as accel_state
from accelerate.utils import DistributedType

_init = accel_state.AcceleratorState.__init__


def _keep_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accel_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    accel_state.AcceleratorState.__init__ = _keep_fsdp_on_cpu
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python SCRIPT.py` would
    runpy.run_path(sys.argv[0], run_name="__main__")
