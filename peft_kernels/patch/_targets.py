"""Which modules of a model a patcher targets, with HF peft's matching rules, and swapping them in place.

Shared by the patchers so that ``target_modules`` means the same thing everywhere, and the same thing as in
``peft.LoraConfig``: a list of names matches a module whose qualified name equals an entry or ends with
``"." + entry``; a string is a regular expression that must match the whole qualified name; ``"all-linear"``
is every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

try:  # transformers is a dependency, but keep the matching usable on plain torch models without it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

ALL_LINEAR = "all-linear"
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def normalize_targets(owner: str, arg: str, value) -> str | tuple[str, ...] | None:
    """A regex / keyword string, or a tuple of names; raises naming ``arg`` on anything else."""
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value == "":
            raise ValueError(f"{owner}: {arg} must not be an empty string")
        return value
    if isinstance(value, Iterable):
        names = tuple(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{owner}: {arg} must be a non-empty list of module names, got {value!r}")
        return names
    raise TypeError(f"{owner}: {arg} must be a str (regex or {ALL_LINEAR!r}) or a list of names, got {value!r}")


def name_matches(name: str, pattern: str | tuple[str, ...]) -> bool:
    """peft's rule (``check_target_module_exists``): regex full match, or name / ``.name`` suffix match."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return name in pattern or any(name.endswith("." + p) for p in pattern)


def output_embedding_name(model: nn.Module) -> str | None:
    """Qualified name of the output head (``model.get_output_embeddings()``), which "all-linear" leaves out."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def resolve_targets(
    model: nn.Module,
    target_modules: str | tuple[str, ...],
    exclude_modules: str | tuple[str, ...] | None = None,
    *,
    owner: str,
    types: tuple[type[nn.Module], ...] = LINEAR_TYPES,
    skip_types: tuple[type[nn.Module], ...] = (),
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module that ``target_modules`` selects, in ``named_modules`` order.

    A named or regex match on a module that is not one of ``types`` raises (as peft does) rather than being
    dropped silently; nothing matched raises too. Modules of ``skip_types`` (already patched) are never
    descended into.
    """
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    head = output_embedding_name(model) if all_linear else None
    found, skipped_prefixes = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skipped_prefixes):
            continue
        if skip_types and isinstance(module, skip_types):
            skipped_prefixes.append(name + ".")
        if exclude_modules is not None and name_matches(name, exclude_modules):
            continue
        if all_linear:
            if isinstance(module, types) and name != head:
                found.append((name, module))
            continue
        if not name_matches(name, target_modules):
            continue
        if not isinstance(module, types):
            kinds = " / ".join(t.__name__ for t in types)
            raise ValueError(
                f"{owner}: target_modules={_short(target_modules)} matched {name!r} ({type(module).__name__}), "
                f"which is not a {kinds}; name the layers themselves (e.g. 'q_proj') or use a narrower regex"
            )
        found.append((name, module))
    if not found:
        sample = [n for n, m in model.named_modules() if isinstance(m, types)][:8]
        why = f" after exclude_modules={_short(exclude_modules)}" if exclude_modules is not None else ""
        raise ValueError(
            f"{owner}: target_modules={_short(target_modules)} matched no module of {type(model).__name__}{why}; "
            f"its {'/'.join(t.__name__ for t in types)} modules include {sample}"
        )
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _short(value) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 120 else text[:117] + "..."
