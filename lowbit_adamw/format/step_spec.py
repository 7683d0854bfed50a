"""The step, written once: what every backend (eager, compiled, Triton) computes per element.

Both ``lowbit_adamw.step.functional`` (the PyTorch paths) and ``lowbit_adamw.step.kernel_launch`` (the Triton
host side) import this module; neither imports the other's internals.

Per element, in fp32 whatever the parameter dtype (torch.optim.AdamW semantics)::

    g  = clamp(g * mul, -clip_value, clip_value)  # mul = host_mul * device_mul, one fp32 multiply (see below)
    g  = -g if maximize else g
    p  = p * (1 - lr * weight_decay)
    m  = m * beta1 + g * (1 - beta1)
    v  = v * beta2 + (g * g) * (1 - beta2)
    vh = max(vmax, v) if amsgrad else v          # vmax is stored (8-bit) and becomes vh
    p  = p - (lr / bc1) * (m / (sqrt(vh) * (1 / sqrt(bc2)) + eps))
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t        (both 1 when bias_correction is False)

then m, v (and vmax) are re-encoded (``lowbit_adamw.format``) and p is written in its dtype, rounded to
nearest even or, with ``stochastic_rounding``, stochastically: toward zero, then one unit away from
zero when ``u < (|p| - |lo|) / (|hi| - |lo|)``, ``u`` the counter-based uniform of ``lowbit_adamw.format.rng``
for (seed, weights stream, the parameter's position in the optimizer, its step, the element's index). With
EMA, ``ema = ema * mom + p * (1 - mom)`` with the weight as stored (``mom`` is 0 on a tensor's first update).

The gradient multiplier of a tensor is ``host_mul``, a number known on the host (accumulation mean,
AMP unscale, ``loss_scale``), times ``device_mul``, an fp32 tensor computed on the gradients' device
without a host sync (``max_grad_norm`` and ``clip_norm`` factors, ``lowbit_adamw.step.clipping``; 1 without
them), rounded once.

Exact arithmetic
----------------
Every ``*``, ``+``, ``-``, ``/`` and ``sqrt`` above is one IEEE fp32 operation, rounded to nearest, in
the order written: no fused multiply-add, no approximate division or square root. Scalars that appear
as ``(1 - beta1)``, ``lr / bc1`` and the like are computed in float64 on the host and rounded to fp32
once. So the three backends give the same bits on any CPU (an AVX2, AVX-512 or baseline build of
ATen, inductor's C++, Triton's interpreter) and a GPU, instead of differing wherever one of them
contracts ``a * b + c`` into an FMA (ATen's ``add(alpha=)``, ``addcmul`` and ``addcdiv`` do on AVX2 and
AVX-512, and Triton does by default on a GPU).

Non-finite gradients
--------------------
With ``nonfinite="skip"`` (the default) the unit of skipping is the quantization block: a block whose
gradient holds a NaN or an Inf keeps its parameter values, codes, scale and EMA exactly as they were,
while the other blocks of the tensor update. Blocks are independent (one scale each), so this needs
no second pass over the gradient and no host synchronisation, and under FSDP2 it is rank-local by
construction (blocks never straddle shards). Tensors kept in fp32 state skip as a whole. ``step``
counts the tensor's steps and always advances. Skipped blocks are counted per tensor on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import format as fmt

NONFINITE_MODES = ("skip", "raise", "ignore")


@dataclass(frozen=True)
class StepScalars:
    """Hyper-parameters of one step, read from the param group at every step."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool = False
    maximize: bool = False
    bias_correction: bool = True
    stochastic_rounding: bool = False
    clip_value: float = math.inf  # |g| is clamped to this after the gradient multiplier
    skip_nonfinite: bool = True  # the block rule above; False: no check (nonfinite="ignore", or checked before)

    def corrections(self, step: float) -> tuple[float, float]:
        """(lr / bc1, 1 / sqrt(bc2)) for a tensor at ``step`` (after incrementing). Computed in
        float64 on the host so every backend uses the very same fp32 scalars."""
        if step < 1:
            raise ValueError(f"state['step'] is {step}: increment it before calling adamw8bit_step (the first step is 1)")
        if not self.bias_correction:
            return self.lr, 1.0
        bc1 = 1.0 - self.beta1**step
        bc2 = 1.0 - self.beta2**step
        return self.lr / bc1, 1.0 / math.sqrt(bc2)

    def constants(self) -> tuple[float, ...]:
        """(decay, beta1, 1 - beta1, beta2, 1 - beta2, eps): the per-step constants every backend rounds
        to fp32 once."""
        return (1.0 - self.lr * self.weight_decay, self.beta1, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2, self.eps)


def state_names(amsgrad: bool) -> tuple[str, ...]:
    return fmt.QUANTIZED_MOMENTS if amsgrad else fmt.QUANTIZED_MOMENTS[:2]
