"""peft_kernels: fused Triton and CUDA kernels for parameter-efficient fine-tuning."""

from peft_kernels import nn
from peft_kernels._backends import use_backend
from peft_kernels._info import info
from peft_kernels.ops import (
    bias_only_linear,
    bottleneck_adapter,
    distillation_loss,
    lora_linear,
    prefix_attention,
    soft_prompt_embed,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "bias_only_linear",
    "bottleneck_adapter",
    "distillation_loss",
    "info",
    "lora_linear",
    "nn",
    "prefix_attention",
    "soft_prompt_embed",
    "use_backend",
]
