"""Modules: drop-in layers built on the fused ops."""

from peft_kernels.nn.lora import LoRALinear

__all__ = ["LoRALinear"]
