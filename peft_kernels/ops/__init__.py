"""The ops, one module per family: reference math, torch.library registration, backend dispatch."""

from peft_kernels.ops import _native_fakes  # noqa: F401  (fake kernels of the csrc ops)
from peft_kernels.ops.adapter import bottleneck_adapter, bottleneck_adapter_mixed, bottleneck_adapter_reference
from peft_kernels.ops.bias_norm import bias_only_norm, bias_only_norm_reference
from peft_kernels.ops.bias_only import bias_only_linear, bias_only_linear_reference
from peft_kernels.ops.distill import distillation_loss, distillation_loss_reference
from peft_kernels.ops.lora import lora_linear, lora_linear_reference
from peft_kernels.ops.prefix_attention import prefix_attention, prefix_attention_reference
from peft_kernels.ops.prefix_kv_buffer import prefix_kv_buffer
from peft_kernels.ops.prompt import soft_prompt_embed, soft_prompt_embed_reference

__all__ = [
    "bias_only_linear",
    "bias_only_linear_reference",
    "bias_only_norm",
    "bias_only_norm_reference",
    "bottleneck_adapter",
    "bottleneck_adapter_mixed",
    "bottleneck_adapter_reference",
    "distillation_loss",
    "distillation_loss_reference",
    "lora_linear",
    "lora_linear_reference",
    "prefix_attention",
    "prefix_attention_reference",
    "prefix_kv_buffer",
    "soft_prompt_embed",
    "soft_prompt_embed_reference",
]
