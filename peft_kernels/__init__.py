"""peft_kernels: fused Triton and CUDA kernels for parameter-efficient fine-tuning."""

from peft_kernels._backends import use_backend
from peft_kernels._info import info
from peft_kernels.ops import bias_only_linear, lora_linear

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "bias_only_linear",
    "info",
    "lora_linear",
    "use_backend",
]
