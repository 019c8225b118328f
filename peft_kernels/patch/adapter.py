"""Bottleneck adapters in transformers models: apply_adapters / add_bottleneck_adapter / set_active_adapters /
Stack / adapter_routing / save_adapters / load_adapters / remove_adapters.

Where the adapters go (AdapterHub's placement, found by structure, not by model name):
- post-norm encoders (BERT, RoBERTa, ELECTRA, ...): in ``*SelfOutput`` / ``*Output`` after ``dropout(dense(x))``
  and before the sub-layer's residual + LayerNorm (the module's forward is replaced on the instance; its
  LayerNorm is passed to the adapter site, which decides where the residual and the norm go);
- pre-norm decoders (Llama, Mistral, Qwen2, ... : ``self_attn.o_proj``, ``mlp.down_proj``) and GPT-2
  (``attn.c_proj``, ``mlp.c_proj``): on the output of the attention and MLP output projections; the layer then
  adds its residual. Configurations that need the residual stream itself (Pfeiffer's ``original_ln_before``,
  parallel adapters) read it from a forward pre-hook on the layer's norm (``input_layernorm`` / ``ln_1`` ...),
  whose input is that stream.

Parameter names of the model are unchanged; adapters live in ``AdapterSite`` containers (``nn.ModuleDict``):
``<layer>.attention.output.adapters.<name>`` / ``<layer>.output.adapters.<name>`` (post-norm) and
``<layer>.attention_adapters.<name>`` / ``<layer>.output_adapters.<name>`` (decoders), as AdapterHub names them.
"""

from __future__ import annotations

import contextlib
import os
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from peft_kernels.nn.adapter import (
    AdapterConfig,
    BottleneckAdapter,
    adapter_site,
    check_routable,
    needs_residual_stream,
)
from peft_kernels.patch import _io, _methods, _save_pretrained

METHOD = "adapters"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT = "peft_kernels.adapters/1"
# AdapterHub's file names (adapters 1.x).
HUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")


class Stack(tuple):
    """Adapters applied one after the other at every site (AdapterHub's ``Stack``): ``Stack("lang", "task")``."""

    def __new__(cls, *names: str):
        if len(names) == 1 and isinstance(names[0], (list, tuple)):
            names = tuple(names[0])
        return super().__new__(cls, names)

    def __repr__(self) -> str:
        return f"Stack({', '.join(map(repr, self))})"


# --------------------------------------------------------------------------------------------------
# Architectures: (kind, {location: (module path in the layer, residual tap path or None)}, paths a layer has)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Arch:
    kind: str  # "post_norm" (BERT-style output modules) or "pre_norm" (projection + the layer adds r)
    sites: dict
    required: tuple[str, ...]


_ARCHS = (
    _Arch("post_norm", {"attention": ("attention.output", None), "ffn": ("output", None)},
          ("attention.output.dense", "attention.output.LayerNorm", "intermediate", "output.dense", "output.LayerNorm")),
    _Arch("pre_norm", {"attention": ("self_attn.o_proj", "input_layernorm"),
                       "ffn": ("mlp.down_proj", "post_attention_layernorm")},
          ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")),
    _Arch("pre_norm", {"attention": ("attn.c_proj", "ln_1"), "ffn": ("mlp.c_proj", "ln_2")},
          ("attn.c_proj", "mlp.c_proj", "ln_1", "ln_2")),
)  # fmt: skip


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _find_layers(model: nn.Module) -> list[tuple[str, nn.Module, _Arch]]:
    found, skip = [], ()
    for name, mod in model.named_modules():
        if skip and name.startswith(skip):
            continue
        for arch in _ARCHS:
            if all(_get(mod, p) is not None for p in arch.required):
                found.append((name, mod, arch))
                skip = name + "."
                break
    return found


def _out_features(module: nn.Module) -> int:
    if hasattr(module, "dense"):
        module = module.dense
    if isinstance(module, nn.Linear):
        return module.out_features
    nf = getattr(module, "nf", None)  # GPT-2 Conv1D
    if isinstance(nf, int):
        return nf
    w = getattr(module, "weight", None)
    raise ValueError(f"apply_adapters: cannot tell the hidden size of {type(module).__name__} "
                     f"(weight {None if w is None else tuple(w.shape)})")


# --------------------------------------------------------------------------------------------------
# Sites and the per-model control
# --------------------------------------------------------------------------------------------------
@dataclass
class _Control:
    """What every site of one model reads: the active setup, a mixed-batch routing, the sites."""

    sites: list = field(default_factory=list)
    active: tuple[str, ...] = ()
    routing: tuple[tuple[str, ...], Tensor] | None = None
    configs: dict = field(default_factory=dict)
    restore: list = field(default_factory=list)  # undo actions for remove_adapters
    original_requires_grad: dict = field(default_factory=dict)
    # The model's own parameters that train beside the adapters (train_layer_norms, modules_to_train), as they
    # were before: saved with the adapters, put back by remove_adapters.
    originals: dict = field(default_factory=dict)


class AdapterSite(nn.ModuleDict):
    """The adapters of one insertion point (name -> BottleneckAdapter) and how the site runs them."""

    def __init__(self, location: str, layer_idx: int, hidden_size: int, kind: str, control: _Control) -> None:
        super().__init__()
        self.location, self.layer_idx, self.hidden_size, self.kind = location, layer_idx, hidden_size, kind
        self.__dict__["_control"] = control  # not a submodule, not in the state dict
        self.__dict__["_residual"] = None

    def extra_repr(self) -> str:
        return f"location={self.location}, layer={self.layer_idx}"

    def _setup(self):
        ctl: _Control = self.__dict__["_control"]
        if ctl.routing is not None:
            names, ids = ctl.routing
            return [self[n] for n in names if n in self], ids if all(n in self for n in names) else None
        return [self[n] for n in ctl.active if n in self], None

    def wants_residual(self) -> bool:
        adapters, _ = self._setup()
        return bool(adapters) and needs_residual_stream(adapters, True)

    def run(self, h: Tensor, r: Tensor | None, layer_norm: nn.Module | None) -> Tensor:
        """h: the sub-layer output; r: its input (the residual stream) or None; see nn.adapter.adapter_site."""
        adapters, ids = self._setup()
        pre = self.kind == "pre_norm"
        if not adapters:
            if pre:
                return h
            return layer_norm(h + r)
        if ids is not None and len(adapters) != len(self.__dict__["_control"].routing[0]):
            raise ValueError(f"adapter_routing: layer {self.layer_idx} ({self.location}) lacks some routed adapters")
        if pre and needs_residual_stream(adapters, True):
            r = self.__dict__["_residual"]
            self.__dict__["_residual"] = None
            if r is None:
                raise RuntimeError(f"peft_kernels adapters: layer {self.layer_idx} ({self.location}) ran without its "
                                   "residual stream (the norm before it did not run)")
        return adapter_site(adapters, h, r, layer_norm, layer_adds_residual=pre, ids=ids)


# The patched modules find their site through themselves (attributes copy.deepcopy copies with the model), never
# through a closure: a deepcopy shares closures, and a copied model ran the original's adapters.
_SITE_ATTR = "_peft_kernels_adapter_site"  # on a pre-norm site's target, and on its residual tap
_BASE_FORWARD_ATTR = "_peft_kernels_adapter_base_forward"  # on a pre-norm site's target: its forward(self, ...)


def _tap_residual(module, args):
    """Forward pre-hook on a pre-norm site's tap: its input is the residual stream the site may read."""
    site = module.__dict__.get(_SITE_ATTR)
    # Kept only when the active adapters read it (consumed, and dropped, by the site's next run).
    if site is not None and site.wants_residual():
        site.__dict__["_residual"] = args[0]


def _post_norm_site_forward(self, hidden_states, input_tensor, *args, **kwargs):
    h = self.dropout(self.dense(hidden_states))
    return self._modules["adapters"].run(h, input_tensor, self.LayerNorm)


def _pre_norm_site_forward(self, *args, **kwargs):
    d = self.__dict__
    return d[_SITE_ATTR].run(d[_BASE_FORWARD_ATTR](self, *args, **kwargs), None, None)


def _forward_function(module: nn.Module):
    """``module``'s forward as a function of (self, ...): its class's, or the function of an instance override bound
    to it (a copy of the model rebinds it to the copy)."""
    own = module.__dict__.get("forward")
    if own is None:
        return type(module).forward
    if getattr(own, "__self__", None) is module:
        return own.__func__
    return lambda self, *args, **kwargs: own(*args, **kwargs)  # (another object's callable: called as it is)


def _control(model: nn.Module, owner: str) -> _Control:
    ctl = _unwrap(model).__dict__.get("peft_kernels_adapter_control")
    if ctl is None:
        raise ValueError(f"{owner}: {type(_unwrap(model)).__name__} has no adapters; call "
                         "apply_adapters(model, config) first")
    return ctl


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _check_name(owner: str, name) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ValueError(f"{owner}: adapter name must be a non-empty identifier-like str (letters, digits, _ or -), "
                         f"got {name!r}")
    if name == _TRAIN_KEY:
        raise ValueError(f"{owner}: adapter name {name!r} is reserved (it holds the model's modules_to_train)")
    return name


def _check_dtype(owner: str, dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{owner}: dtype must be a floating torch.dtype or None (the model's), got {dtype!r}")


_TRAIN_KEY = "__train__"


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def apply_adapters(model: nn.Module, config: AdapterConfig | None = None, name: str = "adapter", *,
                   modules_to_train: Sequence[str] | None = None, dtype: torch.dtype | None = torch.float32
                   ) -> nn.Module:
    """Insert bottleneck adapter sites into every transformer layer of ``model`` and add adapter ``name``.

    Every parameter is frozen except the adapters', the model's layer norms when
    ``config.train_layer_norms``, and the modules named in ``modules_to_train`` (e.g. ``["classifier"]``: a
    module matches when its qualified name equals an entry or ends with ``"." + entry``). Adapter weights are
    kept in ``dtype`` (fp32 masters by default; None: the model's dtype). Returns ``model``; more adapters with
    :func:`add_bottleneck_adapter`, composition with :func:`set_active_adapters` (``Stack``), per-row selection with
    :func:`adapter_routing`.
    """
    owner = "apply_adapters"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(modules_to_train, str):
        modules_to_train = [modules_to_train]  # one module's name, not its characters
    config = config if config is not None else AdapterConfig.houlsby()
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"{owner}: config must be an AdapterConfig, got {type(config).__name__}")
    _check_name(owner, name)
    model = _unwrap(model)
    _methods.check_compatible(model, METHOD, owner=owner)
    layers = _find_layers(model)
    if not layers:
        raise ValueError(f"{owner}: found no transformer layers in {type(model).__name__}; supported are BERT-style "
                         "post-norm encoders (attention.output / output with dense + LayerNorm), Llama-style decoders "
                         "(self_attn.o_proj, mlp.down_proj) and GPT-2 (attn.c_proj, mlp.c_proj)")
    _check_config_for(owner, config, layers)
    train = tuple(modules_to_train or ())
    if train:
        names = [n for n, _ in model.named_modules()]
        for t in train:
            if not any(n == t or n.endswith("." + t) for n in names):
                raise ValueError(f"{owner}: modules_to_train entry {t!r} matches no module of {type(model).__name__}")

    _check_dtype(owner, dtype)
    ctl = _Control()
    ctl.original_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        _insert_sites(model, ctl, layers, train, name, config, dtype)
    except BaseException:
        _undo(model, ctl)  # a failed apply leaves the model as it was
        raise
    return model


def _insert_sites(model: nn.Module, ctl: _Control, layers, train, name: str, config: AdapterConfig, dtype) -> None:
    for idx, (_, layer, arch) in enumerate(layers):
        for loc, (path, tap) in arch.sites.items():
            target = _get(layer, path)
            site = AdapterSite(loc, idx, _out_features(target), arch.kind, ctl)
            if arch.kind == "post_norm":
                target.add_module("adapters", site)
                target.forward = types.MethodType(_post_norm_site_forward, target)
                ctl.restore.append((target, "adapters"))
            else:
                attr = "attention_adapters" if loc == "attention" else "output_adapters"
                layer.add_module(attr, site)
                target.__dict__[_BASE_FORWARD_ATTR] = _forward_function(target)
                target.__dict__[_SITE_ATTR] = site
                target.forward = types.MethodType(_pre_norm_site_forward, target)
                tap_module = _get(layer, tap)
                tap_module.__dict__[_SITE_ATTR] = site
                tap_module.register_forward_pre_hook(_tap_residual)
                ctl.restore.append((layer, attr))
                ctl.restore.append((tap_module, _tap_residual))
            ctl.restore.append((target, None))  # the forward override
            ctl.sites.append(site)
    model.__dict__["peft_kernels_adapter_control"] = ctl
    ctl.configs[_TRAIN_KEY] = train
    _methods.register_method(model, METHOD, {"adapters": ctl.configs})
    _save_pretrained.install(model, METHOD)
    add_bottleneck_adapter(model, name, config, dtype=dtype)
    set_active_adapters(model, name)
    _set_trainable(model, ctl)


def _check_config_for(owner: str, config: AdapterConfig, layers) -> None:
    for loc in config.locations:
        if not any(loc in arch.sites for _, _, arch in layers):
            raise ValueError(f"{owner}: this architecture has no {loc!r} location")
    hidden = {_out_features(_get(layer, arch.sites[loc][0])) for _, layer, arch in layers for loc in config.locations}
    for h in hidden:
        config.width(h)  # raises when the bottleneck exceeds the hidden size
    bad = [i for i in config.leave_out if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"{owner}: leave_out has layer indices {bad} outside [0, {len(layers)})")


def _set_trainable(model: nn.Module, ctl: _Control) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    train = ctl.configs.get(_TRAIN_KEY, ())
    any_ln = any(c.train_layer_norms for k, c in ctl.configs.items() if k != _TRAIN_KEY)
    for n, m in model.named_modules():
        if isinstance(m, BottleneckAdapter) or (train and any(n == t or n.endswith("." + t) for t in train)):
            for p in m.parameters():
                p.requires_grad_(True)
        elif any_ln and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    adapter_params = {id(p) for m in model.modules() if isinstance(m, BottleneckAdapter) for p in m.parameters()}
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in adapter_params and n not in ctl.originals:
            ctl.originals[n] = p.detach().clone()


def _trained_model_parameters(model: nn.Module, ctl: _Control) -> dict[str, Tensor]:
    """The model's own parameters that train beside the adapters, under the checkpoint's ``model.`` prefix."""
    params = dict(model.named_parameters())
    return {_MODEL_PREFIX + n: params[n].detach().contiguous().cpu() for n in ctl.originals
            if n in params and params[n].requires_grad}


_MODEL_PREFIX = "model."  # adapter keys start with a layer index: no clash


def add_bottleneck_adapter(model: nn.Module, name: str, config: AdapterConfig | None = None, *,
                dtype: torch.dtype | None = torch.float32) -> None:
    """Add another named adapter to a model that has adapter sites (it is not activated; it is trainable)."""
    owner = "add_bottleneck_adapter"
    ctl = _control(model, owner)
    _check_name(owner, name)
    _check_dtype(owner, dtype)
    if name in ctl.configs:
        raise ValueError(f"{owner}: an adapter named {name!r} exists already; call "
                         f"delete_bottleneck_adapter(model, {name!r}) first")
    config = config if config is not None else AdapterConfig.houlsby()
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"{owner}: config must be an AdapterConfig, got {type(config).__name__}")
    model = _unwrap(model)
    layers = _find_layers(model)
    _check_config_for(owner, config, layers)
    for site in ctl.sites:
        if site.location not in config.locations or site.layer_idx in config.leave_out:
            continue
        ref = _site_param(site, model)
        adapter = BottleneckAdapter(site.hidden_size, config, device=ref.device, dtype=dtype or ref.dtype)
        for norm in (adapter.adapter_norm_before, adapter.adapter_norm_after):
            if norm is not None:  # F.layer_norm takes one dtype: the adapter's norms follow the activations
                norm.to(ref.dtype)
        site[name] = adapter
    ctl.configs[name] = config
    for p in (p for s in ctl.sites if name in s for p in s[name].parameters()):
        p.requires_grad_(True)


def _site_param(site: AdapterSite, model: nn.Module) -> Tensor:
    return next(model.parameters())


def list_adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """name -> config of the adapters of ``model``."""
    return {k: v for k, v in _control(model, "list_adapters").configs.items() if k != _TRAIN_KEY}


def set_active_adapters(model: nn.Module, setup: str | Sequence[str] | None) -> None:
    """Which adapters run: a name, a ``Stack`` (or list) of names applied in order at every site, or None."""
    owner = "set_active_adapters"
    ctl = _control(model, owner)
    if setup is not None and not isinstance(setup, (str, list, tuple)):
        raise TypeError(f"{owner}: setup must be an adapter name, a Stack / list of names, or None, got {setup!r}")
    names = () if setup is None else (setup,) if isinstance(setup, str) else tuple(setup)
    for n in names:
        if n not in ctl.configs or n == _TRAIN_KEY:
            raise ValueError(f"{owner}: unknown adapter {n!r}; the model has {sorted(list_adapters(model))}")
    ctl.active = names


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    return _control(model, "active_adapters").active


@contextlib.contextmanager
def adapter_routing(model: nn.Module, names: Sequence[str], ids: Tensor) -> Iterator[None]:
    """Within the block, row i of the batch uses adapter ``names[ids[i]]`` (``ids``: one per sequence [B], or one
    per token [B, T]) in the same fused kernel, forward and backward. The routed adapters must share width,
    non-linearity and placement (and have no adapter layer norms)."""
    owner = "adapter_routing"
    ctl = _control(model, owner)
    names = tuple(names)
    if not names:
        raise ValueError(f"{owner}: names is empty")
    for n in names:
        if n not in ctl.configs or n == _TRAIN_KEY:
            raise ValueError(f"{owner}: unknown adapter {n!r}; the model has {sorted(list_adapters(model))}")
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{owner}: ids must be an integer tensor")
    for site in ctl.sites:
        present = [site[n] for n in names if n in site]
        if present:
            if len(present) != len(names):
                raise ValueError(f"{owner}: layer {site.layer_idx} ({site.location}) lacks some of {names} (leave_out "
                                 "or locations differ); routed adapters must share their sites")
            check_routable(present, owner)
    old = ctl.routing
    ctl.routing = (names, ids)
    try:
        yield
    finally:
        ctl.routing = old


def delete_bottleneck_adapter(model: nn.Module, name: str) -> None:
    ctl = _control(model, "delete_bottleneck_adapter")
    if name not in ctl.configs or name == _TRAIN_KEY:
        raise ValueError(f"delete_bottleneck_adapter: unknown adapter {name!r}")
    for site in ctl.sites:
        if name in site:
            del site[name]
    del ctl.configs[name]
    ctl.active = tuple(n for n in ctl.active if n != name)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take every adapter site out of ``model``: forwards, hooks and requires_grad flags as before, and the values
    of the model's own parameters that trained beside the adapters (train_layer_norms, modules_to_train). Save the
    adapters first (:func:`save_adapters` keeps those parameters too)."""
    model = _unwrap(model)
    _methods.check_removable(model, METHOD, owner="remove_adapters")
    _undo(model, _control(model, "remove_adapters"))
    return model


def _undo(model: nn.Module, ctl: _Control) -> None:
    """Everything ``apply_adapters`` did, undone in reverse (also after it failed part-way)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in ctl.originals.items():  # the norms / modules that trained beside the adapters
            if n in params:
                params[n].copy_(value)
    for mod, what in reversed(ctl.restore):
        if what is None:  # the forward override
            for attr in ("forward", _SITE_ATTR, _BASE_FORWARD_ATTR):
                mod.__dict__.pop(attr, None)
        elif what is _tap_residual:  # found by identity: also in a copy of the model
            for key in [k for k, h in mod._forward_pre_hooks.items() if h is _tap_residual]:
                del mod._forward_pre_hooks[key]
            mod.__dict__.pop(_SITE_ATTR, None)
        elif what in mod._modules:
            delattr(mod, what)
    for n, p in model.named_parameters():
        if n in ctl.original_requires_grad:
            p.requires_grad_(ctl.original_requires_grad[n])
    if model.__dict__.get("peft_kernels_adapter_control") is ctl:
        del model.__dict__["peft_kernels_adapter_control"]
        _methods.unregister_method(model, METHOD)
        _save_pretrained.uninstall(model, METHOD)


# --------------------------------------------------------------------------------------------------
# Saving and loading (ours; AdapterHub's directories load too)
# --------------------------------------------------------------------------------------------------
def _adapter_state(ctl: _Control, name: str) -> dict[str, Tensor]:
    out = {}
    for site in ctl.sites:
        if name in site:
            for k, t in site[name].state_dict().items():
                out[f"{site.layer_idx}.{site.location}.{k}"] = t.detach().contiguous().cpu()
    return out


def save_adapters(model: nn.Module, save_directory: str | os.PathLike, names: Sequence[str] | None = None) -> None:
    """Write ``<dir>/<name>/adapters.safetensors`` + ``adapter_config.json`` per adapter (atomically). The model's
    own parameters that train beside the adapters (the norms of ``train_layer_norms``, ``modules_to_train``) are
    written with each adapter, under ``model.<name>``; :func:`load_adapters` puts them back."""
    owner = "save_adapters"
    ctl = _control(model, owner)
    names = list(list_adapters(model)) if names is None else [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in ctl.configs or n == _TRAIN_KEY:
            raise ValueError(f"{owner}: unknown adapter {n!r}")
    root = _io.check_save_directory(owner, save_directory)
    # The model's parameters that trained beside the adapters (norms, modules_to_train) go with each adapter:
    # without them a reloaded model would not give the trained model's outputs.
    extra = _trained_model_parameters(_unwrap(model), ctl)
    for n in names:
        with _io.atomic_files(os.path.join(root, n), owner=owner) as out:
            out.save_safetensors(WEIGHTS_NAME, {**_adapter_state(ctl, n), **extra})
            out.write_json(CONFIG_NAME, {"format": FORMAT, "name": n, "config": ctl.configs[n].to_dict(),
                                         "model_type": getattr(getattr(_unwrap(model), "config", None), "model_type",
                                                               None),
                                         "modules_to_train": list(ctl.configs.get(_TRAIN_KEY, ())),
                                         "model_parameters": sorted(k[len(_MODEL_PREFIX):] for k in extra)})


_HUB_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def _hub_key(key: str, name: str, ln_before: bool) -> tuple[int, str, str] | None:
    """AdapterHub's state-dict key -> (layer index, location, our parameter name), or None if not an adapter."""
    m = _HUB_LAYER.search(key)
    if m is None:
        return None
    rest = key[m.end():]
    for prefix, loc in (("attention.output.adapters.", "attention"), ("attention_adapters.adapters.", "attention"),
                        ("output.adapters.", "ffn"), ("output_adapters.adapters.", "ffn")):
        if rest.startswith(prefix):
            tail, location = rest[len(prefix):], loc
            break
    else:
        return None
    if not tail.startswith(name + "."):
        return None
    param = tail[len(name) + 1:]
    down_lin = "adapter_down.1." if ln_before else "adapter_down.0."
    if param.startswith(down_lin):
        param = "down." + param[len(down_lin):]
    elif ln_before and param.startswith("adapter_down.0."):
        param = "adapter_norm_before." + param[len("adapter_down.0."):]
    elif param.startswith("adapter_up."):
        param = "up." + param[len("adapter_up."):]
    elif not param.startswith("adapter_norm_after."):
        return None
    return int(m.group(1)), location, param


def _read_dir(path: str, owner: str):
    cfg_path = os.path.join(path, CONFIG_NAME)
    meta = _io.read_json(cfg_path, owner=owner)
    if meta.get("format") == FORMAT:
        if not isinstance(meta.get("config"), dict):
            raise ValueError(f"{owner}: {cfg_path!r} has no adapter \"config\" object")
        cfg = AdapterConfig.from_dict(meta["config"])
        state = _io.load_safetensors(os.path.join(path, WEIGHTS_NAME), owner=owner)
        return meta.get("name"), cfg, state, meta
    if "config" in meta and isinstance(meta["config"], dict) and "name" in meta:  # AdapterHub
        bn = meta["config"]
        if bn.get("architecture", "bottleneck") not in (None, "bottleneck"):
            raise ValueError(f"{owner}: {cfg_path!r} holds an AdapterHub {bn.get('architecture')!r} adapter; only "
                             "bottleneck adapters load here")
        cfg = AdapterConfig.from_adapterhub(bn)
        name = meta["name"]
        for w in HUB_WEIGHTS:
            p = os.path.join(path, w)
            if os.path.isfile(p):
                raw = (_io.load_safetensors if w.endswith(".safetensors") else _io.load_torch_state)(p, owner=owner)
                break
        else:
            raise FileNotFoundError(f"{owner}: {path!r} has an AdapterHub config but none of {HUB_WEIGHTS}")
        state = {}
        for k, t in raw.items():
            parsed = _hub_key(k, name, cfg.ln_before)
            if parsed is not None:
                layer, loc, param = parsed
                state[f"{layer}.{loc}.{param}"] = t
        if not state:
            raise ValueError(f"{owner}: {path!r}: no bottleneck-adapter weights named {name!r} found")
        return name, cfg, state, meta
    raise ValueError(f"{owner}: {cfg_path!r} is neither a peft_kernels nor an AdapterHub adapter config")


def load_adapters(model: nn.Module, load_directory: str | os.PathLike, name: str | None = None, *,
                  set_active: bool = True, dtype: torch.dtype | None = torch.float32) -> str:
    """Load one adapter saved by :func:`save_adapters` (a ``<dir>/<name>`` directory) or by AdapterHub's
    ``model.save_adapter(dir, name)``, adding it to ``model`` (applying adapter sites first when the model has
    none). Everything is read and checked before the model changes. Returns the adapter's name."""
    owner = "load_adapters"
    path = os.fspath(load_directory)
    saved_name, cfg, state, meta = _read_dir(path, owner)
    name = _check_name(owner, name or saved_name or "adapter")
    _check_dtype(owner, dtype)
    m = _unwrap(model)
    saved_type, model_type = meta.get("model_type"), getattr(getattr(m, "config", None), "model_type", None)
    if saved_type is not None and model_type is not None and saved_type != model_type:
        # Same widths and depth are not the same model: the adapter was trained on another one's hidden states.
        raise ValueError(f"{owner}: {path!r} was saved from a {saved_type!r} model; this one is {model_type!r}")
    own = {k[len(_MODEL_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(_MODEL_PREFIX)]}
    params = dict(m.named_parameters())
    bad = [k for k, t in own.items() if k not in params or tuple(params[k].shape) != tuple(t.shape)]
    if bad:
        raise ValueError(f"{owner}: {path!r} holds model parameters this model lacks or has in other shapes: "
                         f"{bad[:4]}")
    fresh = "peft_kernels_adapter_control" not in m.__dict__
    if fresh:
        train = meta.get("modules_to_train") or None
        apply_adapters(m, cfg, name, dtype=dtype, modules_to_train=train)
    else:
        add_bottleneck_adapter(m, name, cfg, dtype=dtype)
    ctl = _control(m, owner)
    expected = _adapter_state(ctl, name)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad_shape:
        (remove_adapters if fresh else delete_bottleneck_adapter)(*((m,) if fresh else (m, name)))
        raise ValueError(f"{owner}: {path!r} does not fit this model: missing {missing[:4]}, unexpected {extra[:4]}, "
                         f"shape mismatch {bad_shape[:4]}")
    with torch.no_grad():
        for site in ctl.sites:
            if name in site:
                prefix = f"{site.layer_idx}.{site.location}."
                sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                site[name].load_state_dict(sub)
        for k, t in own.items():  # the norms / modules that trained beside the adapter
            params[k].copy_(t)
    if set_active:
        set_active_adapters(m, name)
    return name
