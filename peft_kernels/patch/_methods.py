"""Which peft_kernels methods a model carries, the guard against combinations that do not compose, and the
trainable-parameter report shared by every method.

Each ``apply_*`` calls :func:`check_compatible` first (before touching the model) and :func:`register_method`
once it has succeeded; each ``remove_*`` calls :func:`unregister_method`. The record lives on the (unwrapped)
model as ``model.peft_kernels_methods``: ``{method: info}`` in the order applied.

Why combinations are refused: every ``apply_*`` freezes all parameters but its own, so a second method would
silently freeze the first one's trainable weights; and on an HF peft ``PeftModel`` they would wrap peft's own
adapter layers (LoRA on LoRA). Pairs known to compose are listed in ``COMPOSES``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

RECORD_ATTR = "peft_kernels_methods"

# method -> (the function that applies it, the one that removes it), for the messages.
METHODS: dict[str, tuple[str, str]] = {
    "lora": ("apply_lora", "remove_lora"),
    "prefix": ("apply_prefix_tuning", "remove_prefix"),
    "p_tuning_v2": ("apply_p_tuning_v2", "remove_prefix"),
    "p_tuning": ("apply_p_tuning", "remove_p_tuning"),
    "prompt": ("apply_prompt_tuning", "remove_prompt_tuning"),
    "adapters": ("apply_adapters", "remove_adapters"),
    "bitfit": ("apply_bitfit", "remove_bitfit"),
}

# How messages name a method.
DISPLAY = {"lora": "LoRA", "prefix": "prefix tuning", "p_tuning_v2": "P-Tuning v2", "p_tuning": "P-Tuning",
           "prompt": "prompt tuning", "adapters": "bottleneck adapters", "bitfit": "BitFit"}

# Unordered pairs of methods that may be applied to one model together, in either order: the later one keeps
# the earlier one's trainable parameters trainable. Each method adds its pairs (with a test).
COMPOSES: set[frozenset[str]] = set()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule shares the modules


def applied_methods(model: nn.Module) -> dict[str, Any]:
    """``{method: info}`` of the peft_kernels methods applied to ``model`` (a copy; empty when none)."""
    return dict(_unwrap(model).__dict__.get(RECORD_ATTR, {}))


def register_method(model: nn.Module, method: str, info: Any = None) -> None:
    """Record that ``method`` was applied to ``model`` (call it once the apply has succeeded)."""
    record = _unwrap(model).__dict__.setdefault(RECORD_ATTR, {})
    record[method] = info


def unregister_method(model: nn.Module, method: str) -> Any:
    """Forget ``method`` (call it from its ``remove_*``); returns its info, or None when it was not applied."""
    m = _unwrap(model)
    record = m.__dict__.get(RECORD_ATTR, {})
    info = record.pop(method, None)
    if not record:
        m.__dict__.pop(RECORD_ATTR, None)
    return info


def _peft_wrapper(model: nn.Module) -> str | None:
    """The HF peft class that wraps or is inside ``model`` (a PeftModel, or tuner layers injected with
    ``inject_adapter_in_model``), or None."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    if isinstance(model, PeftModel):
        return type(model).__name__
    layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return None if layer is None else type(layer).__module__ + "." + type(layer).__name__


def check_compatible(model: nn.Module, method: str, *, owner: str | None = None) -> None:
    """Raise ``ValueError`` when ``method`` cannot be applied to ``model`` as it is: the method is already
    applied, the model is an HF peft model, or it carries another method that ``method`` does not compose
    with. ``owner`` (default: the method's apply function) names the caller in the message."""
    apply_fn, _ = METHODS.get(method, (f"apply_{method}", f"remove_{method}"))
    owner = owner or apply_fn
    m = _unwrap(model)
    this = DISPLAY.get(method, method)
    peft_cls = _peft_wrapper(m)
    if peft_cls is not None:
        hint = (
            "to run its LoRA layers on the fused kernels call peft_kernels.patch_peft_model(model) instead, "
            "or call apply_lora on the base transformers model before wrapping it with peft"
            if method == "lora"
            else f"call {apply_fn} on the base transformers model instead (peft_model.get_base_model() after "
            "peft_model.unload(), or the model before get_peft_model)"
        )
        raise ValueError(f"{owner}: {type(model).__name__} is already an HF peft model ({peft_cls}); applying "
                         f"peft_kernels' {this} to it would wrap peft's own adapter layers: {hint}")
    for other in m.__dict__.get(RECORD_ATTR, {}):
        _, remove_other = METHODS.get(other, (f"apply_{other}", f"remove_{other}"))
        that = DISPLAY.get(other, other)
        if other == method:
            raise ValueError(f"{owner}: {type(m).__name__} already has {this} applied by peft_kernels; "
                             f"call {remove_other}(model) first (or load into a fresh model)")
        if frozenset((other, method)) not in COMPOSES:
            raise ValueError(
                f"{owner}: {type(m).__name__} already has {that} applied by peft_kernels, and {this} does not "
                f"compose with it (each freezes all parameters but its own, so the {that} weights would stop "
                f"training); call {remove_other}(model) first, or use one method per model"
            )


def check_removable(model: nn.Module, method: str, *, owner: str | None = None) -> None:
    """Raise ``ValueError`` when a method applied after ``method`` is still on ``model``: each ``remove_*`` puts
    back the ``requires_grad`` flags (and modules) as they were before its own apply, so removing out of order
    would undo the later method's state under it (LoRA removed before BitFit left every parameter frozen)."""
    record = list(_unwrap(model).__dict__.get(RECORD_ATTR, {}))  # in the order applied
    if method not in record:
        return
    later = record[record.index(method) + 1:]
    if later:
        _, remove_this = METHODS.get(method, (f"apply_{method}", f"remove_{method}"))
        names = ", ".join(f"{METHODS.get(o, ('', f'remove_{o}'))[1]}(model)" for o in reversed(later))
        raise ValueError(f"{owner or remove_this}: {', '.join(DISPLAY.get(o, o) for o in later)} was applied after "
                         f"{DISPLAY.get(method, method)}; remove in the reverse order: {names} first")


def flags_under_later_methods(model: nn.Module, method: str, before: dict[str, bool]) -> dict[str, bool]:
    """The requires_grad flags ``remove_<method>`` restores: its snapshot ``before`` -- or, while methods applied
    after it stay on (LoRA merged or removed under BitFit), none: the flags are the later method's to keep, and
    each later method's own snapshot takes ``before``, so removing it afterwards gives the flags from before both.
    (Restoring ``before`` under BitFit froze its biases, and remove_bitfit then left every parameter frozen.) A
    later method that keeps no such snapshot is refused as :func:`check_removable` does."""
    record = _unwrap(model).__dict__.get(RECORD_ATTR, {})
    order = list(record)
    later = order[order.index(method) + 1:] if method in order else []
    if not later:
        return dict(before)
    snapshots = [getattr(record[o], "original_requires_grad", None) for o in later]
    if any(not isinstance(s, dict) for s in snapshots):
        check_removable(model, method)
    for snap in snapshots:
        snap.update({n: v for n, v in before.items() if n in snap})
    return {}


# --------------------------------------------------------------------------------------------------
# Trainable-parameter report (peft's print_trainable_parameters)
# --------------------------------------------------------------------------------------------------
class TrainableParameters(NamedTuple):
    """Trainable and total parameter counts of a model (shared Parameters counted once)."""

    trainable: int
    total: int

    @property
    def share(self) -> float:
        """The trainable fraction, in [0, 1]."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # peft's wording, so logs read the same
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {100 * self.share:.4f}")


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Count the trainable and all parameters of ``model`` (as peft's ``get_nb_trainable_parameters``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"trainable_parameters: model must be an nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for p in model.parameters():  # deduplicated: tied embeddings count once
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return TrainableParameters(trainable, total)


def print_trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Print ``trainable params: … || all params: … || trainable%: …`` (peft's line) and return the counts."""
    counts = trainable_parameters(model)
    print(counts)
    return counts


_HEAD_NAMES = ("classifier", "score")  # transformers' sequence-classification heads


def resolve_train_modules(model: nn.Module, train_modules, who: str = "") -> list[str]:
    """The submodule names ``train_modules`` selects (exact names or name suffixes); None: a
    sequence-classification head, which starts random and so trains, as in HF peft."""
    if train_modules is None:
        if type(model).__name__.endswith("ForSequenceClassification"):
            return [n for n in _HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)][:1]
        return []
    if isinstance(train_modules, str):
        train_modules = [train_modules]
    names: list[str] = []
    for t in train_modules:
        hits = [n for n, _ in model.named_modules() if n and (n == t or n.endswith("." + t))]
        if not hits:
            prefix = f"{who}: " if who else ""
            raise ValueError(f"{prefix}train_modules: {type(model).__name__} has no submodule named {t!r}")
        names.extend(h for h in hits if h not in names)
    return names
