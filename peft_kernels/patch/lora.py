"""LoRA for ``transformers`` models: ``apply_lora`` / ``remove_lora``, patching HF peft models in place, and
saving / loading in HF peft's adapter format.

Two ways in:

* ``apply_lora(model, ...)`` swaps the targeted ``nn.Linear`` (and GPT-2 ``Conv1D``) modules for
  :class:`~peft_kernels.nn.LoRALinear` (:class:`LoRAConv1D` for Conv1D), reusing the base weight tensors.
  ``save_lora`` / ``load_lora`` read and write peft's ``adapter_config.json`` + ``adapter_model.safetensors``,
  so ``PeftModel.from_pretrained`` loads what we save and ``load_lora`` loads what peft saves.
* ``patch_peft_model(peft_model)`` keeps an existing ``PeftModel`` exactly as it is (modules, Parameter
  objects, state_dict keys) and only changes the class of each servable ``peft.tuners.lora.layer.Linear`` to a
  subclass whose ``forward`` runs ``peft_kernels.lora_linear`` and falls back to peft's own forward for any
  state it does not serve (merged, adapters disabled, several active adapters, mixed-batch ``adapter_names``,
  DoRA and other variants, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from peft_kernels.nn.lora import LoRALinear
from peft_kernels.ops.lora import lora_linear
from peft_kernels.patch._targets import (
    ALL_LINEAR,
    Conv1D,
    is_conv1d,
    normalize_targets,
    resolve_targets,
    set_module,
)

BIAS_MODES = ("none", "all", "lora_only")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------------
# GPT-2's Conv1D
# --------------------------------------------------------------------------------------------------
class LoRAConv1D(LoRALinear):
    """LoRA on a GPT-2 ``Conv1D`` (``y = x W + b`` with W stored ``[in, out]``).

    Keeps the Conv1D's own ``weight`` Parameter in its ``[in, out]`` layout, so the base model's state_dict
    shapes and checkpoints are unchanged, and hands the op ``weight.t()``, a view (no copy). ``lora_A`` /
    ``lora_B`` have LoRALinear's (and peft's) ``[r, in]`` / ``[out, r]`` shapes. Note that, as a LoRALinear,
    it is an ``nn.Linear`` subclass whose weight is transposed: use its ``nf`` / ``nx`` / ``fan_in_fan_out``
    rather than assuming ``weight.shape == (out, in)``.
    """

    fan_in_fan_out = True

    @classmethod
    def from_conv1d(cls, conv: nn.Module, **lora_kwargs) -> LoRAConv1D:
        """Wrap a GPT-2 Conv1D, reusing its Parameters; takes LoRALinear.from_linear's keyword arguments."""
        if not is_conv1d(conv):
            raise TypeError(f"LoRAConv1D.from_conv1d: expected a transformers Conv1D, got {type(conv).__name__}")
        return cls._wrap(conv, conv.nx, conv.nf, **lora_kwargs)

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    def delta_weight(self) -> Tensor:
        # merge()/unmerge() add this to the stored weight, which is [in, out] here.
        return super().delta_weight().t()

    def base_weight(self) -> Tensor:
        return self.weight.t()  # a view: the op reads it with its strides

    def to_conv1d(self) -> nn.Module:
        """A plain Conv1D around the same weight and bias Parameters (merge or unmerge first)."""
        conv = Conv1D.__new__(Conv1D)
        nn.Module.__init__(conv)
        conv.nf, conv.nx = self.out_features, self.in_features
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv


def _to_plain(module: LoRALinear) -> nn.Module:
    if isinstance(module, LoRAConv1D):
        return module.to_conv1d()
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = module.in_features, module.out_features
    linear.weight, linear.bias = module.weight, module.bias
    linear.train(module.training)
    return linear


# --------------------------------------------------------------------------------------------------
# apply_lora / remove_lora
# --------------------------------------------------------------------------------------------------
@dataclass
class LoraApplyConfig:
    """What ``apply_lora`` did, recorded on the model as ``model.peft_kernels_lora_config`` (save_lora uses it).

    ``target_modules`` / ``exclude_modules`` are in the form peft should see: as given for a name list or a
    regex (peft matches them the same way), and for ``"all-linear"`` the resolved qualified names (what peft
    itself writes to adapter_config.json). ``modules`` lists the replaced modules.
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
    # requires_grad of every parameter before apply_lora, and the replaced module objects (they share their
    # weight Parameters with the LoRA layers): remove_lora puts both back.
    original_requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)
    original_modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("original")}


def _check_lora_args(owner, r, lora_alpha, lora_dropout, bias, use_rslora, adapter_dtype) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{owner}: r must be a positive int, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"{owner}: lora_alpha must be a finite number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"{owner}: lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
    if bias not in BIAS_MODES:
        raise ValueError(f"{owner}: bias must be one of {BIAS_MODES} (as in peft.LoraConfig), got {bias!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"{owner}: use_rslora must be a bool, got {use_rslora!r}")
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
        raise TypeError(f"{owner}: adapter_dtype must be a floating torch.dtype or None, got {adapter_dtype!r}")


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule shares the modules


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
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` / ``Conv1D`` modules of ``model`` with fused LoRA layers, in place.

    Args mirror ``peft.LoraConfig``: ``target_modules`` is a list of names (a module matches when its
    qualified name equals an entry or ends with ``"." + entry``), a regex that must match the whole qualified
    name, or ``"all-linear"`` (every Linear/Conv1D except ``model.get_output_embeddings()``);
    ``exclude_modules`` takes the same forms. Every parameter other than the LoRA A/B matrices is frozen,
    except the biases that ``bias`` ("none" | "all" | "lora_only") makes trainable. Base weights are reused,
    never copied. Returns ``model``.
    """
    owner = "apply_lora"
    _check_lora_args(owner, r, lora_alpha, lora_dropout, bias, use_rslora, adapter_dtype)
    targets = normalize_targets(owner, "target_modules", target_modules)
    if targets is None:
        raise ValueError(f"{owner}: target_modules must be given (a list of names, a regex or {ALL_LINEAR!r})")
    excludes = normalize_targets(owner, "exclude_modules", exclude_modules)
    model = _unwrap(model)
    if _lora_modules(model):
        raise ValueError(f"{owner}: {type(model).__name__} already has LoRA layers; call remove_lora(model) first")

    found = resolve_targets(model, targets, excludes, owner=owner)
    for name, module in found:
        if _plain_kind(module) is None:  # e.g. a bitsandbytes Linear4bit: an nn.Linear that is not one
            raise ValueError(
                f"{owner}: target_modules={target_modules!r} selects {name!r}, a {type(module).__name__} with a "
                "custom forward or a non-float weight (quantized?); the fused layers need a plain nn.Linear / "
                "Conv1D: leave it out with exclude_modules"
            )
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    kw = dict(r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), use_rslora=use_rslora,
              adapter_dtype=adapter_dtype)
    for name, module in found:
        new = LoRAConv1D.from_conv1d(module, **kw) if is_conv1d(module) else LoRALinear.from_linear(module, **kw)
        set_module(model, name, new)

    for p in model.parameters():
        p.requires_grad_(False)
    lora_layers = _lora_modules(model)
    for _, m in lora_layers:
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    if bias == "all":  # peft's rule: every parameter named "bias"
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, m in lora_layers:
            if m.bias is not None:
                m.bias.requires_grad_(True)

    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    model.peft_kernels_lora_config = LoraApplyConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout), bias=bias, use_rslora=use_rslora,
        target_modules=sorted(n for n, _ in found) if all_linear else _as_saved(targets),
        exclude_modules=None if all_linear else _as_saved(excludes),
        adapter_dtype=None if adapter_dtype is None else str(adapter_dtype).removeprefix("torch."),
        modules=[n for n, _ in found], original_requires_grad=original, original_modules=dict(found),
    )
    return model


def _as_saved(value):
    return sorted(value) if isinstance(value, tuple) else value


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain ``nn.Linear`` / ``Conv1D`` modules back (the original objects where possible), around the
    same weight Parameters.

    ``merge=True`` folds ``s·BA`` into the weights; ``merge=False`` restores the original weights (unmerging
    first if needed). Parameters get back the ``requires_grad`` they had before ``apply_lora``. A model without
    LoRA layers is returned unchanged.
    """
    model = _unwrap(model)
    cfg = model.__dict__.pop("peft_kernels_lora_config", None)
    originals = cfg.original_modules if cfg is not None else {}
    for name, m in _lora_modules(model):
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
    if cfg is not None:
        for n, p in model.named_parameters():
            if n in cfg.original_requires_grad:
                p.requires_grad_(cfg.original_requires_grad[n])
    return model


# --------------------------------------------------------------------------------------------------
# Saving and loading in HF peft's format
# --------------------------------------------------------------------------------------------------
def _task_type(model: nn.Module) -> str | None:
    """peft's task_type for the model's class: it picks the PeftModel subclass on load. Only the LM heads,
    because peft adds ``modules_to_save`` heads for the classification task types."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # pragma: no cover
        return None

    def names(mapping):
        out = set()
        for v in mapping.values():
            out.update(v if isinstance(v, (tuple, list)) else (v,))
        return out

    cls = type(model).__name__
    if cls in names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "CAUSAL_LM"
    if cls in names(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        return "SEQ_2_SEQ_LM"
    return None


def _adapter_config_dict(model: nn.Module, cfg: LoraApplyConfig) -> dict:
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    kwargs = dict(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.bias,
        use_rslora=cfg.use_rslora, target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules,
        task_type=_task_type(model), base_model_name_or_path=name_or_path,
        # peft sets this itself for Conv1D targets (with a warning if it was not set).
        fan_in_fan_out=any(isinstance(m, LoRAConv1D) for _, m in _lora_modules(model)),
        inference_mode=True,  # what peft's save_pretrained writes
    )
    try:
        from peft import LoraConfig
    except ImportError:
        d = dict(kwargs, peft_type="LORA", init_lora_weights=True, use_dora=False, lora_bias=False,
                 modules_to_save=None, layers_to_transform=None, layers_pattern=None, rank_pattern={},
                 alpha_pattern={}, revision=None)
    else:
        d = LoraConfig(**kwargs).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def _bias_owner(model: nn.Module, param_name: str) -> tuple[str, nn.Module]:
    mod_name = param_name.rpartition(".")[0]
    return mod_name, model.get_submodule(mod_name) if mod_name else model


def _adapter_state_dict(model: nn.Module, cfg: LoraApplyConfig) -> dict[str, Tensor]:
    """Our tensors under peft's (adapter-name-free) checkpoint keys."""
    out = {}
    for name, m in _lora_modules(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B
        if cfg.bias == "lora_only" and m.bias is not None:
            out[f"{PEFT_PREFIX}{name}.base_layer.bias"] = m.bias
    if cfg.bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                mod_name, mod = _bias_owner(model, n)
                # inside a peft LoRA layer the base layer's bias lives under ".base_layer".
                key = f"{mod_name}.base_layer.bias" if isinstance(mod, LoRALinear) else n
                out[PEFT_PREFIX + key] = p
    return out


def save_lora(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in HF peft's format, so that
    ``PeftModel.from_pretrained(base_model, save_directory)`` (or :func:`load_lora`) loads the adapter."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    cfg = getattr(model, "peft_kernels_lora_config", None)
    if cfg is None or not _lora_modules(model):
        raise ValueError(
            f"save_lora: {type(model).__name__} has no LoRA applied by apply_lora/load_lora "
            "(for a peft PeftModel, use its save_pretrained)"
        )
    os.makedirs(save_directory, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in _adapter_state_dict(model, cfg).items()}
    save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        f.write(json.dumps(_adapter_config_dict(model, cfg), indent=2, sort_keys=True))


# Keys of adapter_config.json that change what the adapter computes and that load_lora cannot honour;
# they are rejected when set (truthy). Keys of neither this list nor _BENIGN_KEYS are rejected when set too.
_UNSUPPORTED_KEYS = {
    "use_dora": "DoRA", "lora_bias": "a bias on lora_B (lora_bias)", "modules_to_save": "modules_to_save",
    "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern",
    "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
    "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication", "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA", "megatron_config": "Megatron layers",
}
_BENIGN_KEYS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
    "base_model_name_or_path", "revision", "task_type", "peft_version", "inference_mode", "auto_mapping",
    "init_lora_weights", "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "corda_config", "eva_config", "lora_ga_config", "loftq_config",
}


def _check_adapter_config(d: dict, path) -> None:
    owner = f"load_lora({os.fspath(path)!r})"
    if str(d.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{owner}: peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = dict(_UNSUPPORTED_KEYS)
    try:
        from peft import LoraConfig
    except ImportError:
        pass
    else:  # the LoRA variants this peft version knows of, whatever their name
        for f in dataclasses.fields(LoraConfig):
            if f.metadata.get("is_lora_variant"):
                unsupported.setdefault(f.name, f"LoRA variant {f.name!r}")
    bad = [why for k, why in unsupported.items() if d.get(k)]
    bad += [f"unknown key {k!r}" for k, v in d.items() if v and k not in unsupported and k not in _BENIGN_KEYS]
    init = d.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in ("loftq", "mica"):
        bad.append(f"init_lora_weights={init!r} (changes the base weights or what is trained)")
    if bad:
        raise ValueError(f"{owner}: unsupported adapter config: {', '.join(bad)}")


def _read_adapter_weights(path) -> dict[str, Tensor]:
    st = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    bin_path = os.path.join(path, WEIGHTS_NAME_BIN)
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"load_lora: neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN} in {os.fspath(path)!r}")


def _model_tensor(model: nn.Module, key: str) -> Tensor | None:
    mod_name, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    t = getattr(mod, attr, None)
    return t if isinstance(t, Tensor) else None


def load_lora(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_dtype: torch.dtype | None = torch.float32,
    is_trainable: bool = True,
) -> nn.Module:
    """Apply LoRA to a plain ``model`` from an HF peft adapter directory and load its weights.

    Reads ``adapter_config.json`` (rejecting what the fused layers cannot compute: DoRA, lora_bias,
    modules_to_save, per-layer ranks, ...), calls :func:`apply_lora` with it and loads
    ``adapter_model.safetensors`` (or ``.bin``); every LoRA layer must get its A and B. With
    ``is_trainable=False`` every parameter is frozen (peft's default on load).
    """
    owner = "load_lora"
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{owner}: no {CONFIG_NAME} in {os.fspath(path)!r} (a local adapter directory)")
    with open(cfg_path) as f:
        d = json.load(f)
    _check_adapter_config(d, path)
    model = _unwrap(model)
    targets = d.get("target_modules")
    if targets is None:  # peft then uses its per-architecture default
        try:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
        except ImportError:
            DEFAULTS = {}
        targets = DEFAULTS.get(getattr(getattr(model, "config", None), "model_type", None))
        if targets is None:
            raise ValueError(f"{owner}: adapter_config.json has no target_modules and no default is known")
    apply_lora(
        model, target_modules=targets, r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8),
        lora_dropout=d.get("lora_dropout", 0.0), bias=d.get("bias", "none"), use_rslora=d.get("use_rslora", False),
        adapter_dtype=adapter_dtype, exclude_modules=d.get("exclude_modules"),
    )
    try:
        _load_adapter_weights(model, _read_adapter_weights(path), path)
    except Exception:
        remove_lora(model, merge=False)  # leave the model as it was given
        raise
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


@torch.no_grad()
def _load_adapter_weights(model: nn.Module, state: dict[str, Tensor], path) -> None:
    owner = f"load_lora({os.fspath(path)!r})"
    needed = {}
    for name, m in _lora_modules(model):
        needed[f"{name}.lora_A.weight"] = m.lora_A
        needed[f"{name}.lora_B.weight"] = m.lora_B
    unexpected, loaded = [], set()
    for key, value in state.items():
        k = key.removeprefix(PEFT_PREFIX)
        if k in needed:
            target = needed[k]
        elif k == "bias" or k.endswith(".bias"):  # bias="all" / "lora_only" checkpoints
            base_layer_suffix = ".base_layer.bias"
            if k.endswith(base_layer_suffix):
                k = k[: -len(base_layer_suffix)] + ".bias"
            target = _model_tensor(model, k)
        else:
            target = None
        if target is None:
            unexpected.append(key)
            continue
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{owner}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
        target.copy_(value)
        loaded.add(k)
    missing = sorted(set(needed) - loaded)
    if unexpected or missing:
        raise ValueError(f"{owner}: checkpoint does not fit the model: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]} ({len(missing)} missing, {len(unexpected)} unexpected)")


# --------------------------------------------------------------------------------------------------
# Patching an existing HF peft model
# --------------------------------------------------------------------------------------------------
@dataclass
class PeftPatchReport:
    """What :func:`patch_peft_model` did: the LoRA layers now served by the fused op, and the ones left to
    peft with the reason (module name -> reason)."""

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"patch_peft_model: {len(self.patched)} LoRA layers fused, {len(self.skipped)} left to peft"]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(m: nn.Module) -> bool:
    # accelerate's offload hooks replace ``forward`` on the instance; plain hooks live in these dicts.
    return "forward" in m.__dict__ or any(getattr(m, h, None) for h in _HOOK_DICTS)


def _plain_kind(module: nn.Module) -> str | None:
    """"linear" / "conv1d" when the module's forward is exactly what the op computes, else None."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        kind = "linear"
    elif is_conv1d(module) and type(module).forward is Conv1D.forward:
        kind = "conv1d"
    else:
        return None
    w = getattr(module, "weight", None)
    return kind if isinstance(w, Tensor) and w.is_floating_point() else None


def _base_kind(base: nn.Module) -> str | None:
    return None if _has_hooks(base) else _plain_kind(base)


def _base_reason(base: nn.Module) -> str | None:
    if _base_kind(base) is not None:
        return None
    if _has_hooks(base):
        return f"base layer {type(base).__name__} has hooks or an overridden forward (e.g. accelerate offload)"
    return f"base layer {type(base).__name__} is not a plain nn.Linear / Conv1D (quantized or custom)"


def _adapter_reason(layer: nn.Module, name: str) -> str | None:
    """Why the fused op cannot compute adapter ``name`` of a peft lora.Linear, or None when it can."""
    if name not in layer.lora_A:
        return f"adapter {name!r} has no LoRA weights on this layer"
    if layer.use_dora.get(name, False) or name in layer.lora_magnitude_vector:
        return f"adapter {name!r} uses DoRA (use_dora=True)"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return f"adapter {name!r} is a LoRA variant ({type(variant).__name__})"
    A, B, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if layer.lora_bias.get(name, False) or getattr(B, "bias", None) is not None:
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
    set_adapter, mixed-batch ``adapter_names`` passed by peft's hooks, a DoRA adapter added, ...).
    """
    if args or any(v is not None for v in kwargs.values()):
        return None
    if layer.disable_adapters or layer.merged_adapters:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    base = layer.base_layer
    kind = _base_kind(base)
    if kind is None or _adapter_reason(layer, name) is not None:
        return None
    weight = base.weight if kind == "linear" else base.weight.t()
    bias = base.bias
    if torch.is_autocast_enabled(x.device.type):
        # Custom ops are not autocast: cast as autocast does for F.linear (the adapters are cast in the op).
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    A, B, drop = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_dropout[name]
    if x.dtype != weight.dtype or not (x.device == weight.device == A.device == B.device):
        return None
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    return x, weight, bias, A, B, layer.scaling[name], p


_FUSED_CLASS = None


def _peft_lora_classes():
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except ImportError as exc:
        raise ImportError("patch_peft_model needs HF peft (`pip install peft`)") from exc
    return Linear, LoraLayer


def _fused_class() -> type:
    """A subclass of peft's lora.Linear whose forward runs the fused op (created once, on first use)."""
    global _FUSED_CLASS
    if _FUSED_CLASS is None:
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
        _FUSED_CLASS = FusedPeftLoraLinear
    return _FUSED_CLASS


def __getattr__(name: str):
    if name == "FusedPeftLoraLinear":
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch_peft_model(peft_model: nn.Module) -> PeftPatchReport:
    """Serve the HF peft LoRA ``Linear`` layers of ``peft_model`` with the fused op, in place.

    Nothing is replaced: each servable ``peft.tuners.lora.layer.Linear`` gets a subclass (``__class__`` swap)
    whose forward calls ``peft_kernels.lora_linear`` for the active adapter and falls back to peft's forward
    for any state it does not serve. Parameters, module names, state_dict keys, ``save_pretrained``,
    ``merge_and_unload`` and optimizers already built are unaffected. Layers that cannot be served (DoRA and
    other variants, lora_bias, quantized / hooked base layers, several active adapters, other LoRA layer
    types) are left to peft and listed in the report. Idempotent: call it again after changing adapters.
    """
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
    return report


def unpatch_peft_model(peft_model: nn.Module) -> list[str]:
    """Give every layer patched by :func:`patch_peft_model` back its peft forward; returns their names."""
    if _FUSED_CLASS is None:
        return []
    PeftLinear, _ = _peft_lora_classes()
    names = []
    for name, m in _unwrap(peft_model).named_modules():
        if type(m) is _FUSED_CLASS:
            m.__class__ = PeftLinear
            names.append(name)
    return names
