"""``LoRAConv1D``: LoRA on a GPT-2 style ``transformers.pytorch_utils.Conv1D`` (``y = x W + b``, W ``[in, out]``)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from peft_kernels.nn.lora import LoRALinear, checked_wrap_args


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


# An import statement per call costs microseconds on the per-call patch path (dynamo traces the plain one).
_conv1d_class_cached = functools.cache(_conv1d_class)


def is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class() if torch.compiler.is_compiling() else _conv1d_class_cached()
    return cls is not None and isinstance(module, cls)


class LoRAConv1D(LoRALinear):
    """LoRA on a GPT-2 ``Conv1D`` (``y = x W + b`` with W stored ``[in, out]``).

    Keeps the Conv1D's own ``weight`` Parameter in its ``[in, out]`` layout, so the base model's state_dict
    shapes and checkpoints are unchanged, and hands the op ``weight.t()``, a view (no copy). ``lora_A`` /
    ``lora_B`` have LoRALinear's (and peft's) ``[r, in]`` / ``[out, r]`` shapes. Note that, as a LoRALinear,
    it is an ``nn.Linear`` subclass whose weight is transposed: use its ``nf`` / ``nx`` / ``fan_in_fan_out``
    rather than assuming ``weight.shape == (out, in)``.
    """

    _weight_is_base = False  # weight is [in, out]: the op gets base_weight(), a transposed view

    fan_in_fan_out = True

    @classmethod
    def from_conv1d(cls, conv: nn.Module, **lora_kwargs) -> LoRAConv1D:
        """Wrap a GPT-2 Conv1D, reusing its Parameters; takes LoRALinear.from_linear's keyword arguments."""
        owner = "LoRAConv1D.from_conv1d"
        if not is_conv1d(conv):
            raise TypeError(f"{owner}: expected a transformers Conv1D, got {type(conv).__name__}")
        hp, freeze_base = checked_wrap_args(owner, conv, **lora_kwargs)
        return cls._wrap(conv, conv.nx, conv.nf, hp, freeze_base)

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    def delta_weight(self, name: str | None = None) -> Tensor:
        # merge()/unmerge() add this to the stored weight, which is [in, out] here.
        return super().delta_weight(name).t()

    def base_weight(self) -> Tensor:
        return self.weight.t()  # a view: the op reads it with its strides

    def to_conv1d(self) -> nn.Module:
        """A plain Conv1D around the same weight and bias Parameters (merge or unmerge first)."""
        Conv1D = _conv1d_class()
        conv = Conv1D.__new__(Conv1D)
        nn.Module.__init__(conv)
        conv.nf, conv.nx = self.out_features, self.in_features
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv
