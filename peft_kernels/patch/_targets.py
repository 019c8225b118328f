"""Which modules of a model a patcher targets, with HF peft's matching rules, and swapping them in place.

Shared by the patchers so that ``target_modules`` means the same thing everywhere, and the same thing as in
``peft.LoraConfig``: a list of names matches a module whose qualified name equals an entry or ends with
``"." + entry``; a string is a regular expression that must match the whole qualified name; ``"all-linear"``
is every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import torch

try:  # Python >= 3.11
    from re import _constants as _sre_c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c
    import sre_parse as _sre_parse

from torch import Tensor, nn

from peft_kernels.nn.lora_conv1d import _conv1d_class, is_conv1d  # noqa: F401  (re-exported)

Conv1D = _conv1d_class()
ALL_LINEAR = "all-linear"
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)

# nn.Linear subclasses whose own forward computes exactly ``x @ W.T + b`` (so the fused op may replace it),
# by qualified class name: checked by reading their source, listed here rather than guessed at run time.
LINEAR_MAP_CLASSES = {
    "transformers.models.falcon.modeling_falcon.FalconLinear",
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _forward_is_linear_map(cls: type) -> bool:
    """The first class in the MRO that defines ``forward`` is nn.Linear (or Conv1D), or a listed subclass."""
    for klass in cls.__mro__:
        if "forward" in klass.__dict__:
            return klass is nn.Linear or klass is Conv1D or _qualname(klass) in LINEAR_MAP_CLASSES
    return False


def _class_kind(cls: type) -> str | None:
    """"linear" / "conv1d" when instances of `cls` compute a linear map the fused op does (given a float weight)."""
    conv1d = _conv1d_class()
    if conv1d is not None and issubclass(cls, conv1d):
        kind = "conv1d"
    elif issubclass(cls, nn.Linear):
        kind = "linear"
    else:
        return None
    return kind if _forward_is_linear_map(cls) else None


# Per class: read on every call of a patched peft layer (dynamo, which warns about cached functions, traces the
# plain one).
_class_kind_cached = functools.cache(_class_kind)


def linear_kind(module: nn.Module) -> str | None:
    """"linear" / "conv1d" when the module computes exactly what the fused op does, else None."""
    kind = _class_kind(type(module)) if torch.compiler.is_compiling() else _class_kind_cached(type(module))
    if kind is None:
        return None
    # From _parameters where it is one (nn.Module.__getattr__ costs more than the rest of this per-call check).
    w = module.__dict__.get("_parameters", {}).get("weight")
    if w is None:
        w = getattr(module, "weight", None)
    return kind if isinstance(w, Tensor) and w.is_floating_point() and w.dim() == 2 and w.numel() else None


def why_not_linear(module: nn.Module) -> str:
    """Why :func:`linear_kind` refuses ``module`` (the real reason, for the error message)."""
    name = type(module).__name__
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        return f"a {name} with no weight tensor (quantized or a custom layer)"
    if not w.is_floating_point():
        return f"a {name} whose weight has dtype {w.dtype} (quantized: the fused layers need a float weight)"
    if w.dim() != 2 or not w.numel():
        return f"a {name} whose weight has shape {tuple(w.shape)} (not a non-empty 2-D linear weight)"
    if type(module).__module__ == "peft_kernels.patch.bitfit":
        return (f"a {name}: BitFit was applied first. LoRA goes under BitFit: remove_bitfit(model), apply_lora, "
                "then apply_bitfit (to reload: load_lora before load_bitfit)")
    return (f"a {name} that overrides forward ({_qualname(type(module))}), so the fused op cannot stand in for "
            "it; if that forward is exactly x @ W.T + b, add the class to "
            "peft_kernels.patch._targets.LINEAR_MAP_CLASSES")


def normalize_targets(owner: str, arg: str, value) -> str | tuple[str, ...] | None:
    """A regex / keyword string, or a tuple of names; raises naming ``arg`` on anything else."""
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value == "":
            raise ValueError(f"{owner}: {arg} must not be an empty string")
        if isinstance(value, str) and value.lower() != ALL_LINEAR:
            check_regex(owner, arg, value)
        return value
    if isinstance(value, Iterable):
        names = tuple(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{owner}: {arg} must be a non-empty list of module names, got {value!r}")
        return names
    raise TypeError(f"{owner}: {arg} must be a str (regex or {ALL_LINEAR!r}) or a list of names, got {value!r}")


def name_matches(name: str, pattern: str | tuple[str, ...]) -> bool:
    """peft's rule (``check_target_module_exists``): regex full match, or name / ``.name`` suffix match.
    A regex must have passed :func:`check_regex` (normalize_targets does that)."""
    if isinstance(pattern, str):
        return _compiled(pattern).fullmatch(name) is not None
    return name in pattern or any(name.endswith("." + p) for p in pattern)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


# Python's re backtracks: a quantifier inside a quantifier ("(.*.*)*", "(a+)+") takes exponential time on a
# name that does not match, and many unbounded quantifiers in a row take a high power of the name's length.
# target_modules regexes come from adapter_config.json files too, so such patterns are refused up front; the
# patterns peft users write (".*\.(q|v)_proj", "model\.layers\.\d+\.mlp\..*") have none of these.
MAX_UNBOUNDED_QUANTIFIERS = 4


def _walk(items, depth: int, stats: dict) -> None:
    c = _sre_c
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            lo, hi, body = av
            repeats = hi > 1
            if depth > 0:  # any quantifier under a repetition (even "?"): ambiguous, backtracks exponentially
                stats["nested"] = True
            if hi == c.MAXREPEAT or hi > 64:
                stats["unbounded"] += 1
            _walk(body, depth + repeats, stats)
        elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
            stats["backref"] = True
        else:
            if op is c.BRANCH and depth > 0:  # "(a|aa)*": overlapping alternatives under a repetition
                stats["nested"] = True
            for part in av if isinstance(av, (tuple, list)) else (av,):
                if isinstance(part, _sre_parse.SubPattern):
                    _walk(part, depth, stats)
                elif isinstance(part, list) and part and isinstance(part[0], _sre_parse.SubPattern):
                    for sub in part:
                        _walk(sub, depth, stats)


def check_regex(owner: str, arg: str, pattern: str) -> None:
    """Refuse a regex that is invalid or could take super-linear time to match (see above)."""
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as exc:
        raise ValueError(f"{owner}: {arg}={_short(pattern)} is not a valid regular expression ({exc})") from exc
    stats = {"nested": False, "unbounded": 0, "backref": False}
    _walk(parsed, 0, stats)
    why = None
    if stats["nested"]:
        why = ("it repeats a group that itself contains a repetition or an alternation (e.g. '(.*.*)*', "
               "'(a+)+', '(a|aa)*')")
    elif stats["backref"]:
        why = "it uses a backreference"
    elif stats["unbounded"] > MAX_UNBOUNDED_QUANTIFIERS:
        why = f"it has {stats['unbounded']} unbounded repetitions (at most {MAX_UNBOUNDED_QUANTIFIERS})"
    if why:
        raise ValueError(f"{owner}: {arg}={_short(pattern)} is refused: {why}, which can make matching module "
                         "names take exponential time; write it without nested repetition (e.g. "
                         "'.*\\.(q|v)_proj') or pass a list of module names")


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


def peft_moe_targets(model: nn.Module, target_modules, r: int, lora_alpha: float):
    """peft's conversion of LoRA targets for the fused MoE layers of transformers 5 (Mixtral, Qwen2/3-MoE):
    ``(target_modules, target_parameters, rank_pattern, alpha_pattern)``, or None when it changes nothing (not
    an MoE model peft knows, or peft missing). Used so that ``"all-linear"`` adapts what peft's does: the
    attention Linears, the router weight and the stacked experts (gate_up_proj at twice the rank, as the two
    fused projections)."""
    if getattr(getattr(model, "config", None), "model_type", None) is None:
        return None
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return None
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha,
                     target_modules=list(target_modules) if isinstance(target_modules, tuple) else target_modules)
    try:
        convert_peft_config_for_transformers(cfg, model, conversions=None)
    except ValueError as exc:  # e.g. only one of two projections fused into gate_up_proj targeted
        raise ValueError(f"apply_lora: target_modules={_short(target_modules)}: {exc}") from exc
    if not cfg.target_parameters:
        return None
    return (tuple(sorted(cfg.target_modules or ())), tuple(sorted(cfg.target_parameters)),
            dict(cfg.rank_pattern or {}), dict(cfg.alpha_pattern or {}))


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _short(value) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 120 else text[:117] + "..."
