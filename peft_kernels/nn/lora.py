"""``LoRALinear``: a drop-in ``nn.Linear`` with a fused low-rank adapter (or several named ones)."""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peft_kernels.ops.lora import lora_linear

DEFAULT_ADAPTER = "default"  # peft's name for the first adapter


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


# --------------------------------------------------------------------------------------------------
# Argument checks: the one place for LoRALinear, apply_lora, add_adapter and load_lora
# --------------------------------------------------------------------------------------------------
def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a positive int, got {value!r}")
    if not isinstance(value, numbers.Integral) or value < 1:  # 2.5, 0, -1: a number, the wrong value
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


def _real(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    return float(value)


def _bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")
    return value


def check_lora_hparams(owner: str, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype):
    """Validated ``(r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)``; TypeError / ValueError naming
    ``owner`` and the argument."""
    r = _positive_int(owner, "r", r)
    lora_alpha = _real(owner, "lora_alpha", lora_alpha)
    if not math.isfinite(lora_alpha):
        raise ValueError(f"{owner}: lora_alpha must be finite, got {lora_alpha!r}")
    lora_dropout = _real(owner, "lora_dropout", lora_dropout)
    if not 0.0 <= lora_dropout < 1.0:  # also refuses NaN
        raise ValueError(f"{owner}: lora_dropout must be in [0, 1), got {lora_dropout!r}")
    use_rslora = _bool(owner, "use_rslora", use_rslora)
    check_float_dtype(owner, "adapter_dtype", adapter_dtype)
    return r, lora_alpha, lora_dropout, use_rslora, adapter_dtype


def check_float_dtype(owner: str, name: str, dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{owner}: {name} must be a floating torch.dtype or None, got {dtype!r}")


def check_base_weight(owner: str, base: nn.Module) -> None:
    w = getattr(base, "weight", None)
    if not isinstance(w, Tensor) or not w.is_floating_point() or w.numel() == 0:
        what = ("no weight tensor" if not isinstance(w, Tensor)
                else f"a weight of dtype {w.dtype}, shape {tuple(w.shape)}")
        raise ValueError(f"{owner}: {type(base).__name__} has {what}; LoRA needs a non-empty floating weight")


def checked_wrap_args(owner: str, base: nn.Module, r=8, lora_alpha=8.0, lora_dropout=0.0, use_rslora=False,
                      adapter_dtype=torch.float32, freeze_base=True) -> tuple[tuple, bool]:
    """from_linear's / from_conv1d's keyword arguments checked: ``(hparams, freeze_base)``."""
    hp = check_lora_hparams(owner, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)
    check_base_weight(owner, base)
    return hp, _bool(owner, "freeze_base", freeze_base)


def check_adapter_name(owner: str, name) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{owner}: adapter_name must be a non-empty str without '.', got {name!r}")
    return name


class LoRAWeights(nn.Module):
    """One named adapter beyond a LoRALinear's first: its A, B and hyperparameters."""

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float,
                 use_rslora: bool, device, dtype) -> None:
        super().__init__()
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, lora_dropout, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)


class LoRALinear(nn.Linear):
    """``y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`` with W (and b) frozen and A, B trainable.

    Same constructor, attributes (``weight``, ``bias``, ``in_features``, ``out_features``) and forward as
    ``nn.Linear``, plus ``r``, ``lora_alpha``, ``lora_dropout`` and ``use_rslora`` (s = alpha / r, or
    alpha / sqrt(r)). A and B are kept in fp32 by default (``adapter_dtype``) as master weights, like HF
    peft; the math runs in the activation dtype. B starts at zero, so a new adapter changes nothing.

    Several named adapters: the first (``adapter_name``, "default") is ``lora_A`` / ``lora_B``; more are added
    with :meth:`add_adapter` (kept in ``lora_adapters``) and chosen with :meth:`set_adapter`. One adapter is
    active at a time; ``adapter_enabled = False`` gives the base layer.
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
        owner = "LoRALinear"
        in_features = _positive_int(owner, "in_features", in_features)
        out_features = _positive_int(owner, "out_features", out_features)
        _bool(owner, "bias", bias)
        check_float_dtype(owner, "dtype", dtype)
        hp = check_lora_hparams(owner, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)
        _bool(owner, "freeze_base", freeze_base)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(*hp, freeze_base)

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, freeze_base) -> None:
        # Arguments already checked by the public caller (the constructor, from_linear, apply_lora).
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, lora_dropout
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, self.lora_alpha, use_rslora)
        kw = {"device": self.weight.device, "dtype": adapter_dtype or self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.reset_lora_parameters()
        self.merged = False
        self.adapter_enabled = True
        self.adapter_name = DEFAULT_ADAPTER
        self.active_adapter = DEFAULT_ADAPTER
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
        owner = "LoRALinear.from_linear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{owner}: expected an nn.Linear, got {type(linear).__name__}")
        hp, freeze_base = checked_wrap_args(owner, linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                            use_rslora=use_rslora, adapter_dtype=adapter_dtype, freeze_base=freeze_base)
        return cls._wrap(linear, linear.in_features, linear.out_features, hp, freeze_base)

    @classmethod
    def _wrap(cls, base: nn.Module, in_features: int, out_features: int, hp: tuple, freeze_base: bool):
        """A new instance holding `base`'s own weight and bias Parameters (no copy), in `base`'s mode. The
        arguments were checked by the public caller (from_linear, from_conv1d, apply_lora): ``hp`` is
        check_lora_hparams' result."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = base.weight
        self.bias = base.bias
        self._init_lora(*hp, freeze_base)
        self.train(base.training)
        return self

    # ------------------------------------------------------------------------------------------
    # Named adapters
    # ------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        extra = self._modules.get("lora_adapters")
        return [self.adapter_name, *(extra.keys() if extra is not None else ())]

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype: torch.dtype | None = torch.float32) -> LoRAWeights:
        """Add another adapter (not made active: see :meth:`set_adapter`)."""
        owner = "LoRALinear.add_adapter"
        check_adapter_name(owner, name)
        if name in self.adapter_names:
            raise ValueError(f"{owner}: adapter {name!r} already exists (adapters: {self.adapter_names})")
        hp = check_lora_hparams(owner, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)
        if "lora_adapters" not in self._modules:
            self.lora_adapters = nn.ModuleDict()
        w = LoRAWeights(self.in_features, self.out_features, *hp[:4], device=self.weight.device,
                        dtype=hp[4] or self.weight.dtype)
        self.lora_adapters[name] = w
        return w

    def adapter_weights(self, name: str | None = None) -> tuple[Tensor, Tensor, float, float]:
        """``(lora_A, lora_B, scaling, lora_dropout)`` of adapter ``name`` (default: the active one)."""
        name = self.active_adapter if name is None else name
        if name == self.adapter_name:
            return self.lora_A, self.lora_B, self.scaling, self.lora_dropout
        extra = self._modules.get("lora_adapters")
        if extra is None or name not in extra:
            raise ValueError(f"LoRALinear: no adapter {name!r} (adapters: {self.adapter_names})")
        w = extra[name]
        return w.lora_A, w.lora_B, w.scaling, w.lora_dropout

    def set_adapter(self, name: str) -> None:
        """Make adapter ``name`` the one the forward uses (a merged adapter is unmerged first)."""
        if name not in self.adapter_names:
            raise ValueError(f"LoRALinear.set_adapter: no adapter {name!r} (adapters: {self.adapter_names})")
        if name != self.active_adapter:
            self.unmerge()
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter other than the first (whose Parameters are ``lora_A`` / ``lora_B``)."""
        if name == self.adapter_name:
            raise ValueError(f"LoRALinear.delete_adapter: {name!r} is the layer's first adapter; remove the LoRA "
                             "layer instead (remove_lora)")
        self.adapter_weights(name)  # raises for an unknown name
        if name == self.active_adapter:
            self.set_adapter(self.adapter_name)
        del self.lora_adapters[name]

    # ------------------------------------------------------------------------------------------
    def delta_weight(self, name: str | None = None) -> Tensor:
        """s · B A of adapter ``name`` (default: the active one), in the wider of fp32, the adapter dtype and
        the base weight's dtype: the update merge() adds to W (fp64 weights merge in fp64)."""
        A, B, s, _ = self.adapter_weights(name)
        dt = torch.promote_types(torch.promote_types(A.dtype, torch.float32), self.weight.dtype)
        return (B.to(dt) @ A.to(dt)) * s

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the active adapter into W. With ``keep_original`` a copy of W is kept so unmerge() is exact."""
        if self.merged:
            return
        if keep_original:
            self._unmerged_weight = self.weight.detach().clone()
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._unmerged_weight is not None:
            self.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None
        else:
            delta = self.delta_weight()
            self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
        self.merged = False

    def base_weight(self) -> Tensor:
        """W as [out_features, in_features] (subclasses that store it transposed return a view)."""
        return self.weight

    # The layer's weight is self.weight itself (LoRAConv1D stores it transposed: base_weight() is a view).
    _weight_is_base = True

    def forward(self, x: Tensor) -> Tensor:
        d = self.__dict__
        if (type(x) is Tensor and not d["merged"] and d["adapter_enabled"] and self._weight_is_base
                and d["active_adapter"] == d["adapter_name"] and x.dim() and x.shape[-1] == d["in_features"]):
            # The steady state of a training step: plain attribute reads, then the op (which validates x).
            params = d["_parameters"]
            bias = params["bias"] if "bias" in params else d.get("bias")  # a wrapped bias-free layer: a plain None
            return lora_linear(x, params["weight"], bias, params["lora_A"], params["lora_B"], d["scaling"],
                               d["lora_dropout"] if d["training"] else 0.0)
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            what = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
            raise (ValueError if isinstance(x, Tensor) else TypeError)(
                f"{type(self).__name__}.forward: x must be a tensor [..., in_features={self.in_features}], got {what}")
        if self.merged and not self.adapter_enabled:
            self.unmerge()  # a disabled adapter must not stay folded into W (as peft unmerges on disable)
        if self.merged and self.training and torch.is_grad_enabled() and self._parameters["lora_A"].requires_grad:
            warnings.warn(f"{type(self).__name__} is merged: the forward uses W + s·BA, so lora_A / lora_B get no "
                          "gradient; call unmerge() before training", stacklevel=2)
        if self.merged or not self.adapter_enabled:
            return F.linear(x, self.base_weight(), self.bias)  # autocast applies to F.linear as usual
        if self.active_adapter == self.adapter_name:  # the first adapter, read without nn.Module.__getattr__
            params = self._parameters
            A, B, s, p = params["lora_A"], params["lora_B"], self.scaling, self.lora_dropout
        else:
            A, B, s, p = self.adapter_weights()
        # lora_linear applies autocast itself (x, W, b in the autocast dtype; the fp32 adapters stay masters).
        return lora_linear(x, self.base_weight(), self.bias, A, B, s, p if self.training else 0.0)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}"
            + (", use_rslora=True" if self.use_rslora else "")
            + (", merged=True" if self.merged else "")
        )
