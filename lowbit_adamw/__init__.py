"""lowbit-adamw: AdamW with 8-bit blockwise state, a fused Triton step on GPU and a fast PyTorch step elsewhere."""
from .convert import load_torch_adamw_state_dict, to_torch_adamw_state_dict
from .format import FORMAT_VERSION, dequantize_blockwise, quantize_blockwise
from .functional import StepScalars, adamw8bit_step
from .optimizer import AdamW8bit
from .memory import optimizer_state_bytes

__all__ = [
    "AdamW8bit",
    "adamw8bit_step",
    "StepScalars",
    "quantize_blockwise",
    "dequantize_blockwise",
    "to_torch_adamw_state_dict",
    "load_torch_adamw_state_dict",
    "optimizer_state_bytes",
    "FORMAT_VERSION",
]
__version__ = "0.1.0"
