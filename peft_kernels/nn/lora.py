"""``LoRALinear``: a drop-in ``nn.Linear`` with a fused low-rank adapter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peft_kernels.ops.lora import lora_linear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Linear):
    """``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`` with W (and b) frozen and A, B trainable.

    Same constructor, attributes (``weight``, ``bias``, ``in_features``, ``out_features``) and forward as
    ``nn.Linear``, plus ``r``, ``lora_alpha``, ``lora_dropout`` and ``use_rslora`` (s = alpha / r, or
    alpha / sqrt(r)). A and B are kept in fp32 by default (``adapter_dtype``) as master weights, like HF
    peft; the math runs in the activation dtype. B starts at zero, so a new adapter changes nothing.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype | None = torch.float32,
        freeze_base: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, freeze_base)

    def _init_lora(self, r=8, lora_alpha=8.0, lora_dropout=0.0, use_rslora=False, adapter_dtype=torch.float32,
                   freeze_base=True) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALinear: r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoRALinear: lora_dropout must be in [0, 1), got {lora_dropout}")
        self.r, self.lora_alpha, self.lora_dropout = r, float(lora_alpha), float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, self.lora_alpha, use_rslora)
        kw = {"device": self.weight.device, "dtype": adapter_dtype or self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.reset_lora_parameters()
        self.merged = False
        self.adapter_enabled = True
        self._unmerged_weight: Tensor | None = None
        if freeze_base:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (as nn.Linear and HF peft initialise it); B: zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype | None = torch.float32,
        freeze_base: bool = True,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, reusing its weight and bias tensors (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        return cls._wrap(linear, linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, use_rslora=use_rslora, adapter_dtype=adapter_dtype,
                         freeze_base=freeze_base)

    @classmethod
    def _wrap(cls, base: nn.Module, in_features: int, out_features: int, **lora_kwargs):
        """A new instance holding `base`'s own weight and bias Parameters (no copy), in `base`'s mode."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = base.weight
        self.bias = base.bias
        self._init_lora(**lora_kwargs)
        self.train(base.training)
        return self

    # ------------------------------------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """s · B A in fp32 (or the adapter dtype if wider), the update merge() adds to W."""
        dt = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the adapter into W. With ``keep_original`` a copy of W is kept so unmerge() is exact."""
        if self.merged:
            return
        if keep_original:
            self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_((self.weight.to(torch.float32) + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._unmerged_weight is not None:
            self.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None
        else:
            self.weight.copy_((self.weight.to(torch.float32) - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def base_weight(self) -> Tensor:
        """W as [out_features, in_features] (subclasses that store it transposed return a view)."""
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.base_weight(), self.bias
        if torch.is_autocast_enabled(x.device.type):
            # Custom ops are not autocast: do what autocast does for F.linear (activation and weight in
            # the autocast dtype); the fp32 adapter weights are cast inside the op.
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        if self.merged and not self.adapter_enabled:
            self.unmerge()  # a disabled adapter must not stay folded into W (as peft unmerges on disable)
            weight = self.base_weight().to(weight.dtype)
        if self.merged or not self.adapter_enabled:
            return F.linear(x, weight, bias)
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling, p)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}"
            + (", use_rslora=True" if self.use_rslora else "")
            + (", merged=True" if self.merged else "")
        )
