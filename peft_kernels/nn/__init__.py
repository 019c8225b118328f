"""Modules: drop-in layers built on the fused ops."""

from peft_kernels.nn.adapter import AdapterConfig, BottleneckAdapter
from peft_kernels.nn.lora import LoRALinear
from peft_kernels.nn.lora_conv1d import LoRAConv1D
from peft_kernels.nn.prefix import PrefixEncoder, PrefixParameters
from peft_kernels.nn.prompt import PromptEncoder, SoftPrompt

__all__ = ["AdapterConfig", "BottleneckAdapter", "LoRAConv1D", "LoRALinear", "PrefixEncoder", "PrefixParameters",
           "PromptEncoder", "SoftPrompt"]
