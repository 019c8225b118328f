"""``save_pretrained`` / ``Trainer`` on an ``apply_lora`` model keep the adapter.

``apply_lora`` gives a transformers ``PreTrainedModel`` an instance-level ``save_pretrained`` that writes, in
the same directory:

* what transformers writes (``config.json`` and the full state dict, LoRA tensors included), so that
  ``Trainer``'s resume-from-checkpoint (``load_state_dict`` of ``model.safetensors``) restores the adapter;
* the adapter in HF peft's format (``adapter_config.json`` + ``adapter_model.safetensors``, see
  :func:`~peft_kernels.patch.save_lora`; further named adapters in ``<dir>/<name>/`` as peft lays them out),
  so ``AutoModel*.from_pretrained(dir)`` loads the base and then the adapter through transformers' PEFT
  integration (``load_adapter``), and ``load_lora(base, dir)`` or ``PeftModel.from_pretrained`` load it too.

A state it cannot save faithfully (LoRA merged into the weights) raises instead of writing a model that
would reload different.

It also gives the model the peft methods a peft user calls on it, with peft's names and meaning:
``model.print_trainable_parameters()``, ``model.get_nb_trainable_parameters()``, ``model.set_adapter(name)``,
``with model.disable_adapter():``, ``model.merge_and_unload()``, ``model.unload()`` (each the module-level
function of the same name on this model). ``remove_lora`` takes them away again.
"""

from __future__ import annotations

import os

from torch import nn

from peft_kernels.patch._save_pretrained import (
    ModelBound,
    current_saver,
    is_pretrained_model,
    save_model,
    uninstall_saver,
)
from peft_kernels.patch.lora_model import lora_modules, lora_state, unwrap

_ATTR = "save_pretrained"


class _BoundToModel(ModelBound):
    """``function(model, ...)`` as an instance attribute of ``model`` (copies and pickles with it)."""

    def __init__(self, function, model: nn.Module) -> None:
        super().__init__(model)
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function(self.model, *args, **kwargs)


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """peft's ``(trainable, all)`` parameter counts."""
    from peft_kernels.patch._methods import trainable_parameters

    return tuple(trainable_parameters(model))


def _peft_methods() -> dict:
    from peft_kernels.patch._methods import print_trainable_parameters
    from peft_kernels.patch.lora_model import disable_adapter, merge_and_unload, set_adapter, unload

    return {"print_trainable_parameters": print_trainable_parameters,
            "get_nb_trainable_parameters": get_nb_trainable_parameters,
            "set_adapter": set_adapter, "disable_adapter": disable_adapter,
            "merge_and_unload": merge_and_unload, "unload": unload}


class _SavePretrainedWithLoRA(ModelBound):
    """The instance-level ``save_pretrained`` of an apply_lora model (copies and pickles with it). ``inner``: the
    one it wraps (BitFit's, applied before LoRA on layers LoRA does not take), or None (the class's)."""

    def __init__(self, model: nn.Module, inner=None) -> None:
        super().__init__(model)
        self.inner = inner

    def __call__(self, save_directory, *args, **kwargs):
        from peft_kernels.patch.lora_checkpoint import save_lora

        model = self.model
        owner = f"{type(model).__name__}.save_pretrained (with peft_kernels LoRA)"
        state = lora_state(model, owner)
        merged = [n for n, m in lora_modules(model) if m.merged]
        if merged:
            raise ValueError(f"{owner}: {len(merged)} LoRA layers are merged into their weights (e.g. {merged[0]!r}); "
                             "saving them would apply the adapter twice on reload: unmerge them, or call "
                             "merge_and_unload(model) first to save a plain merged model")
        if kwargs.get("save_peft_format") is False:
            raise ValueError(f"{owner}: save_peft_format=False would save no adapter that from_pretrained loads")
        if not save_model(self, model, save_directory, args, kwargs):
            return
        first = next(iter(state.adapters))
        for name in state.adapters:  # peft's layout: the first adapter at the top, the others in subfolders
            save_lora(model, save_directory if name == first else os.path.join(save_directory, name),
                      adapter_name=name)


def install_save_pretrained(model: nn.Module) -> None:
    """``save_pretrained`` (transformers models) and the peft methods above, on the model instance."""
    model = unwrap(model)
    for name, function in _peft_methods().items():
        model.__dict__[name] = _BoundToModel(function, model)
    if is_pretrained_model(model):
        model.__dict__[_ATTR] = _SavePretrainedWithLoRA(model, current_saver(model))


def uninstall_save_pretrained(model: nn.Module) -> None:
    model = unwrap(model)
    for name in _peft_methods():
        if isinstance(model.__dict__.get(name), _BoundToModel):
            del model.__dict__[name]
    uninstall_saver(model, lambda s: isinstance(s, _SavePretrainedWithLoRA))
