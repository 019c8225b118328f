"""Patching transformers / HF peft models in place with the fused ops."""

from peft_kernels.patch._methods import print_trainable_parameters, trainable_parameters
from peft_kernels.patch.adapter import (
    Stack,
    active_adapters,
    adapter_routing,
    add_bottleneck_adapter,
    apply_adapters,
    delete_bottleneck_adapter,
    list_adapters,
    load_adapters,
    remove_adapters,
    save_adapters,
    set_active_adapters,
)
from peft_kernels.patch.lora_checkpoint import load_lora, save_lora
from peft_kernels.patch.lora_model import (
    add_lora_adapter,
    apply_lora,
    delete_lora_adapter,
    disable_adapter,
    merge_and_unload,
    remove_lora,
    set_adapter,
    unload,
)
from peft_kernels.patch.peft_model import patch_peft_model, unpatch_peft_model
from peft_kernels.patch.prefix import apply_p_tuning_v2, apply_prefix_tuning, load_prefix, remove_prefix, save_prefix

__all__ = [
    "Stack",
    "active_adapters",
    "adapter_routing",
    "add_bottleneck_adapter",
    "apply_adapters",
    "delete_bottleneck_adapter",
    "list_adapters",
    "load_adapters",
    "remove_adapters",
    "save_adapters",
    "set_active_adapters",
    "add_lora_adapter",
    "apply_lora",
    "apply_p_tuning_v2",
    "apply_prefix_tuning",
    "delete_lora_adapter",
    "disable_adapter",
    "load_lora",
    "load_prefix",
    "merge_and_unload",
    "patch_peft_model",
    "print_trainable_parameters",
    "remove_lora",
    "remove_prefix",
    "save_lora",
    "save_prefix",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unpatch_peft_model",
]
