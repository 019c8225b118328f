"""BitFit (Ben Zaken et al. 2021): train only the bias terms of a model, on the fused bias-only kernels.

``apply_bitfit`` freezes every weight and trains the biases of the linear and norm layers it selects. The
selected layers are swapped, in place and around the same Parameters, for :class:`BitFitLinear`,
:class:`BitFitConv1D` (GPT-2), :class:`BitFitLayerNorm` and :class:`BitFitRMSNorm`, whose backward computes
dx and db together and never dW (``ops/bias_only.py``, ``ops/bias_norm.py``). LoRA layers already made by
``apply_lora`` stay as they are: their fused op computes the bias gradient in the same pass once the bias
trains. With ``add_missing_biases=True``, zero biases are added to bias-less linears (and to norms whose math
the fused norm reproduces), so a Llama-style model computes the same outputs before training.

``save_bitfit`` / ``load_bitfit`` store and restore the trained biases only (``bitfit_model.safetensors`` +
``bitfit_config.json``); ``remove_bitfit`` puts the original modules, biases and ``requires_grad`` back.
``patch_trainable_biases`` swaps in the fused layers wherever a bias trains under a frozen weight -- e.g. an
HF peft model with ``bias="all"`` / ``"lora_only"`` -- without changing what trains.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peft_kernels import _config
from peft_kernels._op import steady
from peft_kernels.nn.lora import LoRALinear
from peft_kernels.nn.lora_conv1d import LoRAConv1D
from peft_kernels.ops import bias_norm as _bias_norm
from peft_kernels.ops import bias_only as _bias_only
from peft_kernels.ops.bias_norm import bias_only_norm, bias_only_norm_reference
from peft_kernels.ops.bias_only import bias_only_linear
from peft_kernels.patch import _io, _methods, _save_pretrained
from peft_kernels.patch._targets import (
    Conv1D,
    is_conv1d,
    name_matches,
    normalize_targets,
    output_embedding_name,
    set_module,
)

__all__ = [
    "BitFitConv1D",
    "BitFitLayerNorm",
    "BitFitLinear",
    "BitFitRMSNorm",
    "apply_bitfit",
    "load_bitfit",
    "patch_trainable_biases",
    "remove_bitfit",
    "save_bitfit",
    "unpatch_trainable_biases",
]

METHOD = "bitfit"
INCLUDE_KEYWORDS = ("all", "attention", "mlp")
WEIGHTS_NAME = "bitfit_model.safetensors"
CONFIG_NAME = "bitfit_config.json"
FORMAT_VERSION = 1

# A path component naming an attention block, or a feed-forward block (BERT's FFN is "intermediate" and the
# layer's own "output"; attention's output projection lives under "attention.output").
_ATTENTION = re.compile(r"(self_)?attn|attention|self_attention|cross_attention|attn_\w+", re.IGNORECASE)
_MLP = re.compile(r"mlp|ffn|feed_forward|feedforward|intermediate|experts?|dense_h_to_4h|dense_4h_to_h|fc\d?|"
                  r"output", re.IGNORECASE)
_LORA_TYPES = (LoRALinear, LoRAConv1D)


def _weight_and_bias(m: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    # Not nn.Module.__getattr__ (a large share of a small layer's per-call host time). A bias-free layer's bias
    # may be a plain None attribute rather than a registered one.
    params = m._parameters
    bias = params["bias"] if "bias" in params else m.__dict__.get("bias")
    return params.get("weight"), bias


def _op_is_plain(x: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether the fused op would run PyTorch's own differentiable function on these tensors (CPU tensors, weight
    and bias in x's dtype, eager, no autocast, no forced backend), so a layer may call that function itself.
    Where that call fails, the layer runs the op's validation, which names the argument (then re-raises)."""
    return (isinstance(x, Tensor) and x.is_cpu and bias.dtype == x.dtype and weight.dtype == x.dtype and steady()
            and _config.dispatch_switches()[0] is None)


def _check_wrap(owner: str, base, ok: bool, what: str) -> None:
    if isinstance(base, _LORA_TYPES):
        raise TypeError(f"{owner}: base is a {type(base).__name__}; a LoRA layer computes its bias gradient in its "
                        "own fused op (apply_bitfit leaves LoRA layers as they are)")
    if not ok:
        raise TypeError(f"{owner}: base must be {what}, got {type(base).__name__}")


def _fused_enabled(weight: Tensor, bias: Tensor | None) -> bool:
    # Where the fused op has nothing to fuse (no trainable bias, a trainable weight, no autograd), the plain op
    # is at least as fast: the layers fall back to it.
    return bias is not None and bias.requires_grad and not weight.requires_grad and torch.is_grad_enabled()


class BitFitLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen-weight, trainable-bias forward/backward is :func:`bias_only_linear`."""

    @classmethod
    def wrap(cls, base: nn.Linear) -> BitFitLinear:
        _check_wrap("BitFitLinear.wrap", base, isinstance(base, nn.Linear), "an nn.Linear")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = base.in_features, base.out_features
        new.weight, new.bias = base.weight, base.bias
        new.train(base.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = _weight_and_bias(self)
        if not _fused_enabled(weight, bias):
            return F.linear(x, weight, bias)
        if _op_is_plain(x, weight, bias):  # what the op runs there: its `linear` backend, F.linear itself
            try:
                return F.linear(x, weight, bias)
            except RuntimeError:
                _bias_only.validate(x, weight, bias)
                raise
        return bias_only_linear(x, weight, bias)


_Conv1DBase = Conv1D if Conv1D is not None else nn.Module


class BitFitConv1D(_Conv1DBase):
    """GPT-2's ``Conv1D`` (weight stored [in, out]) on :func:`bias_only_linear` (it takes the ``weight.t()`` view)."""

    @classmethod
    def wrap(cls, base: nn.Module) -> BitFitConv1D:
        _check_wrap("BitFitConv1D.wrap", base, is_conv1d(base), "a transformers Conv1D")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.nf, new.nx = base.weight.shape[1], base.weight.shape[0]
        new.weight, new.bias = base.weight, base.bias
        new.train(base.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = _weight_and_bias(self)
        if _fused_enabled(weight, bias):
            if _op_is_plain(x, weight, bias):  # the op's `linear` backend: F.linear itself
                try:
                    return F.linear(x, weight.t(), bias)
                except RuntimeError:
                    _bias_only.validate(x, weight.t(), bias)
                    raise
            return bias_only_linear(x, weight.t(), bias)
        y = x.reshape(-1, x.shape[-1]) @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.weight.shape[1])


def _norm_input(x: Tensor) -> Tensor:
    # Autocast runs norms in fp32 (layer_norm is on its fp32 list); do the same.
    if not isinstance(x, Tensor):
        return x  # the op names it
    return x.float() if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64 else x


class BitFitLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` (over the last dim) whose frozen-weight, trainable-bias path is :func:`bias_only_norm`."""

    @classmethod
    def wrap(cls, base: nn.LayerNorm) -> BitFitLayerNorm:
        owner = "BitFitLayerNorm.wrap"
        _check_wrap(owner, base, isinstance(base, nn.LayerNorm), "an nn.LayerNorm")
        if len(base.normalized_shape) != 1 or base.weight is None:
            raise ValueError(f"{owner}: base must normalize over the last dim with a weight (elementwise_affine); "
                             f"got normalized_shape={tuple(base.normalized_shape)}, "
                             f"elementwise_affine={base.weight is not None}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = base.normalized_shape, base.eps, True
        new.weight, new.bias = base.weight, base.bias
        new.train(base.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = _weight_and_bias(self)
        if _fused_enabled(weight, bias):
            if _op_is_plain(x, weight, bias):  # the op's `layer_norm` backend: F.layer_norm itself
                try:
                    return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
                except RuntimeError:
                    _bias_norm.validate(x, weight, bias, False)
                    raise
            return bias_only_norm(_norm_input(x), weight, bias, self.eps, rms=False)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class BitFitRMSNorm(nn.Module):
    """RMSNorm with a bias, ``x / rms(x) * weight + bias``, standing in for an RMSNorm module (``torch.nn.RMSNorm``,
    HF's ``LlamaRMSNorm`` and its copies) whose math it was checked to reproduce."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, eps: float | None) -> None:
        super().__init__()
        owner = "BitFitRMSNorm"
        for name, t in (("weight", weight), ("bias", bias)):
            if t is None and name == "bias":
                continue
            if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_floating_point():
                got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"{owner}: {name} must be a 1-D float tensor, got {got}")
        if bias is not None and bias.shape != weight.shape:
            raise ValueError(f"{owner}: bias has shape {tuple(bias.shape)}, weight {tuple(weight.shape)}")
        if eps is not None:
            if isinstance(eps, bool) or not isinstance(eps, (int, float)):
                raise TypeError(f"{owner}: eps must be a float or None, got {type(eps).__name__}")
            if not 0.0 < eps < math.inf:
                raise ValueError(f"{owner}: eps must be finite and > 0, got {eps!r}")
            eps = float(eps)
        self.weight, self.bias, self.eps = weight, bias, eps

    @classmethod
    def wrap(cls, base: nn.Module, bias: nn.Parameter | None = None) -> BitFitRMSNorm:
        eps = _rms_eps(base)
        if isinstance(base, _LORA_TYPES) or eps == "missing" or not _param_1d(base, "weight"):
            raise TypeError(f"BitFitRMSNorm.wrap: base must be an RMSNorm module (a 1-D weight and an eps), got "
                            f"{type(base).__name__}")
        new = cls(base.weight, bias if bias is not None else getattr(base, "bias", None), eps)
        new.train(base.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        eps = self.eps if self.eps is not None else default_rms_eps(x.dtype)
        weight, bias = _weight_and_bias(self)
        if _fused_enabled(weight, bias):
            return bias_only_norm(_norm_input(x), weight, bias, eps, rms=True)
        bias = bias if bias is not None else torch.zeros_like(weight)
        return bias_only_norm_reference(x, weight, bias, eps, rms=True)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, bias={self.bias is not None}"


_BITFIT_TYPES = (BitFitLinear, BitFitConv1D, BitFitLayerNorm, BitFitRMSNorm)


# --------------------------------------------------------------------------------------------------
# Which modules carry a bias BitFit can train, and what they become
# --------------------------------------------------------------------------------------------------
def default_rms_eps(dtype: torch.dtype) -> float:
    """The eps of an RMSNorm built with ``eps=None`` (``torch.nn.RMSNorm``'s default): ATen's rms_norm takes the
    machine epsilon of the dtype it computes in, fp32 for fp16/bf16 inputs (not the half type's own, which is
    65000x larger for bf16 and changes the outputs of small activations)."""
    return torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps


def _rms_eps(m: nn.Module):
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(m, attr, None)
        if isinstance(value, (int, float)) or (attr == "eps" and value is None and isinstance(m, nn.RMSNorm)):
            return value
    return "missing"


def _param_1d(m: nn.Module, name: str) -> bool:
    t = m._parameters.get(name)
    return isinstance(t, nn.Parameter) and t.dim() == 1 and t.is_floating_point()


def _is_plain_layer_norm(m: nn.Module) -> bool:
    return (type(m) is nn.LayerNorm and m.elementwise_affine and len(m.normalized_shape) == 1
            and _param_1d(m, "weight"))


@torch.no_grad()
def _rms_math_matches(m: nn.Module) -> bool:
    """Whether an RMSNorm-like module computes x / sqrt(mean(x²) + eps) * w (+ b): checked on a random input,
    so variants with another formula (Gemma's (1 + w), a different eps placement) are not swapped."""
    eps = _rms_eps(m)
    if eps == "missing" or not _param_1d(m, "weight"):
        return False
    w = m.weight
    x = torch.randn(3, w.shape[0], device=w.device, dtype=torch.float32).to(w.dtype)
    try:
        got = m(x)
    except Exception:  # a forward that needs more than a tensor
        return False
    bias = m.bias if _param_1d(m, "bias") else torch.zeros_like(w)
    want = bias_only_norm_reference(x, w, bias, eps if eps is not None else default_rms_eps(x.dtype), rms=True)
    tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    return isinstance(got, Tensor) and got.shape == want.shape and torch.allclose(got.float(), want.float(),
                                                                                  rtol=tol, atol=tol)


def _kind(m: nn.Module) -> str | None:
    """"lora" (fused LoRA layer), "linear", "conv1d", "layer_norm", "rms_norm", "other_linear" (an nn.Linear
    subclass with its own forward: its bias trains through plain autograd) or None (no bias BitFit handles)."""
    if isinstance(m, _LORA_TYPES):
        return "lora"
    if isinstance(m, _BITFIT_TYPES):
        return "bitfit"
    if type(m) is nn.Linear:
        return "linear"
    if Conv1D is not None and type(m) is Conv1D:
        return "conv1d"
    if isinstance(m, nn.Linear) or is_conv1d(m):
        return "other_linear"
    if _is_plain_layer_norm(m):
        return "layer_norm"
    if type(m).__name__.lower().endswith("rmsnorm") and _rms_math_matches(m):
        return "rms_norm"
    return None


def _components(name: str) -> list[str]:
    return [c for c in name.split(".") if not c.isdigit()]


def _in_attention(name: str) -> bool:
    return any(_ATTENTION.fullmatch(c) for c in _components(name))


def _in_mlp(name: str) -> bool:
    return not _in_attention(name) and any(_MLP.fullmatch(c) for c in _components(name))


def _normalize_include(owner: str, include):
    if isinstance(include, str):
        if include.lower() in INCLUDE_KEYWORDS:
            return include.lower()
        raise ValueError(f"{owner}: include must be one of {INCLUDE_KEYWORDS} or a list of module names, "
                         f"got {include!r}")
    if include is None or not isinstance(include, (list, tuple, set, frozenset)):
        raise TypeError(f"{owner}: include must be one of {INCLUDE_KEYWORDS} or a list of module names, "
                        f"got {include!r}")
    return normalize_targets(owner, "include", include)


def _select(model: nn.Module, include, owner: str) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every module whose bias BitFit trains, in named_modules order."""
    found, skip = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p) for p in skip):
            continue
        kind = _kind(m)
        if kind in ("lora", "bitfit"):
            skip.append(name + ".")  # its own submodules (lora_A / lora_B) are not BitFit's
        if isinstance(include, tuple):
            if not name_matches(name, include):
                continue
            if kind is None:
                raise ValueError(f"{owner}: include={list(include)!r} matched {name!r} ({type(m).__name__}), which "
                                 "is not a linear or norm layer with a bias BitFit can train; name the layers "
                                 "themselves (e.g. 'query', 'dense', 'LayerNorm')")
        elif kind is None:
            continue
        elif include == "attention" and not _in_attention(name):
            continue
        elif include == "mlp" and not _in_mlp(name):
            continue
        found.append((name, m, kind))
    if not found:
        sample = [n for n, m in model.named_modules() if n and _kind(m) is not None][:8]
        raise ValueError(f"{owner}: include={include if isinstance(include, str) else list(include)!r} selects no "
                         f"linear or norm layer of {type(model).__name__}; its layers include {sample}")
    return found


@dataclass
class BitFitState:
    """What apply_bitfit did (``model.peft_kernels_methods["bitfit"]``), so remove/save/load can undo or redo it."""

    include: str | list[str]
    add_missing_biases: bool
    trained: list[str]  # qualified names of the parameters BitFit trains
    added: list[str]  # of those, the biases it created (zeros at apply time)
    swapped: dict[str, nn.Module] = field(default_factory=dict, repr=False)  # name -> the original module
    original_requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)
    original_biases: dict[str, Tensor] = field(default_factory=dict, repr=False)  # and the heads' parameters
    froze_everything: bool = True
    modules_to_save: list[str] | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _state(model: nn.Module, owner: str) -> BitFitState:
    state = _methods.applied_methods(model).get(METHOD)
    if not isinstance(state, BitFitState):
        raise ValueError(f"{owner}: {type(_unwrap(model)).__name__} has no BitFit applied by peft_kernels "
                         "(call apply_bitfit(model) first)")
    return state


def _new_bias(m: nn.Module, kind: str) -> nn.Parameter:
    w = m.weight
    n = getattr(m, "out_features", None) or (w.shape[1] if kind == "conv1d" else w.shape[0])
    return nn.Parameter(torch.zeros(n, dtype=w.dtype, device=w.device))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
_COMPOSES_WITH = ("lora",)  # apply_lora first, then apply_bitfit: LoRA's A/B keep training beside the biases
for _other in _COMPOSES_WITH:
    _methods.COMPOSES.add(frozenset((_other, METHOD)))


def apply_bitfit(model: nn.Module, include="all", add_missing_biases: bool = False,
                 modules_to_save: list[str] | None = None) -> nn.Module:
    """Train only the biases of ``model`` (BitFit), on the fused bias-only kernels. In place; returns ``model``.

    Args:
        include: ``"all"`` (every linear and norm bias, plus any other parameter named ``bias``),
            ``"attention"`` (layers under an attention block: q/k/v/o projections and their norms),
            ``"mlp"`` (layers under a feed-forward block), or a list of module names (peft's rule: a name
            matches a module whose qualified name equals it or ends with ``"." + name``).
        add_missing_biases: add zero-initialised biases to the selected bias-less linears (except the output
            head) and RMSNorm / LayerNorm layers, so that a model without biases (Llama) has some to train; its
            outputs are unchanged until they train.
        modules_to_save: modules trained whole beside the biases (peft's name rule), e.g. ``["classifier"]``: a
            task head on top of a pretrained model starts random, and the BitFit paper trains it. Saved and
            loaded with the biases, put back by ``remove_bitfit``. A classification / QA model given none gets
            a warning naming its head.

    Every other parameter is frozen, unless the model already carries ``apply_lora``'s layers, whose LoRA
    weights keep training (their fused op computes the bias gradient too). Use
    ``peft_kernels.print_trainable_parameters(model)`` for the count.
    """
    owner = "apply_bitfit"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(add_missing_biases, bool):
        raise TypeError(f"{owner}: add_missing_biases must be a bool, got {type(add_missing_biases).__name__}")
    include = _normalize_include(owner, include)
    model = _unwrap(model)
    _methods.check_compatible(model, METHOD, owner=owner)
    saved = _resolve_modules_to_save(owner, model, modules_to_save)
    found = [f for f in _select(model, include, owner) if not any(_under(f[0], h) for h in saved)]
    head = output_embedding_name(model)

    # Everything is decided before the model is touched.
    plan = []  # (name, module, kind, add a bias?)
    for name, m, kind in found:
        has_bias = _param_1d(m, "bias")
        add = add_missing_biases and not has_bias and name != head and kind in (
            "linear", "conv1d", "lora", "bitfit", "layer_norm", "rms_norm")
        if has_bias or add:
            plan.append((name, m, kind, add))
    if not plan:
        hint = "" if add_missing_biases else " (add_missing_biases=True adds zero biases to them)"
        raise ValueError(f"{owner}: the layers include={include if isinstance(include, str) else list(include)!r} "
                         f"selects have no biases{hint}")

    original = {n: p.requires_grad for n, p in model.named_parameters()}
    # LoRA layers' own adapter weights (apply_lora's) keep training: BitFit composes with LoRA.
    keep = {id(p) for m in model.modules() if isinstance(m, _LORA_TYPES)
            for n, p in m.named_parameters() if n not in ("weight", "bias") and p.requires_grad}
    state = BitFitState(include=include if isinstance(include, str) else list(include),
                        add_missing_biases=add_missing_biases, trained=[], added=[],
                        original_requires_grad=original, froze_everything=not keep,
                        modules_to_save=None if modules_to_save is None else list(modules_to_save))
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for name, m, kind, add in plan:
        if add:
            bias = _new_bias(m, kind)
        else:
            bias = m.bias
            state.original_biases[name + ".bias"] = bias.detach().clone()
        new = m
        if kind == "linear":
            new = BitFitLinear.wrap(m)
        elif kind == "conv1d":
            new = BitFitConv1D.wrap(m)
        elif kind == "layer_norm":
            new = BitFitLayerNorm.wrap(m)
        elif kind == "rms_norm":
            new = BitFitRMSNorm.wrap(m, bias)
        if new is not m:
            state.swapped[name] = m
            set_module(model, name, new)
        new.bias = bias  # an nn.Parameter: registered (LoRA layers and nn.Linear take a new one the same way)
        bias.requires_grad_(True)
        state.trained.append(name + ".bias")
        if add:
            state.added.append(name + ".bias")
    if include == "all":  # BitFit trains every bias: also those of layers it has no fused op for
        by_name = dict(model.named_parameters(remove_duplicate=False))
        known = {id(by_name[n]) for n in state.trained}
        for n, p in model.named_parameters():
            if (n == "bias" or n.endswith(".bias")) and id(p) not in known:
                p.requires_grad_(True)
                state.trained.append(n)
    for h in saved:  # the heads train whole; their values before are kept for remove_bitfit
        for n, p in model.get_submodule(h).named_parameters():
            qualified = f"{h}.{n}"
            state.original_biases.setdefault(qualified, p.detach().clone())
            p.requires_grad_(True)
            state.trained.append(qualified)
    state.trained = _canonical_names(model, state.trained)
    _methods.register_method(model, METHOD, state)
    _save_pretrained.install(model, METHOD)
    return model


def _under(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _resolve_modules_to_save(owner: str, model: nn.Module, modules_to_save) -> list[str]:
    """The qualified names of the modules to train whole (outermost matches, LoRA's rule for modules_to_save),
    checked before anything changes."""
    from peft_kernels.patch.lora_model import _resolve_heads, infer_task_type

    if modules_to_save is None:
        _, heads = _resolve_heads(owner, model, None, infer_task_type(model))
        if heads:
            warnings.warn(f"{owner}: {type(model).__name__}'s task head {heads[0]!r} stays frozen at its current "
                          f"(for a new head: random) values; pass modules_to_save=[{heads[0].rsplit('.', 1)[-1]!r}] "
                          "to train it, as the BitFit paper does", UserWarning, stacklevel=3)
        return []
    if isinstance(modules_to_save, str) or not isinstance(modules_to_save, (list, tuple)) or not all(
            isinstance(n, str) and n for n in modules_to_save):
        raise TypeError(f"{owner}: modules_to_save must be a list of module names, got {modules_to_save!r}")
    return _resolve_heads(owner, model, tuple(modules_to_save), None)[1]


def _canonical_names(model: nn.Module, names: list[str]) -> list[str]:
    """Each Parameter once, under the name ``named_parameters()`` gives it: a tied bias (BERT's MLM decoder bias is
    ``cls.predictions.bias``) has several module paths, and a checkpoint must hold it once, under a name a fresh
    model's ``named_parameters()`` lists."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in model.named_parameters()}
    out: list[str] = []
    for n in names:
        c = canonical[id(by_name[n])]
        if c not in out:
            out.append(c)
    return out


def remove_bitfit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_bitfit`: the original modules (same objects) and bias values back, added biases removed,
    every parameter's ``requires_grad`` as before. Save the trained biases first (:func:`save_bitfit`)."""
    owner = "remove_bitfit"
    model = _unwrap(model)
    state = _state(model, owner)
    _methods.check_removable(model, METHOD, owner=owner)
    with torch.no_grad():
        for pname, value in state.original_biases.items():
            model.get_parameter(pname).copy_(value)
    added_modules = {n.rpartition(".")[0] for n in state.added}
    for name, original in state.swapped.items():
        set_module(model, name, original)
    for mname in added_modules:
        m = model.get_submodule(mname) if mname else model
        if "bias" in m._parameters:
            m.register_parameter("bias", None)
    for n, p in model.named_parameters():
        if n in state.original_requires_grad:
            p.requires_grad_(state.original_requires_grad[n])
    _methods.unregister_method(model, METHOD)
    _save_pretrained.uninstall(model, METHOD)
    return model


def save_bitfit(model: nn.Module, path: str) -> None:
    """Write the trained biases (``bitfit_model.safetensors``, their own dtypes) and ``bitfit_config.json``
    (include, add_missing_biases, which biases were added) to the directory ``path``, atomically."""
    owner = "save_bitfit"
    model = _unwrap(model)
    state = _state(model, owner)
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach() for n in state.trained}
    config = {"peft_kernels_method": METHOD, "format_version": FORMAT_VERSION, "include": state.include,
              "add_missing_biases": state.add_missing_biases, "added": sorted(state.added),
              "trained": sorted(state.trained), "modules_to_save": state.modules_to_save}
    with _io.atomic_files(path, owner=owner) as out:
        out.save_safetensors(WEIGHTS_NAME, tensors)
        out.write_json(CONFIG_NAME, config)  # staged last: renamed last


def _check_config_fields(owner: str, path, config: dict) -> None:
    """The fields load_bitfit reads, of the types save_bitfit writes (a hand-edited or foreign file says which)."""
    def bad(key: str, want: str):
        return ValueError(f"{owner}: {path!r}: {CONFIG_NAME} field {key!r} must be {want}, got "
                          f"{config.get(key, '<missing>')!r}")

    include = config.get("include")
    if not (isinstance(include, str) or (isinstance(include, list) and all(isinstance(n, str) for n in include))):
        raise bad("include", "a str or a list of module names")
    if not isinstance(config.get("add_missing_biases"), bool):
        raise bad("add_missing_biases", "a bool")
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad("format_version", "an int")
    if config.get("modules_to_save") is not None and not (isinstance(config["modules_to_save"], list) and all(
            isinstance(n, str) for n in config["modules_to_save"])):
        raise bad("modules_to_save", "a list of module names or null")
    for key in ("trained", "added"):
        if key in config and not (isinstance(config[key], list) and all(isinstance(n, str) for n in config[key])):
            raise bad(key, "a list of parameter names")


def load_bitfit(model: nn.Module, path: str) -> nn.Module:
    """Apply BitFit as saved (unless it is applied already with the same biases) and load the trained biases.

    Everything is read and checked first (file, config, every name and shape), so a bad checkpoint changes
    nothing; a model that was not BitFit'ed is left as it was when the values do not fit."""
    owner = "load_bitfit"
    import os

    model = _unwrap(model)
    config = _io.read_json(os.path.join(path, CONFIG_NAME), owner=owner)
    if config.get("peft_kernels_method") != METHOD:
        raise ValueError(f"{owner}: {path!r} holds no BitFit checkpoint ({CONFIG_NAME} has "
                         f"peft_kernels_method={config.get('peft_kernels_method')!r})")
    _check_config_fields(owner, path, config)
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{owner}: {path!r} has format_version {config['format_version']}, newer than this "
                         f"peft_kernels reads ({FORMAT_VERSION}); upgrade peft_kernels")
    tensors = _io.load_safetensors(os.path.join(path, WEIGHTS_NAME), owner=owner)
    if set(tensors) != set(config.get("trained", tensors)):
        raise ValueError(f"{owner}: {path!r}: the weights and {CONFIG_NAME} list different biases")
    state = _methods.applied_methods(model).get(METHOD)
    applied_here = False
    if state is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the checkpoint says what trained: no advice about the head
            apply_bitfit(model, include=config["include"], add_missing_biases=bool(config["add_missing_biases"]),
                         modules_to_save=config.get("modules_to_save"))
        applied_here = True
        state = _state(model, owner)
    try:
        params = dict(model.named_parameters())
        missing = sorted(set(tensors) - set(state.trained))
        extra = sorted(set(state.trained) - set(tensors))
        if missing or extra:
            raise ValueError(f"{owner}: {path!r} does not fit this model's BitFit biases: in the checkpoint only "
                             f"{missing[:5]}, in the model only {extra[:5]}")
        for n, t in tensors.items():
            if tuple(t.shape) != tuple(params[n].shape):
                raise ValueError(f"{owner}: {path!r}: bias {n!r} has shape {tuple(t.shape)}, the model's is "
                                 f"{tuple(params[n].shape)}")
    except ValueError:
        if applied_here:
            remove_bitfit(model)
        raise
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)  # into the model's own dtype and device
    return model


def patch_trainable_biases(model: nn.Module) -> list[str]:
    """Swap plain ``nn.Linear`` / ``Conv1D`` / ``nn.LayerNorm`` modules whose bias trains under a frozen weight for
    the fused BitFit layers (same Parameters; nothing about what trains changes). For models trained by other
    means with trainable biases -- an HF peft model with ``bias="all"`` or ``"lora_only"`` after
    ``patch_peft_model``. Layers inside peft's LoRA layers are left to the fused LoRA op. Returns the names
    swapped; :func:`unpatch_trainable_biases` reverses it."""
    model = _unwrap(model)
    swapped = model.__dict__.setdefault("peft_kernels_bias_patches", {})
    names = []
    for name, m in list(model.named_modules()):
        if not name or name.endswith(".base_layer") or name in swapped:
            continue
        kind = _kind(m)
        if kind not in ("linear", "conv1d", "layer_norm") or not _param_1d(m, "bias"):
            continue
        if not (m.bias.requires_grad and not m.weight.requires_grad):
            continue
        new = {"linear": BitFitLinear, "conv1d": BitFitConv1D, "layer_norm": BitFitLayerNorm}[kind].wrap(m)
        set_module(model, name, new)
        swapped[name] = m
        names.append(name)
    return names


def unpatch_trainable_biases(model: nn.Module) -> list[str]:
    """Put back the modules :func:`patch_trainable_biases` swapped; returns their names."""
    model = _unwrap(model)
    swapped = model.__dict__.pop("peft_kernels_bias_patches", {})
    for name, original in swapped.items():
        set_module(model, name, original)
    return list(swapped)
