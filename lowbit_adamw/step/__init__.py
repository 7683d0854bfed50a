"""The step of one bucket, in every backend, bit for bit the same (the spec: ``lowbit_adamw.format.step_spec``).

* ``functional``: the eager PyTorch step (the oracle) and its ``torch.compile``'d form; ``adamw8bit_step``
  dispatches a bucket to a backend.
* ``cpu_kernel``: the C++ step (``csrc/cpu_step.cpp``, built at first use, called through ctypes).
* ``kernel_launch``: the Triton step's host side (launch tables; the kernel itself is ``lowbit_adamw.kernels``).
* ``clipping``: the gradient multiplier's norms (``max_grad_norm``, ``clip_norm``), on the device.
* ``ops``: the bucket step as the custom op ``torch.ops.lowbit_adamw.step_``, the optimizer's one entry.

Imports only ``lowbit_adamw.format`` (and the kernels) from the package.
"""
