"""Triton kernels of lowbit-adamw, installed as ``lowbit_adamw.kernels``. Pure functions over tensors
and scalars; the optimizer logic lives in ``lowbit_adamw``."""
from .adamw8bit import adamw8bit_kernel, launch_adamw8bit, variant_constexprs

__all__ = ["adamw8bit_kernel", "launch_adamw8bit", "variant_constexprs"]
