"""Patching transformers / HF peft models in place with the fused ops."""

from peft_kernels.patch.lora import (
    apply_lora,
    load_lora,
    patch_peft_model,
    remove_lora,
    save_lora,
    unpatch_peft_model,
)

__all__ = [
    "apply_lora",
    "load_lora",
    "patch_peft_model",
    "remove_lora",
    "save_lora",
    "unpatch_peft_model",
]
