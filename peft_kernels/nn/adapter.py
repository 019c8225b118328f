"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; parallel adapters, He et al. 2022).

``AdapterConfig`` holds the knobs AdapterHub's ``BnConfig`` exposes (same names where they mean the same thing)
with the presets people know (:meth:`AdapterConfig.houlsby`, :meth:`AdapterConfig.pfeiffer`,
:meth:`AdapterConfig.parallel`). ``BottleneckAdapter`` is one adapter: its core ``s · up(act(down(x)))`` (plus
the residual when it is the adapter's own input) runs in the fused op ``bottleneck_adapter``; the optional
adapter layer norms (``ln_before`` / ``ln_after``) and adapter dropout run unfused around that core.

``adapter_site`` is what happens at one insertion point of a transformer layer (after the attention block or
after the FFN), with AdapterHub's semantics for the residual connections and the sub-layer's own layer norm:
a Stack of sequential adapters, or a parallel adapter beside the sub-layer, then the residual + layer norm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from peft_kernels.ops.adapter import ACTIVATIONS, bottleneck_adapter, bottleneck_adapter_mixed

# AdapterHub / transformers activation names -> ours (AdapterHub resolves names with transformers'
# get_activation: "swish" and "silu" are SiLU, "gelu" the exact erf GELU, "gelu_new" the tanh approximation).
ACTIVATION_ALIASES = {
    "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None, "silu": "silu", "swish": "silu", "tanh": "tanh",
    "identity": "identity", "linear": "identity", "none": "identity",
}  # fmt: skip
# "cross_attention" is a location of encoder-decoder models; none of the architectures patched today has it.
LOCATIONS = ("attention", "ffn", "cross_attention")
INITS = ("zero_up", "bert", "mam_adapter", "houlsby")


def resolve_activation(name: str, owner: str = "AdapterConfig") -> str:
    """Our activation name for an AdapterHub / transformers / our name; ValueError naming the choices."""
    if not isinstance(name, str):
        raise TypeError(f"{owner}: non_linearity must be a str, got {type(name).__name__}")
    act = ACTIVATION_ALIASES.get(name.lower())
    if act is None:
        known = sorted(k for k, v in ACTIVATION_ALIASES.items() if v is not None)
        raise ValueError(f"{owner}: unknown non_linearity {name!r}; choose one of {known}")
    return act


@dataclass(frozen=True)
class AdapterConfig:
    """Architecture of a bottleneck adapter (AdapterHub's ``BnConfig`` fields where the meaning is the same).

    Args:
        locations: where adapters go in each layer: "attention" (after the attention block; AdapterHub's
            ``mh_adapter``) and/or "ffn" (after the feed-forward block; ``output_adapter``).
        reduction_factor: bottleneck width = hidden_size // reduction_factor (ignored when ``bottleneck`` is set).
        bottleneck: the bottleneck width itself.
        non_linearity: relu, gelu, gelu_tanh (= gelu_new), silu (= swish), tanh, identity.
        scaling: factor on the adapter output (He et al.'s scaled addition).
        bias: biases on both projections.
        original_ln_before / original_ln_after / residual_before_ln / adapter_residual_before_ln / ln_before /
            ln_after: AdapterHub's placement of the residual connections and layer norms (same meaning).
        parallel: the adapter runs beside the sub-layer on its input (He et al.); else after it (sequential).
        dropout: dropout on the adapter output (training only; unfused when > 0).
        init: "zero_up" (default: up-projection zero, so a new adapter leaves the model's outputs unchanged;
            down-projection like nn.Linear), "bert" (normal, std 0.02, both), "mam_adapter" (kaiming down,
            zero up), "houlsby" (truncated normal, std 0.01, both).
        leave_out: layer indices that get no adapters.
        train_layer_norms: also train the model's layer norms (and any adapter norms, always trained).
    """

    locations: tuple[str, ...] = ("attention", "ffn")
    reduction_factor: float = 16
    bottleneck: int | None = None
    non_linearity: str = "silu"
    scaling: float = 1.0
    bias: bool = True
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    parallel: bool = False
    dropout: float = 0.0
    init: str = "zero_up"
    leave_out: tuple[int, ...] = field(default_factory=tuple)
    train_layer_norms: bool = False

    def __post_init__(self) -> None:
        owner = "AdapterConfig"
        if not isinstance(self.locations, (str, list, tuple)):
            raise TypeError(f"{owner}: locations must be a str or a list of them from {LOCATIONS}, got "
                            f"{self.locations!r}")
        locs = (self.locations,) if isinstance(self.locations, str) else tuple(self.locations)
        object.__setattr__(self, "locations", locs)
        leave_out = (self.leave_out,) if isinstance(self.leave_out, int) else self.leave_out
        if not isinstance(leave_out, (list, tuple, set, range)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in leave_out):
            raise TypeError(f"{owner}: leave_out must be a list of layer indices (ints), got {self.leave_out!r}")
        object.__setattr__(self, "leave_out", tuple(sorted(set(leave_out))))
        for flag in ("bias", "original_ln_before", "original_ln_after", "adapter_residual_before_ln", "ln_before",
                     "ln_after", "parallel", "train_layer_norms"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{owner}: {flag} must be a bool, got {getattr(self, flag)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"{owner}: dropout must be a float in [0, 1), got {self.dropout!r}")
        if isinstance(self.reduction_factor, bool):
            raise TypeError(f"{owner}: reduction_factor must be a number >= 1, got {self.reduction_factor!r}")
        if not locs:
            raise ValueError(f"{owner}: locations is empty; choose from {LOCATIONS}")
        for loc in locs:
            if loc not in LOCATIONS:
                raise ValueError(f"{owner}: unknown location {loc!r}; choose from {LOCATIONS}")
        object.__setattr__(self, "non_linearity", resolve_activation(self.non_linearity, owner))
        if self.bottleneck is not None:
            if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
                raise ValueError(f"{owner}: bottleneck must be an int >= 1, got {self.bottleneck!r}")
        elif not (isinstance(self.reduction_factor, (int, float)) and math.isfinite(self.reduction_factor)
                  and self.reduction_factor >= 1):
            raise ValueError(f"{owner}: reduction_factor must be a number >= 1 (the bottleneck may not exceed the "
                             f"hidden size), got {self.reduction_factor!r}")
        if not (isinstance(self.scaling, (int, float)) and math.isfinite(self.scaling)):
            raise ValueError(f"{owner}: scaling must be a finite float, got {self.scaling!r}")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"{owner}: residual_before_ln must be True, False or 'post_add', got "
                             f"{self.residual_before_ln!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"{owner}: unknown init {self.init!r}; choose one of {INITS}")

    # ----------------------------------------------------------------------------------------------
    # Presets
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def houlsby(cls, **overrides) -> AdapterConfig:
        """Houlsby et al. (AdapterHub's DoubleSeqBnConfig): after attention and after the FFN, swish, reduction 16."""
        return cls(**{"locations": ("attention", "ffn"), "non_linearity": "swish", "reduction_factor": 16,
                      "original_ln_before": False, "original_ln_after": True, **overrides})

    @classmethod
    def pfeiffer(cls, **overrides) -> AdapterConfig:
        """Pfeiffer et al. (AdapterHub's SeqBnConfig): after the FFN only, relu, reduction 16."""
        return cls(**{"locations": ("ffn",), "non_linearity": "relu", "reduction_factor": 16,
                      "original_ln_before": True, "original_ln_after": True, **overrides})

    @classmethod
    def parallel_adapter(cls, **overrides) -> AdapterConfig:
        """He et al. (AdapterHub's ParBnConfig): beside the FFN, relu, reduction 2, scaling 4."""
        return cls(**{"locations": ("ffn",), "non_linearity": "relu", "reduction_factor": 2, "scaling": 4.0,
                      "parallel": True, "original_ln_before": False, "original_ln_after": True, **overrides})

    # ----------------------------------------------------------------------------------------------
    def width(self, hidden_size: int) -> int:
        """The bottleneck width for a hidden size (AdapterHub: int(hidden // reduction_factor), at least 1)."""
        m = self.bottleneck if self.bottleneck is not None else max(1, int(hidden_size // self.reduction_factor))
        if m > hidden_size:
            raise ValueError(f"AdapterConfig: bottleneck {m} is larger than the hidden size {hidden_size}")
        return m

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["locations"], d["leave_out"] = list(self.locations), list(self.leave_out)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"AdapterConfig.from_dict: unknown keys {unknown}")
        d = dict(d)
        for k in ("locations", "leave_out"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_adapterhub(cls, bn: dict) -> AdapterConfig:
        """From AdapterHub's BnConfig dict (``adapter_config.json``'s "config"); refuses what is not modelled."""
        unsupported = {"phm_layer": False, "use_gating": False, "inv_adapter": None, "cross_adapter": False,
                       "stochastic_depth": 0.0}
        for k, off in unsupported.items():
            if bn.get(k) not in (off, None):
                raise ValueError(f"AdapterConfig.from_adapterhub: {k}={bn[k]!r} is not supported")
        rf = bn.get("reduction_factor", 16)
        if isinstance(rf, dict):
            raise ValueError("AdapterConfig.from_adapterhub: per-layer reduction_factor mappings are not supported")
        scaling = bn.get("scaling", 1.0)
        if isinstance(scaling, str):
            raise ValueError(f"AdapterConfig.from_adapterhub: scaling={scaling!r} (learned) is not supported")
        locs = tuple(loc for loc, key in (("attention", "mh_adapter"), ("ffn", "output_adapter")) if bn.get(key))
        return cls(
            locations=locs, reduction_factor=rf, non_linearity=bn.get("non_linearity", "relu"), scaling=float(scaling),
            original_ln_before=bool(bn.get("original_ln_before", False)),
            original_ln_after=bool(bn.get("original_ln_after", True)),
            residual_before_ln=bn.get("residual_before_ln", True),
            adapter_residual_before_ln=bool(bn.get("adapter_residual_before_ln", False)),
            ln_before=bool(bn.get("ln_before", False)), ln_after=bool(bn.get("ln_after", False)),
            parallel=bool(bn.get("is_parallel", False)), dropout=float(bn.get("dropout", 0.0)),
            init={"mam_adapter": "mam_adapter", "houlsby": "houlsby"}.get(bn.get("init_weights"), "bert"),
            leave_out=tuple(bn.get("leave_out", ())),
        )  # fmt: skip


class BottleneckAdapter(nn.Module):
    """One bottleneck adapter: ``down`` [m, H] and ``up`` [H, m] projections (nn.Linear), optional layer norms.

    ``forward(x, residual=None)`` is AdapterHub's ``Adapter.forward``: ``residual + s · up(act(down(x)))`` with
    the configured adapter layer norms and dropout; ``residual`` defaults to ``x`` (then, without adapter layer
    norms, the whole thing is one fused op). ``branch(x)`` is ``s · up(act(down(x)))`` alone (parallel adapters).
    """

    def __init__(self, hidden_size: int, config: AdapterConfig | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        config = config if config is not None else AdapterConfig()
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"BottleneckAdapter: config must be an AdapterConfig, got {type(config).__name__}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"BottleneckAdapter: hidden_size must be an int >= 1, got {hidden_size!r}")
        self.config = config
        self.hidden_size = hidden_size
        self.bottleneck = config.width(hidden_size)
        self.activation = config.non_linearity
        assert self.activation in ACTIVATIONS
        self.scaling = float(config.scaling)
        kw = {"device": device, "dtype": dtype}
        self.adapter_norm_before = nn.LayerNorm(hidden_size, **kw) if config.ln_before else None
        self.down = nn.Linear(hidden_size, self.bottleneck, bias=config.bias, **kw)
        self.up = nn.Linear(self.bottleneck, hidden_size, bias=config.bias, **kw)
        self.adapter_norm_after = nn.LayerNorm(hidden_size, **kw) if config.ln_after else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init = self.config.init
        if init in ("zero_up", "mam_adapter"):
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        elif init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        else:  # houlsby
            nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.trunc_normal_(self.up.weight, std=1e-2, a=-2e-2, b=2e-2)
        for lin in (self.down, self.up):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    @property
    def fusable(self) -> bool:
        """Whether the whole adapter (residual included) is the fused op alone: no adapter norms, no dropout."""
        return self.adapter_norm_before is None and self.adapter_norm_after is None and (
            self.dropout is None or not self.training)

    def core(self, x: Tensor, residual: bool) -> Tensor:
        """``[x +] s · up(act(down(x)))``: the fused op (validated once per input signature, then a cached call)."""
        modules = self._modules  # not nn.Module.__getattr__: this is the layer's per-call host time
        params_d, params_u = modules["down"]._parameters, modules["up"]._parameters
        return bottleneck_adapter(x, params_d["weight"], params_d["bias"], params_u["weight"], params_u["bias"],
                                  self.activation, self.scaling, residual)

    def branch(self, x: Tensor) -> Tensor:
        """``s · up(act(down(LN_before(x))))`` with dropout and LN_after: the parallel adapter's output."""
        if self.adapter_norm_before is not None:
            x = self.adapter_norm_before(x)
        out = self.core(x, False)
        if self.dropout is not None:
            out = self.dropout(out)
        if self.adapter_norm_after is not None:
            out = self.adapter_norm_after(out)
        return out

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is None or residual is x:
            if self.fusable:
                return self.core(x, True)
            residual = x
        xin = self.adapter_norm_before(x) if self.adapter_norm_before is not None else x
        out = self.core(xin, False)
        if self.dropout is not None:
            out = self.dropout(out)
        if self.config.adapter_residual_before_ln:
            out = out + residual
        if self.adapter_norm_after is not None:
            out = self.adapter_norm_after(out)
        if not self.config.adapter_residual_before_ln:
            out = out + residual
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={self.hidden_size}, bottleneck={self.bottleneck}, activation={self.activation}, "
                f"scaling={self.scaling}, parallel={c.parallel}")


# --------------------------------------------------------------------------------------------------
# One insertion point: a Stack of adapters (or a routed mixed batch) with AdapterHub's residual / LN rules
# --------------------------------------------------------------------------------------------------
def needs_residual_stream(adapters: Sequence[BottleneckAdapter], layer_adds_residual: bool) -> bool:
    """Whether a site needs the sub-layer's input r (else only its output h is used)."""
    if any(a.config.original_ln_before or a.config.parallel for a in adapters):
        return True
    return layer_adds_residual and not adapters[-1].config.original_ln_after


def _mixed_core(adapters: Sequence[BottleneckAdapter], x: Tensor, ids: Tensor, residual: bool) -> Tensor:
    first = adapters[0]
    bias = first.down.bias is not None
    stack = torch.stack
    return bottleneck_adapter_mixed(
        x, stack([a.down.weight for a in adapters]), stack([a.down.bias for a in adapters]) if bias else None,
        stack([a.up.weight for a in adapters]), stack([a.up.bias for a in adapters]) if bias else None,
        ids, first.activation, tuple(a.scaling for a in adapters), residual,
    )


def check_routable(adapters: Sequence[BottleneckAdapter], owner: str) -> None:
    """Adapters that one mixed batch can route between: same placement, width, activation, no adapter norms."""
    first = adapters[0]
    keys = ("original_ln_before", "original_ln_after", "residual_before_ln", "parallel", "bias")
    for a in adapters:
        if a.adapter_norm_before is not None or a.adapter_norm_after is not None:
            raise ValueError(f"{owner}: a routed (mixed) batch cannot use adapters with their own layer norms")
        if a.bottleneck != first.bottleneck or a.activation != first.activation:
            raise ValueError(f"{owner}: routed adapters must share bottleneck width and non-linearity, got "
                             f"{first.bottleneck}/{first.activation} and {a.bottleneck}/{a.activation}")
        if any(getattr(a.config, k) != getattr(first.config, k) for k in keys):
            raise ValueError(f"{owner}: routed adapters must share the placement options {keys}")


def adapter_site(adapters: Sequence[BottleneckAdapter], h: Tensor, r: Tensor | None, layer_norm: nn.Module | None,
                 *, layer_adds_residual: bool, ids: Tensor | None = None) -> Tensor:
    """The output of one insertion point, given the sub-layer's output ``h`` and input ``r`` (the residual stream).

    ``adapters`` is the active Stack (applied in order), or with ``ids`` the adapters one mixed batch routes
    between (row i of the batch uses ``adapters[ids[i]]``). BERT-style layers pass their sub-layer LayerNorm and
    get ``LN(... + r)`` back; pre-norm decoders (``layer_adds_residual``) get what the layer then adds to r.
    """
    if ids is not None:
        stack_list: Sequence = [list(adapters)]
        cfg_last = adapters[0].config
    else:
        stack_list = [[a] for a in adapters]
        cfg_last = adapters[-1].config
    hs = h
    for group in stack_list:
        a = group[0]
        c = a.config
        routed = ids is not None

        def core(x, residual_flag, group=group, a=a, routed=routed):
            if routed:
                return _mixed_core(group, x, ids, residual_flag)
            return a.core(x, residual_flag)

        if c.parallel:
            hs = core(r, False) if (routed or a.fusable) else a.branch(r)
            continue
        residual = hs if c.residual_before_ln is True else None
        if c.original_ln_before:
            hs = hs + r
            if layer_norm is not None:
                if c.residual_before_ln == "post_add":
                    residual = hs
                hs = layer_norm(hs)
        if not c.residual_before_ln:
            residual = hs
        if routed:
            hs = core(hs, True) if residual is hs else core(hs, False) + residual
        else:
            hs = a(hs, residual)
    if cfg_last.parallel:
        hs = hs + h
    if cfg_last.original_ln_after:
        if layer_norm is not None:
            hs = layer_norm(hs + r)
        elif not layer_adds_residual:
            hs = hs + r
    elif layer_adds_residual:
        hs = hs - r
    return hs
