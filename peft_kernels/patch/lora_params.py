"""LoRA on parameters that are not ``nn.Linear`` modules: the fused MoE experts and routers of transformers 5
(Mixtral, Qwen2/3-MoE: ``experts.gate_up_proj`` / ``experts.down_proj`` of shape [E, out, in], the router's
``gate.weight``), as peft's ``target_parameters`` (its ``ParamWrapper``) adapts them.

Each targeted parameter W gets a :class:`LoRAParameter` holding A ``[r·E, in]`` and B ``[out, r·E]`` in
peft's layout (so adapters load both ways); while the owning module runs, W is replaced by ``W + s·ΔW`` (one
ΔW per expert), so its own forward computes with the adapted weight and autograd reaches A and B. This is
plain PyTorch, not a fused kernel: the expert GEMMs are the model's own.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from peft_kernels.nn.lora import lora_scaling

CONTAINER = "lora_params"  # the ModuleDict of LoRAParameter on each owning module


class LoRAParameter(nn.Module):
    """LoRA factors for one 2-D or 3-D parameter (peft's ParamWrapper layout and delta)."""

    def __init__(self, param: Tensor, r: int, lora_alpha: float, use_rslora: bool, adapter_dtype) -> None:
        super().__init__()
        if param.dim() == 3:  # [E, out, in] as transformers stores experts: peft swaps its in/out reading
            num_experts, out_features, in_features = param.shape
        elif param.dim() == 2:
            num_experts, (out_features, in_features) = 1, param.shape
        else:
            raise ValueError(f"LoRAParameter: only 2-D and 3-D parameters, got shape {tuple(param.shape)}")
        self.num_experts, self.r, self.lora_alpha = num_experts, r, lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        kw = {"device": param.device, "dtype": adapter_dtype or param.dtype}
        self.lora_A = nn.Parameter(torch.empty(r * num_experts, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r * num_experts, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.enabled = True

    def delta(self, dtype: torch.dtype) -> Tensor:
        """s·ΔW in the parameter's shape: B_e A_e per expert e, with peft's factor layout."""
        A, B = self.lora_A, self.lora_B
        if self.num_experts == 1:
            d = B @ A
        else:
            A3 = A.reshape(self.num_experts, -1, A.shape[-1])  # [E, r, in]: rows e*r + k
            B3 = B.reshape(B.shape[0], -1, self.num_experts)   # [out, r, E]: columns k*E + e
            d = torch.einsum("ore,eri->eoi", B3, A3)
        return (d * self.scaling).to(dtype)


def _pre_hook(module: nn.Module, args):
    saved = {}
    for name, lp in module._modules[CONTAINER].items():
        if lp.enabled:
            w = module._parameters[name]
            saved[name] = w
            module._parameters[name] = w + lp.delta(w.dtype)  # a tensor for this call only
    module.__dict__["_lora_params_saved"] = saved


def _post_hook(module: nn.Module, args, output):
    saved = module.__dict__.pop("_lora_params_saved", {})
    module._parameters.update(saved)  # always_call: restored even when the forward raised


def attach(owner: nn.Module, param_name: str, lp: LoRAParameter) -> None:
    if CONTAINER not in owner._modules:
        owner.add_module(CONTAINER, nn.ModuleDict())
        h1 = owner.register_forward_pre_hook(_pre_hook)
        h2 = owner.register_forward_hook(_post_hook, always_call=True)
        owner.__dict__["_lora_params_hooks"] = (h1, h2)
    owner._modules[CONTAINER][param_name] = lp


def detach(owner: nn.Module, merge: bool) -> None:
    """Remove the LoRA of every parameter of ``owner``; ``merge`` folds it into the parameters first."""
    container = owner._modules.pop(CONTAINER, None)
    for h in owner.__dict__.pop("_lora_params_hooks", ()):
        h.remove()
    if merge and container is not None:
        with torch.no_grad():
            for name, lp in container.items():
                w = owner._parameters[name]
                w.add_(lp.delta(w.dtype))


def param_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if CONTAINER in m._modules]


def lora_parameters(model: nn.Module) -> list[tuple[str, str, LoRAParameter]]:
    """(owner module name, parameter name, LoRAParameter) for every adapted parameter."""
    return [(n, p, lp) for n, m in param_owners(model) for p, lp in m._modules[CONTAINER].items()]


def resolve_target_parameters(owner: str, model: nn.Module, names) -> list[tuple[str, str, Tensor]]:
    """(module name, parameter name, parameter) matched by peft's rule: ``f"{module}.{param}"`` equals an entry
    or ends with ``"." + entry``; parameters of LoRA containers are never matched."""
    names = tuple(names)
    found = []
    for mod_name, m in model.named_modules():
        if mod_name.rpartition(".")[2] == CONTAINER or ".lora_params." in mod_name + ".":
            continue
        for p_name, p in m.named_parameters(recurse=False):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            if key in names or any(key.endswith("." + t) for t in names):
                found.append((mod_name, p_name, p))
    if not found:
        raise ValueError(f"{owner}: target_parameters={list(names)} matched no parameter of {type(model).__name__}")
    for mod_name, p_name, p in found:
        if p.dim() not in (2, 3) or not p.is_floating_point():
            raise ValueError(f"{owner}: target_parameters selects {mod_name}.{p_name} of shape {tuple(p.shape)}, "
                             f"dtype {p.dtype}; LoRA on a parameter needs a 2-D or 3-D floating weight")
    return found


def peft_key_prefixes(model: nn.Module) -> dict[tuple[str, str], str]:
    """(module, parameter) -> the module path peft's nested ParamWrappers give its lora_A / lora_B: the last
    adapted parameter of a module (in registration order) is the outermost wrapper, each earlier one is one
    ``.base_layer`` deeper."""
    out = {}
    for mod_name, m in param_owners(model):
        adapted = [p for p, _ in m.named_parameters(recurse=False) if p in m._modules[CONTAINER]]
        for i, p in enumerate(adapted):
            out[(mod_name, p)] = mod_name + ".base_layer" * (len(adapted) - 1 - i)
    return out
