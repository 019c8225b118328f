"""``save_lora`` / ``load_lora``: an ``apply_lora`` adapter in HF peft's format (``adapter_config.json`` +
``adapter_model.safetensors``), so ``PeftModel.from_pretrained`` loads what we save and ``load_lora`` loads
what peft saves. Saves are atomic (patch/_io.py); loads read and check every file and tensor before the model
is touched, and leave it unchanged on any error.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor, nn

from peft_kernels.nn.lora import DEFAULT_ADAPTER, LoRALinear, check_adapter_name, check_float_dtype
from peft_kernels.nn.lora_conv1d import LoRAConv1D
from peft_kernels.patch import _io, lora_params
from peft_kernels.patch._targets import normalize_targets
from peft_kernels.patch.lora_model import (
    LoraApplyConfig,
    add_lora_adapter,
    apply_lora,
    check_same_layers,
    delete_lora_adapter,
    lora_modules,
    lora_state,
    remove_lora,
    unwrap,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def _check_path(owner: str, path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


# --------------------------------------------------------------------------------------------------
# Writing peft's format
# --------------------------------------------------------------------------------------------------
def adapter_config_dict(model: nn.Module, cfg: LoraApplyConfig) -> dict:
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    kwargs = dict(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.bias,
        use_rslora=cfg.use_rslora, target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules,
        task_type=cfg.task_type, base_model_name_or_path=name_or_path, modules_to_save=cfg.modules_to_save,
        target_parameters=cfg.target_parameters, rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern,
        # peft sets this itself for Conv1D targets (with a warning if it was not set).
        fan_in_fan_out=any(isinstance(m, LoRAConv1D) for _, m in lora_modules(model)),
        inference_mode=True,  # what peft's save_pretrained writes
    )
    try:
        from peft import LoraConfig
    except ImportError:
        d = dict(kwargs, peft_type="LORA", init_lora_weights=True, use_dora=False, lora_bias=False,
                 layers_to_transform=None, layers_pattern=None, revision=None)
    else:
        d = LoraConfig(**kwargs).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def adapter_state_dict(model: nn.Module, cfg: LoraApplyConfig) -> dict[str, Tensor]:
    """Adapter ``cfg.adapter_name``'s tensors under peft's (adapter-name-free) checkpoint keys."""
    out = {}
    for name, m in lora_modules(model):
        A, B, _, _ = m.adapter_weights(cfg.adapter_name)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
        if cfg.bias == "lora_only" and m.bias is not None:
            out[f"{PEFT_PREFIX}{name}.base_layer.bias"] = m.bias
    if cfg.bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                mod_name = n.rpartition(".")[0]
                mod = model.get_submodule(mod_name) if mod_name else model
                # inside a peft LoRA layer the base layer's bias lives under ".base_layer".
                key = f"{mod_name}.base_layer.bias" if isinstance(mod, LoRALinear) else n
                out[PEFT_PREFIX + key] = p
    prefixes = lora_params.peft_key_prefixes(model)
    for mod, p, lp in lora_params.lora_parameters(model):  # peft's nested ParamWrapper keys
        out[f"{PEFT_PREFIX}{prefixes[(mod, p)]}.lora_A.weight"] = lp.lora_A
        out[f"{PEFT_PREFIX}{prefixes[(mod, p)]}.lora_B.weight"] = lp.lora_B
    for h in cfg.saved_modules:  # peft strips "modules_to_save.<adapter>." from these keys
        for n, t in model.get_submodule(h).state_dict().items():
            out[f"{PEFT_PREFIX}{h}.{n}"] = t
    return out


def save_lora(model: nn.Module, save_directory: str | os.PathLike, *, adapter_name: str | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in HF peft's format, so that
    ``PeftModel.from_pretrained(base_model, save_directory)`` (or :func:`load_lora`) loads the adapter.

    ``adapter_name``: which adapter (default: the active one). Atomic: a save interrupted at any point leaves
    an adapter already in ``save_directory`` loadable (the weights are renamed into place before the config).
    """
    owner = "save_lora"
    path = _check_path(owner, save_directory)
    state = lora_state(model, owner)
    name = state.active if adapter_name is None else check_adapter_name(owner, adapter_name)
    if name not in state.adapters:
        raise ValueError(f"{owner}: no adapter {name!r} (adapters: {list(state.adapters)})")
    model = unwrap(model)
    if not lora_modules(model):
        raise ValueError(f"{owner}: {type(model).__name__} has no LoRA layers left (were they replaced?)")
    cfg = state.adapters[name]
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model, cfg).items()}
    with _io.atomic_files(path, owner=owner) as out:
        out.save_safetensors(WEIGHTS_NAME, tensors)
        out.write_json(CONFIG_NAME, adapter_config_dict(model, cfg))  # last: renamed after the weights


# --------------------------------------------------------------------------------------------------
# Reading peft's format
# --------------------------------------------------------------------------------------------------
# Keys of adapter_config.json that change what the adapter computes and that load_lora cannot honour;
# they are rejected when set (truthy). Keys of neither this list nor _BENIGN_KEYS are rejected when set too.
_UNSUPPORTED_KEYS = {
    "use_dora": "DoRA", "lora_bias": "a bias on lora_B (lora_bias)",
    "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication", "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA", "megatron_config": "Megatron layers",
}
_BENIGN_KEYS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
    "base_model_name_or_path", "revision", "task_type", "peft_version", "inference_mode", "auto_mapping",
    "init_lora_weights", "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "corda_config", "eva_config", "lora_ga_config", "loftq_config", "modules_to_save", "target_parameters",
    "rank_pattern", "alpha_pattern",
}


def check_adapter_config(d: dict, path: str) -> None:
    owner = f"load_lora({path!r})"
    if str(d.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{owner}: peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("target_parameters", "modules_to_save"):
        v = d.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(n, str) and n for n in v)):
            raise ValueError(f"{owner}: {key}={v!r} must be a list of names")
    for key in ("rank_pattern", "alpha_pattern"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"{owner}: {key}={d[key]!r} must be an object (regex -> value)")
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
    if isinstance(init, str) and init.lower() == "mica":
        bad.append(f"init_lora_weights={init!r} (changes what is trained)")
    elif isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        # peft re-runs these at load time: PiSSA/OLoRA/CorDA/LoftQ rewrite the base weights (W - B A of the initial
        # adapter), which loading the saved A and B alone would not reproduce (0.2-0.4 off in logits).
        bad.append(f"init_lora_weights={init!r} (peft changes the base weights when it loads such an adapter; "
                   "save it converted to plain LoRA with peft's save_pretrained(..., "
                   "path_initial_model_for_weight_conversion=...), or load it with peft and use "
                   "patch_peft_model)")
    if bad:
        raise ValueError(f"{owner}: unsupported adapter config: {', '.join(bad)}")


# init_lora_weights values (prefixes: "pissa_niter_4", "corda") under which a checkpoint's A/B alone are not the model.
_BASE_CHANGING_INITS = ("loftq", "pissa", "olora", "corda")


def _read_adapter_weights(path: str, owner: str) -> dict[str, Tensor]:
    st = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(st):
        return _io.load_safetensors(st, owner=owner)
    bin_path = os.path.join(path, WEIGHTS_NAME_BIN)
    if os.path.isfile(bin_path):
        return _io.load_torch_state(bin_path, owner=owner)
    raise FileNotFoundError(f"{owner}: neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN} in {path!r}")


def _model_tensor(model: nn.Module, key: str) -> Tensor | None:
    mod_name, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    t = getattr(mod, attr, None)
    return t if isinstance(t, Tensor) else None


def _plan_copies(model: nn.Module, cfg: LoraApplyConfig, state: dict[str, Tensor], owner: str):
    """[(target tensor, value)] for every checkpoint tensor, after checking that the checkpoint fits the model
    exactly (no key missing or unexpected, every shape right): nothing is copied unless all of it fits."""
    needed: dict[str, Tensor] = {}
    for name, m in lora_modules(model):
        A, B, _, _ = m.adapter_weights(cfg.adapter_name)
        needed[f"{name}.lora_A.weight"] = A
        needed[f"{name}.lora_B.weight"] = B
    prefixes = lora_params.peft_key_prefixes(model)
    for mod, p, lp in lora_params.lora_parameters(model):
        needed[f"{prefixes[(mod, p)]}.lora_A.weight"] = lp.lora_A
        needed[f"{prefixes[(mod, p)]}.lora_B.weight"] = lp.lora_B
    lora_names = {n for n, _ in lora_modules(model)}
    heads = tuple(h + "." for h in cfg.saved_modules)
    unexpected, plan, loaded = [], [], set()
    for key, value in state.items():
        k = key.removeprefix(PEFT_PREFIX)
        target = None
        if k in needed:
            target = needed[k]
        elif k.startswith(heads):  # a modules_to_save head: every tensor of its state_dict
            target = _model_tensor(model, k)
        elif (k == "bias" or k.endswith(".bias")) and cfg.bias != "none":
            if k.endswith(".base_layer.bias"):
                k = k[: -len(".base_layer.bias")] + ".bias"
            owner_mod = k.rpartition(".")[0]
            if cfg.bias == "all" or owner_mod in lora_names:  # "lora_only": biases of the LoRA layers only
                target = _model_tensor(model, k)
        if target is None:
            unexpected.append(key)
            continue
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{owner}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
        plan.append((target, value))
        loaded.add(k)
    missing = sorted(set(needed) - loaded)
    if unexpected or missing:
        raise ValueError(f"{owner}: checkpoint does not fit the model: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    return plan


def load_lora(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_dtype: torch.dtype | None = torch.float32,
    is_trainable: bool = True,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Apply LoRA to ``model`` from an HF peft adapter directory and load its weights.

    Reads ``adapter_config.json`` (rejecting what the fused layers cannot compute: DoRA, lora_bias,
    layers_to_transform, ...; per-module ranks and MoE ``target_parameters`` are served), calls
    :func:`apply_lora` with it (with its ``modules_to_save`` and ``task_type``) and loads
    ``adapter_model.safetensors`` (or ``.bin``); every LoRA layer must get its A and B, and nothing else may
    be in the file. On a model that already has LoRA from apply_lora/load_lora, a new ``adapter_name`` adds
    the file as another adapter (peft's ``load_adapter``). With ``is_trainable=False`` every parameter is
    frozen (peft's default on load). All or nothing: a damaged file or a checkpoint that does not fit raises
    ``ValueError`` naming the file, and the model is unchanged.
    """
    owner = "load_lora"
    path = _check_path(owner, path)
    check_float_dtype(owner, "adapter_dtype", adapter_dtype)
    if not isinstance(is_trainable, bool):
        raise TypeError(f"{owner}: is_trainable must be a bool, got {is_trainable!r}")
    check_adapter_name(owner, adapter_name)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{owner}: no {CONFIG_NAME} in {path!r} (a local adapter directory)")
    d = _io.read_json(cfg_path, owner=owner)
    check_adapter_config(d, cfg_path)
    weights = _read_adapter_weights(path, owner)  # read and checked before the model is touched
    model = unwrap(model)
    targets = d.get("target_modules")
    if targets is None:  # peft then uses its per-architecture default
        try:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
        except ImportError:
            DEFAULTS = {}
        targets = DEFAULTS.get(getattr(getattr(model, "config", None), "model_type", None))
        if targets is None:
            raise ValueError(f"{owner}: {cfg_path!r} has no target_modules and no default is known for this model")
    hp = dict(r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
              use_rslora=d.get("use_rslora", False), adapter_dtype=adapter_dtype)
    from peft_kernels.patch import _methods

    adding = "lora" in _methods.applied_methods(model)
    if adding:
        state = lora_state(model, owner)
        if d.get("modules_to_save") or d.get("bias", "none") != "none" or d.get("target_parameters"):
            raise ValueError(f"{owner}: {cfg_path!r} has modules_to_save, trained biases or target_parameters; "
                             "the adapters of one model share its heads, biases and adapted parameters, so a second "
                             "adapter cannot bring its own (load it into a fresh model)")
        check_same_layers(owner, model, normalize_targets(owner, "target_modules", targets), lora_modules(model))
        # Checked above under this function's name: the adapter goes into the model's LoRA layers.
        add_lora_adapter(model, adapter_name, **hp, bias=d.get("bias", "none"))
    else:
        apply_lora(model, target_modules=targets, bias=d.get("bias", "none"),
                   exclude_modules=d.get("exclude_modules"), modules_to_save=d.get("modules_to_save"),
                   task_type=d.get("task_type"), adapter_name=adapter_name,
                   target_parameters=d.get("target_parameters") or [], rank_pattern=d.get("rank_pattern"),
                   alpha_pattern=d.get("alpha_pattern"), **hp)
        state = lora_state(model, owner)
    try:
        plan = _plan_copies(model, state.adapters[adapter_name], weights, f"{owner}({path!r})")
    except BaseException:
        if adding:
            delete_lora_adapter(model, adapter_name)
        else:
            remove_lora(model, merge=False)  # leave the model as it was given
        raise
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model
