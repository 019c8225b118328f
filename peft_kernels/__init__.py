"""peft_kernels: fused Triton and CUDA kernels for parameter-efficient fine-tuning."""

from peft_kernels import nn
from peft_kernels._backends import use_backend
from peft_kernels._config import clear_tuning_cache, tuned_choices, tuning
from peft_kernels._info import info
from peft_kernels._op import warm_up
from peft_kernels.ops import (
    bias_only_linear,
    bottleneck_adapter,
    distillation_loss,
    lora_linear,
    prefix_attention,
    soft_prompt_embed,
)
from peft_kernels.patch import (
    add_lora_adapter,
    apply_lora,
    apply_p_tuning_v2,
    apply_prefix_tuning,
    delete_lora_adapter,
    disable_adapter,
    load_lora,
    load_prefix,
    merge_and_unload,
    patch_peft_model,
    print_trainable_parameters,
    remove_lora,
    remove_prefix,
    save_lora,
    save_prefix,
    set_adapter,
    trainable_parameters,
    unload,
    unpatch_peft_model,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "add_lora_adapter",
    "apply_lora",
    "apply_p_tuning_v2",
    "apply_prefix_tuning",
    "bias_only_linear",
    "delete_lora_adapter",
    "disable_adapter",
    "bottleneck_adapter",
    "distillation_loss",
    "info",
    "load_lora",
    "load_prefix",
    "lora_linear",
    "merge_and_unload",
    "nn",
    "patch_peft_model",
    "prefix_attention",
    "print_trainable_parameters",
    "remove_lora",
    "remove_prefix",
    "save_lora",
    "save_prefix",
    "set_adapter",
    "soft_prompt_embed",
    "trainable_parameters",
    "unload",
    "unpatch_peft_model",
    "use_backend",
    "warm_up",
    "tuning",
    "tuned_choices",
    "clear_tuning_cache",
]
