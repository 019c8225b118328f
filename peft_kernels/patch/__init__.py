"""Patching transformers / HF peft models in place with the fused ops."""

from peft_kernels.patch._methods import print_trainable_parameters, trainable_parameters
from peft_kernels.patch.lora import (
    apply_lora,
    load_lora,
    patch_peft_model,
    remove_lora,
    save_lora,
    unpatch_peft_model,
)
from peft_kernels.patch.prefix import apply_p_tuning_v2, apply_prefix_tuning, load_prefix, remove_prefix, save_prefix

__all__ = [
    "apply_lora",
    "apply_p_tuning_v2",
    "apply_prefix_tuning",
    "load_lora",
    "load_prefix",
    "patch_peft_model",
    "print_trainable_parameters",
    "remove_lora",
    "remove_prefix",
    "save_lora",
    "save_prefix",
    "trainable_parameters",
    "unpatch_peft_model",
]
