"""LoRA on a transformers model: ``apply_lora`` / ``remove_lora`` and the peft-style calls around them
(``add_lora_adapter`` and ``delete_lora_adapter`` (peft's ``add_adapter`` / ``delete_adapter``), ``set_adapter``,
``disable_adapter()``, ``merge_and_unload``, ``unload``).

``apply_lora`` swaps the targeted ``nn.Linear`` (and GPT-2 ``Conv1D``) modules for
:class:`~peft_kernels.nn.LoRALinear` (:class:`~peft_kernels.nn.LoRAConv1D` for Conv1D), reusing the base
weight tensors, and trains the ``modules_to_save`` heads whole (peft's task-type defaults: the classifier of
a sequence-classification model). It is all or nothing: every new layer is built before the model is touched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from peft_kernels.nn.lora import (
    DEFAULT_ADAPTER,
    LoRALinear,
    check_adapter_name,
    check_lora_hparams,
)
from peft_kernels.nn.lora_conv1d import LoRAConv1D
from peft_kernels.patch import _methods, lora_params
from peft_kernels.patch._targets import (
    ALL_LINEAR,
    check_regex,
    is_conv1d,
    linear_kind,
    name_matches,
    normalize_targets,
    peft_moe_targets,
    resolve_targets,
    set_module,
    why_not_linear,
)

BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# peft's PeftModelFor<Task> adds these heads to modules_to_save (peft_model.py).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}
CONFIG_ATTR = "peft_kernels_lora_config"


@dataclass
class LoraApplyConfig:
    """One adapter as ``apply_lora`` / ``add_lora_adapter`` made it; the active one is also
    ``model.peft_kernels_lora_config`` (save_lora writes it as adapter_config.json).

    ``target_modules`` / ``exclude_modules`` are in the form peft should see: as given for a name list or a
    regex (peft matches them the same way), and for ``"all-linear"`` the resolved qualified names (what peft
    itself writes to adapter_config.json). ``modules`` lists the replaced modules, ``modules_to_save`` the
    module names (as given, peft's form) whose every parameter trains, ``saved_modules`` the modules they
    matched.
    """

    r: int
    lora_alpha: float
    lora_dropout: float
    bias: str
    use_rslora: bool
    target_modules: str | list[str]
    exclude_modules: str | list[str] | None
    adapter_dtype: str | None
    modules: list[str]
    modules_to_save: list[str] | None = None
    saved_modules: list[str] = field(default_factory=list)
    task_type: str | None = None
    adapter_name: str = DEFAULT_ADAPTER
    target_parameters: list[str] | None = None
    parameters: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoraState:
    """The record of ``apply_lora`` on a model (``_methods.applied_methods(model)["lora"]``)."""

    adapters: dict[str, LoraApplyConfig]
    active: str
    # requires_grad of every parameter before apply_lora, the replaced module objects (they share their
    # weight Parameters with the LoRA layers) and untrained copies of the modules_to_save heads.
    original_requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)
    original_modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    original_heads: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    # trainable parameters of a method applied before LoRA that composes with it (_methods.COMPOSES): they stay
    # trainable.
    kept_trainable: set[str] = field(default_factory=set, repr=False)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule shares the modules


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state(model: nn.Module, owner: str) -> LoraState:
    state = _methods.applied_methods(model).get("lora")
    if state is None:
        raise ValueError(f"{owner}: {type(unwrap(model)).__name__} has no LoRA applied by apply_lora/load_lora "
                         "(for an HF peft PeftModel, use its own method)")
    return state


def _check_choice(owner: str, arg: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {arg} must be one of {choices} (as in peft.LoraConfig), got {value!r}")


def infer_task_type(model: nn.Module) -> str | None:
    """peft's task_type for a transformers model class (from the auto mappings), else None."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # pragma: no cover
        return None

    def names(mapping) -> set[str]:
        out = set()
        for v in mapping.values():
            out.update(v if isinstance(v, (tuple, list)) else (v,))
        return out

    cls = type(model).__name__
    for task, mapping in (
        ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
        ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
        ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
        ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
        ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ):
        if cls in names(getattr(auto, mapping, {})):
            return task
    return None


def _resolve_heads(owner: str, model: nn.Module, given: tuple[str, ...] | None, task_type: str | None):
    """(modules_to_save as peft writes it, the qualified names it matches): peft's suffix rule."""
    defaults = TASK_HEADS.get(task_type, ())
    if given is None and not defaults:
        return None, []
    names = list(dict.fromkeys([*(given or ()), *defaults]))
    matched = [n for n, _ in model.named_modules() if n and name_matches(n, tuple(names))]
    matched = [n for n in matched if not any(n.startswith(o + ".") for o in matched)]  # outermost only
    # peft writes its task defaults into modules_to_save ("classifier" and "score"): only one need exist.
    missing = [g for g in (given or ()) if g not in defaults and not any(name_matches(n, (g,)) for n in matched)]
    if missing:
        raise ValueError(f"{owner}: modules_to_save entries {missing} match no module of {type(model).__name__}")
    return names, matched


def apply_lora(
    model: nn.Module,
    target_modules: str | list[str] = ALL_LINEAR,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    bias: str = "none",
    use_rslora: bool = False,
    adapter_dtype: torch.dtype | None = torch.float32,
    exclude_modules: str | list[str] | None = None,
    *,
    modules_to_save: list[str] | None = None,
    task_type: str | None = "auto",
    adapter_name: str = DEFAULT_ADAPTER,
    target_parameters: list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    **other_lora_config,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` / ``Conv1D`` modules of ``model`` with fused LoRA layers, in place.

    Args mirror ``peft.LoraConfig``: ``target_modules`` is a list of names (a module matches when its
    qualified name equals an entry or ends with ``"." + entry``), a regex that must match the whole qualified
    name, or ``"all-linear"`` (every Linear/Conv1D except ``model.get_output_embeddings()``);
    ``exclude_modules`` takes the same forms. Every parameter other than the LoRA A/B matrices is frozen,
    except the biases that ``bias`` ("none" | "all" | "lora_only") makes trainable and the modules of
    ``modules_to_save``, trained whole. ``task_type`` is peft's (``"SEQ_CLS"``, ...); ``"auto"`` takes it from
    the model's class, so a sequence-classification head trains (peft's default ``modules_to_save`` for the
    task) instead of getting LoRA; ``None`` adds no head. ``target_parameters`` puts LoRA on parameters (MoE
    experts / routers, see patch/lora_params.py); on MoE models peft knows (Mixtral, Qwen2/3-MoE) the targets
    are converted as peft converts them, so ``"all-linear"`` adapts the router and the experts as in peft.
    ``rank_pattern`` / ``alpha_pattern`` give per-module ranks / alphas (peft's matching). Base weights are
    reused, never copied. Returns ``model``. All or nothing: on any error the model is unchanged.
    """
    owner = "apply_lora"
    _refuse_other_lora_config(owner, other_lora_config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    r, lora_alpha, lora_dropout, use_rslora, adapter_dtype = check_lora_hparams(
        owner, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)
    _check_choice(owner, "bias", bias, BIAS_MODES)
    check_adapter_name(owner, adapter_name)
    targets = normalize_targets(owner, "target_modules", target_modules)
    if targets is None:
        raise ValueError(f"{owner}: target_modules must be given (a list of names, a regex or {ALL_LINEAR!r})")
    excludes = normalize_targets(owner, "exclude_modules", exclude_modules)
    heads_given = normalize_targets(owner, "modules_to_save", modules_to_save)
    if isinstance(heads_given, str):
        raise TypeError(f"{owner}: modules_to_save must be a list of module names, got {modules_to_save!r}")
    rank_pattern = _check_pattern(owner, "rank_pattern", rank_pattern, int)
    alpha_pattern = _check_pattern(owner, "alpha_pattern", alpha_pattern, float)
    if isinstance(target_parameters, (list, tuple)) and not target_parameters:
        target_parameters = ()  # explicitly none: no MoE conversion either (an adapter_config.json without them)
    elif target_parameters is not None:
        target_parameters = normalize_targets(owner, "target_parameters", target_parameters)
        if isinstance(target_parameters, str):
            raise TypeError(f"{owner}: target_parameters must be a list of parameter names, got {target_parameters!r}")
    model = unwrap(model)
    if task_type == "auto":
        task_type = infer_task_type(model)
    elif task_type is not None:
        _check_choice(owner, "task_type", task_type, (*TASK_TYPES, "auto", None))
    _methods.check_compatible(model, "lora", owner=owner)
    if lora_modules(model):
        raise ValueError(f"{owner}: {type(model).__name__} already has LoRA layers; call remove_lora(model) first")

    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    if target_parameters is None:  # peft's conversion for the fused MoE layers of transformers 5
        moe = peft_moe_targets(model, targets, r, lora_alpha)
        if moe is not None:
            targets, target_parameters, moe_rank, moe_alpha = moe
            rank_pattern, alpha_pattern = {**moe_rank, **rank_pattern}, {**moe_alpha, **alpha_pattern}
            all_linear = False
    if target_parameters and lora_dropout:
        raise ValueError(f"{owner}: lora_dropout={lora_dropout} with target_parameters {list(target_parameters)}: "
                         "a dropout on the input cannot be applied to an adapted parameter (peft refuses it too)")
    heads_saved, heads = _resolve_heads(owner, model, heads_given, task_type)
    in_head = tuple(h + "." for h in heads)
    found = [] if not targets else resolve_targets(model, targets, excludes, owner=owner)
    found = [(n, m) for n, m in found
             if n not in heads and not n.startswith(in_head)]  # peft trains a saved head whole, no LoRA in it
    params = lora_params.resolve_target_parameters(owner, model, target_parameters) if target_parameters else []
    if not found and not params:
        raise ValueError(f"{owner}: target_modules={target_modules!r} only matched modules_to_save heads {heads}")
    for name, module in found:
        if linear_kind(module) is None:
            raise ValueError(f"{owner}: target_modules={target_modules!r} selects {name!r}, "
                             f"{why_not_linear(module)}; leave it out with exclude_modules")

    # Build everything first (allocations can fail): the model is touched only once nothing else can.
    def hp(key):  # (r, lora_alpha, lora_dropout, use_rslora, adapter_dtype), all checked above
        return (rank_pattern.get(pattern_key(rank_pattern, key), r),
                alpha_pattern.get(pattern_key(alpha_pattern, key), lora_alpha), lora_dropout, use_rslora,
                adapter_dtype)

    new = [(name, LoRAConv1D._wrap(m, m.nx, m.nf, hp(name), False) if is_conv1d(m) else
            LoRALinear._wrap(m, m.in_features, m.out_features, hp(name), False)) for name, m in found]
    new_params = []
    for mod, p, t in params:
        r_p, alpha_p, _, _, _ = hp(f"{mod}.{p}")
        new_params.append((mod, p, lora_params.LoRAParameter(t, r_p, alpha_p, use_rslora, adapter_dtype)))
    original_heads = {h: copy.deepcopy(model.get_submodule(h)) for h in heads}

    original = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, layer in new:
        layer.adapter_name = layer.active_adapter = adapter_name
        set_module(model, name, layer)
    for mod, p, lp in new_params:
        lora_params.attach(model.get_submodule(mod), p, lp)
    cfg = LoraApplyConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias, use_rslora=use_rslora,
        target_modules=sorted(n for n, _ in found) if all_linear else _as_saved(targets),
        exclude_modules=None if all_linear else _as_saved(excludes),
        adapter_dtype=None if adapter_dtype is None else str(adapter_dtype).removeprefix("torch."),
        modules=[n for n, _ in found], modules_to_save=heads_saved, saved_modules=heads, task_type=task_type,
        adapter_name=adapter_name, target_parameters=sorted(target_parameters) if target_parameters else None,
        parameters=[f"{mod}.{p}" for mod, p, _ in new_params], rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    kept = {n for n, g in original.items() if g} if _methods.applied_methods(model) else set()
    state = LoraState(adapters={adapter_name: cfg}, active=adapter_name, original_requires_grad=original,
                      original_modules=dict(found), original_heads=original_heads, kept_trainable=kept)
    _set_trainable(model, state)
    _methods.register_method(model, "lora", state)
    model.__dict__[CONFIG_ATTR] = cfg
    from peft_kernels.patch.lora_transformers import install_save_pretrained

    install_save_pretrained(model)
    return model


def pattern_key(pattern: dict, key: str) -> str | None:
    """peft's ``get_pattern_key``: the first pattern that matches the end of ``key`` at a name boundary."""
    for k in pattern:
        if re.match(rf"(.*\.)?({k})$", key):
            return k
    return None


def _check_pattern(owner: str, arg: str, value, kind) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{owner}: {arg} must be a dict of regex -> {kind.__name__}, got {value!r}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"{owner}: {arg} keys must be non-empty regexes, got {k!r}")
        check_regex(owner, f"{arg} key", k)
        if kind is int:
            out[k] = _positive(owner, f"{arg}[{k!r}]", v)
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), -float("inf")):
                raise ValueError(f"{owner}: {arg}[{k!r}] must be a finite number, got {v!r}")
            out[k] = float(v)
    return out


def _positive(owner: str, arg: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{owner}: {arg} must be a positive int, got {v!r}")
    return v


def _as_saved(value):
    return sorted(value) if isinstance(value, tuple) else value


def _set_trainable(model: nn.Module, state: LoraState) -> None:
    """Freeze everything but the active adapter's A/B, its biases (peft's ``bias``) and the saved heads."""
    cfg = state.adapters[state.active]
    for p in model.parameters():
        p.requires_grad_(False)
    layers = lora_modules(model)
    for _, m in layers:
        A, B, _, _ = m.adapter_weights(state.active)
        A.requires_grad_(True)
        B.requires_grad_(True)
    for _, _, lp in lora_params.lora_parameters(model):
        lp.requires_grad_(True)
    if cfg.bias == "all":  # peft's rule: every parameter named "bias"
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif cfg.bias == "lora_only":
        for _, m in layers:
            if m.bias is not None:
                m.bias.requires_grad_(True)
    for h in cfg.saved_modules:
        model.get_submodule(h).requires_grad_(True)
    if state.kept_trainable:
        for n, p in model.named_parameters():
            if n in state.kept_trainable:
                p.requires_grad_(True)


def _train_active_adapter(model: nn.Module, state: LoraState) -> None:
    """After add/set: only the active adapter's A/B train among the adapters; every other parameter keeps its
    requires_grad (biases, heads, and what a method applied after LoRA made trainable)."""
    for _, m in lora_modules(model):
        for name in m.adapter_names:
            A, B, _, _ = m.adapter_weights(name)
            A.requires_grad_(name == state.active)
            B.requires_grad_(name == state.active)


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain ``nn.Linear`` / ``Conv1D`` modules back (the original objects where possible), around the
    same weight Parameters.

    ``merge=True`` folds the active adapter's ``s·BA`` into the weights; ``merge=False`` restores the original
    weights (unmerging first if needed). Trained ``modules_to_save`` heads stay (as peft's unload keeps them).
    Parameters get back the ``requires_grad`` they had before ``apply_lora``. A model without LoRA layers is
    returned unchanged.
    """
    if not isinstance(merge, bool):
        raise TypeError(f"remove_lora: merge must be a bool, got {merge!r}")
    model = unwrap(model)
    restore = None
    state = _methods.applied_methods(model).get("lora")
    if state is not None:  # (before anything changes: a refusal leaves the model as it is)
        restore = _methods.flags_under_later_methods(model, "lora", state.original_requires_grad)
    state = _methods.unregister_method(model, "lora")
    model.__dict__.pop(CONFIG_ATTR, None)
    from peft_kernels.patch.lora_transformers import uninstall_save_pretrained

    uninstall_save_pretrained(model)
    originals = state.original_modules if state is not None else {}
    for _, owner_module in lora_params.param_owners(model):
        lora_params.detach(owner_module, merge=merge)
    for name, m in lora_modules(model):
        if merge:
            m.merge(keep_original=False)
        else:
            m.unmerge()
        m._unmerged_weight = None
        plain = originals.get(name)
        # The original module (its class, attributes, hooks) if it still holds this layer's Parameters, which
        # are updated in place by merge/unmerge; a fresh plain module otherwise (e.g. parameters reassigned).
        if plain is None or plain.weight is not m.weight or plain.bias is not m.bias:
            plain = _to_plain(m)
        plain.train(m.training)
        set_module(model, name, plain)
    if restore is not None:
        for n, p in model.named_parameters():
            if n in restore:
                p.requires_grad_(restore[n])
    return model


# LoraConfig arguments apply_lora takes at their peft defaults only (anything else changes what is computed).
_LORA_CONFIG_DEFAULTS = {"init_lora_weights": True, "use_dora": False, "lora_bias": False,
                         "layers_to_transform": None, "layers_pattern": None}
# ... and ones taken with any value: peft itself sets fan_in_fan_out per module (True for GPT-2's Conv1D, False for
# nn.Linear), as apply_lora does from the module's class.
_ACCEPTED_ANY = {"fan_in_fan_out"}


def _refuse_other_lora_config(owner: str, given: dict) -> None:
    """A peft user's LoraConfig keywords apply_lora does not serve, refused by name (not a bare TypeError)."""
    try:
        from peft import LoraConfig

        known = {f.name for f in dataclasses.fields(LoraConfig)}
    except ImportError:  # pragma: no cover - peft is optional
        known = set(_LORA_CONFIG_DEFAULTS)
    unknown = sorted(k for k in given if k not in known | _ACCEPTED_ANY and k not in _LORA_CONFIG_DEFAULTS)
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments {unknown}")
    refused = sorted(k for k, v in given.items() if k not in _ACCEPTED_ANY
                     and (k not in _LORA_CONFIG_DEFAULTS or v != _LORA_CONFIG_DEFAULTS[k]))
    if refused:
        raise ValueError(f"{owner}: LoraConfig's {', '.join(f'{k}={given[k]!r}' for k in refused)} is not supported "
                         "by apply_lora; build the model with peft (get_peft_model) and call patch_peft_model, which "
                         "fuses the layers it can serve and leaves the rest to peft")


def _to_plain(module: LoRALinear) -> nn.Module:
    if isinstance(module, LoRAConv1D):
        return module.to_conv1d()
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = module.in_features, module.out_features
    linear.weight, linear.bias = module.weight, module.bias
    linear.train(module.training)
    return linear


def merge_and_unload(model: nn.Module) -> nn.Module:
    """peft's name: fold the active adapter into the base weights and put plain layers back."""
    lora_state(model, "merge_and_unload")
    return remove_lora(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """peft's name: put the plain layers back without merging (the base model as it was)."""
    lora_state(model, "unload")
    return remove_lora(model, merge=False)


# --------------------------------------------------------------------------------------------------
# Several named adapters
# --------------------------------------------------------------------------------------------------
def add_lora_adapter(
    model: nn.Module,
    adapter_name: str,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_dtype: torch.dtype | None = torch.float32,
    *,
    bias: str | None = None,
    target_modules=None,
) -> nn.Module:
    """Add another named adapter to every LoRA layer of an ``apply_lora`` model (peft's ``add_adapter``).

    The new adapter starts as a no-op (B = 0) and is not active: :func:`set_adapter` makes it the one that
    runs and trains. All adapters of a model share its LoRA layers, ``bias`` mode and ``modules_to_save``:
    ``target_modules`` / ``bias``, when given, must select the same.
    """
    owner = "add_lora_adapter"
    state = lora_state(model, owner)
    if lora_params.param_owners(unwrap(model)):
        raise ValueError(f"{owner}: the model has LoRA on parameters (target_parameters, e.g. MoE experts); "
                         "several named adapters are served for LoRA layers only")
    check_adapter_name(owner, adapter_name)
    hp = check_lora_hparams(owner, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)
    first = state.adapters[next(iter(state.adapters))]
    if adapter_name in state.adapters:
        raise ValueError(f"{owner}: adapter {adapter_name!r} already exists (adapters: {list(state.adapters)})")
    if bias is not None and bias != first.bias:
        raise ValueError(f"{owner}: bias={bias!r} differs from the model's bias={first.bias!r}; the adapters of "
                         "one model share their biases")
    model = unwrap(model)
    layers = lora_modules(model)
    if target_modules is not None:
        check_same_layers(owner, model, normalize_targets(owner, "target_modules", target_modules), layers)
    added = []
    try:
        for _, m in layers:
            m.add_adapter(adapter_name, *hp)
            added.append(m)
    except BaseException:
        for m in added:
            m.delete_adapter(adapter_name)
        raise
    state.adapters[adapter_name] = dataclasses.replace(
        first, r=hp[0], lora_alpha=hp[1], lora_dropout=hp[2], use_rslora=hp[3],
        adapter_dtype=None if hp[4] is None else str(hp[4]).removeprefix("torch."), adapter_name=adapter_name)
    _train_active_adapter(model, state)
    return model


def check_same_layers(owner: str, model: nn.Module, targets, layers) -> None:
    """A further adapter adapts exactly the model's LoRA layers (they hold every adapter of the model)."""
    have = {n for n, _ in layers}
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return  # resolved against the LoRA layers themselves by the caller
    want = {n for n, m in model.named_modules() if n and name_matches(n, targets) and (
        isinstance(m, LoRALinear) or linear_kind(m) is not None)}
    if want != have:
        extra, missing = sorted(want - have), sorted(have - want)
        raise ValueError(f"{owner}: every adapter of one model adapts the same layers (its LoRA layers hold them "
                         f"all); target_modules={targets!r} also selects {extra[:4]} and leaves out {missing[:4]}. "
                         "Load it into a fresh model, or make the first adapter target these layers too")


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the adapter every LoRA layer runs and the only one that trains (peft's)."""
    state = lora_state(model, "set_adapter")
    if adapter_name not in state.adapters:
        raise ValueError(f"set_adapter: no adapter {adapter_name!r} (adapters: {list(state.adapters)})")
    model = unwrap(model)
    for _, m in lora_modules(model):
        m.set_adapter(adapter_name)
    state.active = adapter_name
    model.__dict__[CONFIG_ATTR] = state.adapters[adapter_name]
    _train_active_adapter(model, state)
    return model


def delete_lora_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove a named adapter other than the first (remove the first with :func:`unload`)."""
    state = lora_state(model, "delete_lora_adapter")
    if adapter_name not in state.adapters:
        raise ValueError(f"delete_lora_adapter: no adapter {adapter_name!r} (adapters: {list(state.adapters)})")
    if adapter_name == next(iter(state.adapters)):
        raise ValueError(f"delete_lora_adapter: {adapter_name!r} is the model's first adapter; call unload(model) or "
                         "remove_lora(model) to remove LoRA")
    if state.active == adapter_name:
        set_adapter(model, next(iter(state.adapters)))
    for _, m in lora_modules(unwrap(model)):
        m.delete_adapter(adapter_name)
    del state.adapters[adapter_name]
    return model


def active_adapter(model: nn.Module) -> str:
    return lora_state(model, "active_adapter").active


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapter(model):`` runs the base model: LoRA off, the untrained heads of
    ``modules_to_save`` in place of the trained ones (peft's ``disable_adapter()``)."""
    state = lora_state(model, "disable_adapter")
    model = unwrap(model)
    layers = [m for _, m in lora_modules(model)] + [lp for _, _, lp in lora_params.lora_parameters(model)]
    before = [m.adapter_enabled if isinstance(m, LoRALinear) else m.enabled for m in layers]
    trained = {h: model.get_submodule(h) for h in state.original_heads}
    try:
        for m in layers:
            setattr(m, "adapter_enabled" if isinstance(m, LoRALinear) else "enabled", False)
        for h, original in state.original_heads.items():
            set_module(model, h, original)
        yield model
    finally:
        for m, enabled in zip(layers, before):
            setattr(m, "adapter_enabled" if isinstance(m, LoRALinear) else "enabled", enabled)
        for h, head in trained.items():
            set_module(model, h, head)
