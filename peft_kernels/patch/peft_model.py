"""``patch_peft_model``: serve an existing HF peft model's LoRA layers with the fused op, in place.

It keeps the ``PeftModel`` exactly as it is (modules, Parameter objects, state_dict keys) and only changes
the class of each servable ``peft.tuners.lora.layer.Linear`` to a subclass whose ``forward`` runs
``peft_kernels.lora_linear`` and falls back to peft's own forward for any state it does not serve (merged,
adapters disabled, several active adapters, mixed-batch ``adapter_names``, DoRA and other variants, ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from peft_kernels.ops.lora import lora_linear
from peft_kernels.patch._targets import linear_kind, why_not_linear
from peft_kernels.patch.lora_model import unwrap as _unwrap


@dataclass
class PeftPatchReport:
    """What :func:`patch_peft_model` did: the LoRA layers now served by the fused op, and the ones left to
    peft with the reason (module name -> reason)."""

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    method: str = "LORA"  # the peft type served: LORA, PREFIX_TUNING, PROMPT_TUNING or P_TUNING
    biases: list[str] = field(default_factory=list)  # layers whose trainable bias now runs the fused BitFit op

    def __str__(self) -> str:
        if self.method != "LORA":
            return f"patch_peft_model: the {self.method} adapter runs through the fused op"
        lines = [f"patch_peft_model: {len(self.patched)} LoRA layers fused, {len(self.skipped)} left to peft"]
        if self.biases:
            lines.append(f"  {len(self.biases)} trainable biases outside the LoRA layers fused (bias=...)")
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)




def _has_hooks(m: nn.Module) -> bool:
    # accelerate's offload hooks replace ``forward`` on the instance; plain hooks live in these dicts (read from
    # the instance dict: this runs on every call of a patched layer).
    d = m.__dict__
    get = d.get
    return bool("forward" in d or get("_forward_hooks") or get("_forward_pre_hooks") or get("_backward_hooks")
                or get("_backward_pre_hooks"))


def _base_kind(base: nn.Module) -> str | None:
    return None if _has_hooks(base) else linear_kind(base)


def _base_reason(base: nn.Module) -> str | None:
    if _base_kind(base) is not None:
        return None
    if _has_hooks(base):
        return f"base layer {type(base).__name__} has hooks or an overridden forward (e.g. accelerate offload)"
    return f"base layer is {why_not_linear(base)}"


def _adapter_reason(layer: nn.Module, name: str) -> str | None:
    """Why the fused op cannot compute adapter ``name`` of a peft lora.Linear, or None when it can. Submodules
    are read from ``_modules`` (not nn.Module.__getattr__): this runs on every call of a patched layer."""
    modules = layer._modules
    A = modules["lora_A"]._modules.get(name)
    if A is None:
        return f"adapter {name!r} has no LoRA weights on this layer"
    magnitude = modules.get("lora_magnitude_vector")
    if layer.use_dora.get(name, False) or (magnitude is not None and name in magnitude._modules):
        return f"adapter {name!r} uses DoRA (use_dora=True)"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return f"adapter {name!r} is a LoRA variant ({type(variant).__name__})"
    B, drop = modules["lora_B"]._modules[name], modules["lora_dropout"]._modules[name]
    if layer.lora_bias.get(name, False) or B._parameters.get("bias") is not None:  # nn.Linear keeps it there
        return f"adapter {name!r} has lora_bias=True"
    if type(A) is not nn.Linear or type(B) is not nn.Linear or _has_hooks(A) or _has_hooks(B):
        return f"adapter {name!r} has custom or hooked lora_A / lora_B modules"
    if type(drop) not in (nn.Dropout, nn.Identity) or _has_hooks(drop):
        return f"adapter {name!r} has lora_dropout {type(drop).__name__} (only nn.Dropout / nn.Identity)"
    return None


def _layer_reason(layer: nn.Module) -> str | None:
    """Why a peft lora.Linear cannot be fused in its current configuration (static checks)."""
    if "forward" in layer.__dict__:
        return "the layer's forward is already overridden on the instance"
    reason = _base_reason(layer.base_layer)
    if reason is not None:
        return reason
    active = layer.active_adapters
    if len(active) != 1:
        return f"{len(active)} active adapters {list(active)} (the fused path serves one)"
    return _adapter_reason(layer, active[0])


def _fused_args(layer: nn.Module, x: Tensor, args: tuple, kwargs: dict):
    """The op's arguments when the fused path serves this call, else None (peft's own forward runs).

    Re-checked on every call: the layer's state can change after patching (merge, disable_adapter(),
    set_adapter, mixed-batch ``adapter_names`` passed by peft's hooks, a DoRA adapter added, ...). Submodules
    are read from ``_modules``: nn.Module.__getattr__ would be most of this function's time.
    """
    if args or (kwargs and any(v is not None for v in kwargs.values())):
        return None
    if layer.disable_adapters or layer.merged_adapters:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    modules = layer._modules
    base = modules["base_layer"]
    kind = _base_kind(base)
    if kind is None or _adapter_reason(layer, name) is not None:
        return None
    params = base._parameters
    weight = params["weight"] if kind == "linear" else params["weight"].t()
    A = modules["lora_A"]._modules[name]._parameters["weight"]
    B = modules["lora_B"]._modules[name]._parameters["weight"]
    # Under autocast lora_linear casts x, W and b itself (as autocast does for F.linear).
    if x.dtype != weight.dtype and not (torch.is_autocast_enabled(x.device.type) and x.is_floating_point()
                                        and weight.is_floating_point()):
        return None
    if not (x.device == weight.device == A.device == B.device):
        return None
    drop = modules["lora_dropout"]._modules[name]
    p = drop.p if drop.training and isinstance(drop, nn.Dropout) else 0.0
    return x, weight, params.get("bias"), A, B, layer.scaling[name], p


def _peft_lora_classes():
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except ImportError as exc:
        raise ImportError("patch_peft_model needs HF peft (`pip install peft`)") from exc
    return Linear, LoraLayer


@functools.cache
def _fused_class() -> type:
    """A subclass of peft's lora.Linear whose forward runs the fused op (created once, on first use)."""
    PeftLinear, _ = _peft_lora_classes()

    class FusedPeftLoraLinear(PeftLinear):
        """peft's ``lora.Linear`` with its forward served by ``peft_kernels.lora_linear`` when possible."""

        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            call = _fused_args(self, x, args, kwargs)
            if call is None:
                return super().forward(x, *args, **kwargs)
            return lora_linear(*call)

    # Importable by name (module __getattr__ below), so pickling a patched model works.
    FusedPeftLoraLinear.__module__ = __name__
    FusedPeftLoraLinear.__qualname__ = "FusedPeftLoraLinear"
    return FusedPeftLoraLinear


def __getattr__(name: str):
    if name == "FusedPeftLoraLinear":
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch_peft_model(peft_model: nn.Module) -> PeftPatchReport:
    """Serve an existing HF peft model with the fused ops, in place, whatever its method: LoRA (below),
    Prefix-Tuning / P-Tuning v2 (:func:`~peft_kernels.patch.prefix.patch_peft_prefix_model`), Prompt Tuning and
    P-Tuning (:func:`~peft_kernels.patch.prompt.patch_peft_prompt_model`); a LoRA config with ``bias="all"`` /
    ``"lora_only"`` also gets its other trainable biases on the fused BitFit layers. The report says which.

    LoRA: the HF peft LoRA ``Linear`` layers of ``peft_model`` are served by the fused op.

    Nothing is replaced: each servable ``peft.tuners.lora.layer.Linear`` gets a subclass (``__class__`` swap)
    whose forward calls ``peft_kernels.lora_linear`` for the active adapter and falls back to peft's forward
    for any state it does not serve. Parameters, module names, state_dict keys, ``save_pretrained``,
    ``merge_and_unload`` and optimizers already built are unaffected. Layers that cannot be served (DoRA and
    other variants, lora_bias, quantized / hooked base layers, several active adapters, other LoRA layer
    types) are left to peft and listed in the report. Idempotent: call it again after changing adapters.
    """
    method = _active_peft_type(peft_model)
    if method == "PREFIX_TUNING":
        from peft_kernels.patch.prefix import patch_peft_prefix_model

        if not getattr(peft_model, "_peft_kernels_prefix_patched", False):  # idempotent, as for the others
            patch_peft_prefix_model(peft_model)
        return PeftPatchReport(method=method)
    if method in ("PROMPT_TUNING", "P_TUNING"):
        from peft_kernels.patch.prompt import patch_peft_prompt_model

        patch_peft_prompt_model(peft_model)
        return PeftPatchReport(method=method)
    PeftLinear, LoraLayer = _peft_lora_classes()
    fused = _fused_class()
    report = PeftPatchReport()
    for name, m in _unwrap(peft_model).named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if type(m) not in (PeftLinear, fused):
            report.skipped[name] = f"{type(m).__module__}.{type(m).__name__} is not served (only lora.Linear)"
            continue
        reason = _layer_reason(m)
        if reason is None:
            m.__class__ = fused
            report.patched.append(name)
        else:
            m.__class__ = PeftLinear
            report.skipped[name] = reason
    if not report.patched and not report.skipped:
        raise ValueError(f"patch_peft_model: {type(peft_model).__name__} has no HF peft LoRA layers")
    if getattr(getattr(peft_model, "active_peft_config", None), "bias", "none") != "none":
        from peft_kernels.patch.bitfit import patch_trainable_biases

        report.biases = patch_trainable_biases(peft_model)  # bias="all" / "lora_only": the fused BitFit layers
    return report


def _active_peft_type(peft_model: nn.Module) -> str:
    config = getattr(peft_model, "active_peft_config", None)
    peft_type = getattr(config, "peft_type", "LORA")
    return str(getattr(peft_type, "value", peft_type))


def unpatch_peft_model(peft_model: nn.Module) -> list[str]:
    """Give every layer patched by :func:`patch_peft_model` back its peft forward; returns their names."""
    method = _active_peft_type(peft_model)
    if method == "PREFIX_TUNING" and peft_model.__dict__.get("_peft_kernels_prefix_patched"):
        from peft_kernels.patch.prefix import unpatch_peft_prefix_model

        unpatch_peft_prefix_model(peft_model)
        return ["<prefix tuning>"]
    if method in ("PROMPT_TUNING", "P_TUNING"):
        from peft_kernels.patch.prompt import unpatch_peft_prompt_model

        unpatch_peft_prompt_model(peft_model)
        return [f"<{method.lower()}>"]
    from peft_kernels.patch.bitfit import unpatch_trainable_biases

    biases = unpatch_trainable_biases(peft_model)
    if _fused_class.cache_info().currsize == 0:  # never patched a LoRA layer
        return biases
    PeftLinear, _ = _peft_lora_classes()
    fused = _fused_class()
    names = []
    for name, m in _unwrap(peft_model).named_modules():
        if type(m) is fused:
            m.__class__ = PeftLinear
            names.append(name)
    return names + biases
