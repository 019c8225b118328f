"""``model.save_pretrained(dir)`` on a model a peft_kernels method patched also writes that method's own files.

``save_pretrained`` (and ``Trainer.save_model`` / its checkpoints, which call it) writes the full state dict,
the method's tensors included, which ``Trainer``'s resume loads back; but ``AutoModel*.from_pretrained`` drops
keys it does not know, and the method's loader (``load_prefix``, ``load_bitfit``, ``load_adapters``,
``load_prompt``) needs the method's own files. Each ``apply_*`` of those methods gives a transformers
``PreTrainedModel`` an instance-level ``save_pretrained`` that writes both; its ``remove_*`` takes it away.
LoRA has its own (``lora_transformers``: peft's adapter files, which transformers loads itself). Savers chain:
the one installed later wraps the earlier (``inner``), and a removal splices its own out wherever it is.
"""

from __future__ import annotations

import importlib
import os
import weakref

from torch import nn

_ATTR = "save_pretrained"
# Prompt tuning's files are peft's adapter_config.json + adapter_model.safetensors: at the top of the directory
# transformers' from_pretrained would take them for an adapter it can inject (and raise), so they go one level down;
# load_prompt(dir) looks there.
PROMPT_SUBDIR = "peft_kernels_prompt"

# method -> (module, its save function, the folder it writes into under the directory: "" = the directory itself)
_SAVERS = {
    "prefix": ("peft_kernels.patch.prefix", "save_prefix", ""),
    "p_tuning_v2": ("peft_kernels.patch.prefix", "save_prefix", ""),
    "bitfit": ("peft_kernels.patch.bitfit", "save_bitfit", ""),
    "adapters": ("peft_kernels.patch.adapter", "save_adapters", ""),
    "prompt": ("peft_kernels.patch.prompt", "save_prompt", PROMPT_SUBDIR),
    "p_tuning": ("peft_kernels.patch.prompt", "save_prompt", PROMPT_SUBDIR),
}


class ModelBound:
    """An instance attribute of a model that calls back into it (a saver, a peft-style method), holding the model
    weakly: a strong reference would make a model -> __dict__ -> self -> model cycle, and ``del model`` would not
    free it (nor its GPU memory) until the cyclic collector runs. ``copy.deepcopy`` / pickling bind the copy to the
    copied model (the state carries the model, memoised as the copy's)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise ReferenceError(f"{type(self).__name__}: the model it belongs to no longer exists")
        return model

    def __getstate__(self):
        return {**self.__dict__, "_model": self.model}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._model = weakref.ref(state["_model"])


class _SavePretrainedWith(ModelBound):
    """The instance-level ``save_pretrained`` of a patched model."""

    def __init__(self, model: nn.Module, method: str, inner) -> None:
        super().__init__(model)
        self.method, self.inner = method, inner

    def __call__(self, save_directory, *args, **kwargs):
        model = self.model
        if not save_model(self, model, save_directory, args, kwargs):
            return
        module, function, sub = _SAVERS[self.method]
        save = getattr(importlib.import_module(module), function)
        save(model, os.path.join(save_directory, sub) if sub else save_directory)


def save_model(saver, model: nn.Module, save_directory, args, kwargs) -> bool:
    """What a chained saver writes first: the model (and an earlier method's files) through the saver it wraps, or
    the class's save_pretrained. Returns whether this process writes files of its own (the main one)."""
    if saver.inner is not None:
        saver.inner(save_directory, *args, **kwargs)
    else:
        type(model).save_pretrained(model, save_directory, *args, **kwargs)
    return kwargs.get("is_main_process", True)


def is_pretrained_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def current_saver(model: nn.Module):
    """The instance-level save_pretrained a new one wraps (None: the class's)."""
    return model.__dict__.get(_ATTR)


def install(model: nn.Module, method: str) -> None:
    """Give ``model`` (a transformers PreTrainedModel; anything else is left alone) the save_pretrained above,
    wrapping the instance-level one it may have (an earlier method's)."""
    if is_pretrained_model(model) and method in _SAVERS:
        model.__dict__[_ATTR] = _SavePretrainedWith(model, method, current_saver(model))


def uninstall_saver(model: nn.Module, match) -> None:
    """Take the saver ``match(saver)`` selects out of ``model``'s chain of savers (each wraps ``.inner``), wherever
    it is in the chain (a method removed under one applied after it)."""
    parent, current = None, model.__dict__.get(_ATTR)
    while current is not None and not match(current):
        parent, current = current, getattr(current, "inner", None)
    if current is None:
        return
    inner = getattr(current, "inner", None)
    if parent is not None:
        parent.inner = inner
    elif inner is None:
        del model.__dict__[_ATTR]
    else:
        model.__dict__[_ATTR] = inner


def uninstall(model: nn.Module, method: str) -> None:
    """Undo :func:`install` for ``method`` (what it wrapped takes its place)."""
    uninstall_saver(model, lambda s: isinstance(s, _SavePretrainedWith) and s.method == method)
