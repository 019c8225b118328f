"""Prefix-Tuning and P-Tuning v2 for ``transformers`` models, through the fused ``prefix_attention`` op.

``apply_prefix_tuning(model)`` attaches a :class:`~peft_kernels.nn.PrefixEncoder` as ``model.peft_kernels_prefix``,
freezes everything else, and routes every self-attention layer through ``prefix_attention`` with that layer's
prefix. The route is transformers' attention registry: an attention function and a mask function are registered
under ``"peft_kernels_prefix"`` and the model's ``config._attn_implementation`` is switched to it, so the model code
is untouched. The registered mask function is transformers' own ``sdpa_mask``, so the attention function receives the
exact boolean mask SDPA would (or None); it decomposes that mask into (causal, key padding) for the op, once per
forward (key slots no query sees, like a static cache's empty tail, are dropped first). A mask the op cannot express
(a sliding window that cuts in, packed sequences, a per-head or biased custom 4-D mask) runs an explicit path
instead: SDPA over the concatenated [prefix; keys] with the model's mask, so the answer is always the model's own
semantics, just unfused there (with a warning, once).

Semantics: the prefix keys carry no positional encoding (as HF peft's ``past_key_values`` prefix) and every query
sees all P of them; real tokens keep their positions 0..L-1. HF peft instead runs the real tokens at positions
P..P+L-1 (its prefix sits in the KV cache); pass ``position_ids = arange(L) + P`` to reproduce peft exactly.
During generation the KV cache holds only real keys; the prefix is added in every step.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peft_kernels.nn.prefix import PrefixEncoder, PrefixParameters
from peft_kernels.ops.prefix_attention import prefix_attention, prefix_attention_mask

ATTN_IMPLEMENTATION = "peft_kernels_prefix"
ENCODER_ATTR = "peft_kernels_prefix"
_STATE_ATTR = "_peft_kernels_prefix_state"
_LAYER_ATTR = "_peft_kernels_prefix_layer"
WEIGHTS_NAME = "prefix_model.safetensors"
CONFIG_NAME = "prefix_config.json"

# model_type -> class name of its self-attention module. Each was checked to call its attention function through
# transformers' ALL_ATTENTION_FUNCTIONS with query/key/value [B, H, L, D] (after rotary, after the cache update).
SELF_ATTENTION_CLASSES = {
    "llama": "LlamaAttention",
    "mistral": "MistralAttention",
    "qwen2": "Qwen2Attention",
    "gpt2": "GPT2Attention",
    "bert": "BertSelfAttention",
    "roberta": "RobertaSelfAttention",
}
_HEAD_NAMES = ("classifier", "score")


# --------------------------------------------------------------------------------------------------
# Per-model state: the encoder, the prefix of the current forward, the decoded mask
# --------------------------------------------------------------------------------------------------
@dataclass
class _PrefixState:
    encoder: nn.Module
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_virtual_tokens: int
    method: str
    original_attn: str | None
    train_modules: list[str]
    requires_grad: dict[str, bool]
    ignore_attention_dropout: bool
    current_attn: str | None = None
    mode: str = "fused"  # "explicit": always SDPA over the concatenated K/V (the tests' reference path)
    prefix: list | None = None
    prefix_key: tuple | None = None
    mask_cache: tuple | None = None
    seen: set = field(default_factory=set)
    warned: set = field(default_factory=set)

    def __getstate__(self):
        # copy.deepcopy / pickle of the model: leave out the last forward's prefix (graph tensors) and mask cache.
        return {**self.__dict__, "prefix": None, "prefix_key": None, "mask_cache": None, "seen": set()}

    def begin_forward(self) -> None:
        """Compute every layer's prefix once for this model forward (reused when nothing changed and no grad)."""
        self.seen = set()
        self.mask_cache = None
        params = list(self.encoder.parameters())
        key = tuple((id(p), p._version, p.device, p.dtype) for p in params)
        if torch.is_grad_enabled() or self.prefix is None or key != self.prefix_key:
            prefix = self.encoder()
            check_prefixes(prefix, self.num_layers, self.num_kv_heads, self.head_dim, who=type(self.encoder).__name__)
            self.prefix = prefix
            # Cached only when computed without grad: a graph-carrying prefix must be rebuilt every forward.
            self.prefix_key = None if torch.is_grad_enabled() else key

    def end_forward(self, model_name: str) -> None:
        missing = sorted(set(range(self.num_layers)) - self.seen)
        if missing:
            raise RuntimeError(
                f"peft_kernels prefix tuning: layers {missing} of {model_name} did not call the registered attention "
                f"function {ATTN_IMPLEMENTATION!r}, so they ran without their prefix (was config._attn_implementation "
                f"changed after apply_prefix_tuning? now {self.current_attn!r})"
            )

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=4)

    def decode_mask(self, attention_mask, B: int, Lq: int, Lk: int, causal_hint: bool, where: str):
        """(causal, key_padding_mask or None, kept keys) for the op, or None if the mask needs the explicit path."""
        if attention_mask is None:
            # transformers passes no mask for plain causal/bidirectional attention without padding. With Lq > 1 it
            # may also mean a static-cache prefill, where SDPA's upper-left is_causal is meant and the keys past Lq
            # are empty slots: keep the first Lq keys, as transformers' sdpa_attention_forward does.
            if causal_hint and 1 < Lq < Lk:
                return True, None, Lq
            return causal_hint, None, Lk
        cached = self.mask_cache
        if cached is not None and cached[0] is attention_mask and cached[1] == (B, Lq, Lk, causal_hint):
            return cached[2]
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 4:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise TypeError(
                f"peft_kernels prefix attention ({where}): expected a 4-D bool/additive attention mask or None, got "
                f"{got}"
            )
        else:
            b, h, lq, lk = attention_mask.shape
            if (lq, lk) != (Lq, Lk) or b not in (1, B):
                raise ValueError(
                    f"peft_kernels prefix attention ({where}): attention mask of shape {tuple(attention_mask.shape)} "
                    f"does not fit batch {B}, {Lq} queries and {Lk} keys; the 2-D attention_mask must be "
                    f"[batch, past + current tokens] (the prefix is added internally: do not include it)"
                )
            result = _decompose_mask(attention_mask, B, Lq, Lk, causal_hint) if h == 1 else None
        self.mask_cache = (attention_mask, (B, Lq, Lk, causal_hint), result)
        return result


def _decompose_mask(mask: Tensor, B: int, Lq: int, Lk: int, causal_hint: bool):
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        # An additive mask holding anything but 0 / "minus infinity" is a bias the op cannot carry.
        if not (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all():
            return None
    else:
        return None
    allowed = allowed[:, 0]  # [1 or B, Lq, Lk]
    found = _match_pattern(allowed, Lq, Lk, causal_hint)
    if found is None:
        # Key columns no query sees at the end (a static cache's empty slots) are dropped, which realigns a
        # static-cache prefill to bottom-right causal.
        used = allowed.any(1).any(0).nonzero()
        keep = int(used[-1]) + 1 if used.numel() else Lk
        if keep < Lk:
            found = _match_pattern(allowed[..., :keep], Lq, keep, causal_hint)
            Lk = keep
    if found is None:
        return None
    causal, kpm = found
    return causal, (None if bool(kpm.all()) else kpm.expand(B, Lk).contiguous()), Lk


def _match_pattern(allowed: Tensor, Lq: int, Lk: int, causal_hint: bool):
    """(causal, key padding [1 or B, Lk]) if ``allowed`` is exactly that pattern, else None."""
    kpm = allowed[:, -1]  # bottom-right causal: the last query sees every real key, so its row is the padding
    tri = torch.ones(Lq, Lk, dtype=torch.bool, device=allowed.device).tril(Lk - Lq)
    step = max(1, (1 << 25) // (Lq * Lk))  # batch chunks bound the temporaries for long sequences
    for causal in (causal_hint, not causal_hint):
        for s in range(0, allowed.shape[0], step):
            a, k = allowed[s : s + step], kpm[s : s + step, None, :]
            expected = k & tri if causal else k.expand_as(a)
            # Rows that see no real key are queries at padding positions; the model discards their outputs and
            # transformers' mask may fill them either way, so they do not decide the pattern.
            if bool(((expected != a) & expected.any(-1, keepdim=True)).any()):
                break
        else:
            return causal, kpm
    return None


def check_prefixes(prefixes, num_layers: int, num_kv_heads: int, head_dim: int, who: str) -> int:
    """Check an encoder's output against the model; returns P. Raises ValueError naming the layer and the size."""
    if not isinstance(prefixes, (list, tuple)) or len(prefixes) != num_layers:
        n = len(prefixes) if isinstance(prefixes, (list, tuple)) else type(prefixes).__name__
        raise ValueError(f"{who}: expected {num_layers} (prefix_k, prefix_v) pairs, one per attention layer, got {n}")
    P = None
    for i, pair in enumerate(prefixes):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{who}: layer {i}: expected a (prefix_k, prefix_v) pair")
        for name, t in zip(("prefix_k", "prefix_v"), pair):
            if not isinstance(t, Tensor) or t.dim() != 3:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{who}: layer {i}: {name} must be [Hkv, P, D], got {got}")
            if t.shape[0] != num_kv_heads:
                raise ValueError(
                    f"{who}: layer {i}: {name} of shape {tuple(t.shape)} has {t.shape[0]} KV heads, the model's "
                    f"attention has {num_kv_heads}"
                )
            if t.shape[2] != head_dim:
                raise ValueError(
                    f"{who}: layer {i}: {name} of shape {tuple(t.shape)} has head dim {t.shape[2]}, the model's "
                    f"attention has head dim {head_dim}"
                )
            if P is None:
                P = t.shape[1]
            elif t.shape[1] != P:
                raise ValueError(
                    f"{who}: layer {i}: {name} has {t.shape[1]} virtual tokens but layer 0 has {P}; every layer "
                    "must have the same prefix length P"
                )
    if P < 1:
        raise ValueError(f"{who}: the prefix has no virtual tokens (P = 0)")
    return P


# --------------------------------------------------------------------------------------------------
# The registered attention function
# --------------------------------------------------------------------------------------------------
def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] (real tokens,
    cache included) -> ([B, Lq, Hq, D], None)."""
    entry = getattr(module, _LAYER_ATTR, None)
    if entry is None:
        # Not a patched self-attention (e.g. cross-attention): what SDPA would do with the same mask.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    state, layer = entry
    if state.prefix is None:  # the layer was called outside the model's forward
        state.begin_forward()
    state.seen.add(layer)
    where = f"layer {layer}, {type(module).__name__}"
    prefix_k, prefix_v = state.prefix[layer]
    # A model split over devices (device_map) runs layers away from the encoder; the prefix is tiny to move.
    prefix_k, prefix_v = prefix_k.to(query.device), prefix_v.to(query.device)
    is_causal = kwargs.get("is_causal")
    hint = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    B, Lq, Lk = query.shape[0], query.shape[2], key.shape[2]
    decoded = state.decode_mask(attention_mask, B, Lq, Lk, hint, where)
    if decoded is not None and decoded[2] < Lk:
        key, value = key[:, :, : decoded[2]], value[:, :, : decoded[2]]
    use_dropout = dropout > 0 and not state.ignore_attention_dropout
    if decoded is None:
        state.warn_once("mask", (
            f"peft_kernels prefix attention: the attention mask in {where} is not causal/bidirectional + key padding "
            "(sliding window, packed sequences, a custom 4-D mask, ...); such calls run unfused (SDPA over the "
            "concatenated prefix and keys)"))
    elif use_dropout:
        state.warn_once("dropout", (
            f"peft_kernels prefix attention: {where} applies attention dropout {dropout} in training, which the "
            "fused op does not implement, so it runs unfused; set the model's attention dropout to 0, or pass "
            "ignore_attention_dropout=True to apply_prefix_tuning to skip it"))
    if decoded is None or use_dropout or state.mode == "explicit":
        mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
        out = _explicit_prefix_attention(query, key, value, prefix_k, prefix_v, mask, hint, scaling,
                                         dropout if use_dropout else 0.0)
    else:
        causal, key_padding_mask, _ = decoded
        try:
            out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal,
                                   key_padding_mask=key_padding_mask, scale=scaling)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"peft_kernels prefix attention ({where}): {exc}") from exc
    return out.transpose(1, 2).contiguous(), None


def _explicit_prefix_attention(query, key, value, prefix_k, prefix_v, attention_mask, causal, scaling, dropout):
    """SDPA over [prefix; keys] with the model's own mask (prefix columns always visible)."""
    B, Hq, Lq, _ = query.shape
    Hkv, Lk, P = key.shape[1], key.shape[2], prefix_k.shape[1]
    K = torch.cat([prefix_k.to(key.dtype).expand(B, -1, -1, -1), key], dim=2)
    V = torch.cat([prefix_v.to(value.dtype).expand(B, -1, -1, -1), value], dim=2)
    if Hq != Hkv:
        K, V = K.repeat_interleave(Hq // Hkv, dim=1), V.repeat_interleave(Hq // Hkv, dim=1)
    if attention_mask is None:
        mask = prefix_attention_mask(B, Lq, Lk, P, causal and Lq > 1, None, query.device)
    elif attention_mask.dtype == torch.bool:
        b, h = attention_mask.shape[:2]
        mask = torch.cat([attention_mask.new_ones(b, h, Lq, P), attention_mask], dim=-1)
    else:
        b, h = attention_mask.shape[:2]
        m = attention_mask.to(query.dtype)
        mask = torch.cat([m.new_zeros(b, h, Lq, P), m], dim=-1)
    return F.scaled_dot_product_attention(query, K, V, attn_mask=mask, dropout_p=dropout, scale=scaling)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    # Without a registered mask function transformers skips mask creation for unknown implementations (and the
    # padding would be lost); SDPA's boolean masks (or None) are what _PrefixState.decode_mask reads.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _set_attn_implementation(model, name: str | None) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


# --------------------------------------------------------------------------------------------------
# Model inspection
# --------------------------------------------------------------------------------------------------
def _model_type(model) -> str:
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, nn.Module):
        raise TypeError(f"peft_kernels prefix tuning needs a transformers PreTrainedModel, got {type(model).__name__}")
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise TypeError(
            "peft_kernels prefix tuning applies to a plain transformers model, not a peft model; pass the base model"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in SELF_ATTENTION_CLASSES:
        raise ValueError(
            f"peft_kernels prefix tuning does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(SELF_ATTENTION_CLASSES))}"
        )
    return model_type


def _dims(config) -> tuple[int, int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def _find_attention(model, model_type: str) -> list[nn.Module]:
    cls_name = SELF_ATTENTION_CLASSES[model_type]
    found = [m for m in model.modules() if type(m).__name__ == cls_name and not getattr(m, "is_cross_attention", False)]
    num_layers = _dims(model.config)[0]
    idx = sorted(-1 if getattr(m, "layer_idx", None) is None else m.layer_idx for m in found)
    if idx != list(range(num_layers)):
        raise ValueError(
            f"peft_kernels prefix tuning: expected {num_layers} {cls_name} modules with layer_idx 0..{num_layers - 1} "
            f"in {type(model).__name__}, found layer indices {idx}"
        )
    source = inspect.getsource(type(found[0]).forward)
    if "ALL_ATTENTION_FUNCTIONS" not in source:
        import transformers

        raise NotImplementedError(
            f"peft_kernels prefix tuning: {cls_name} in transformers {transformers.__version__} does not call its "
            "attention through transformers' AttentionInterface, which this patch relies on"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def _resolve_train_modules(model, train_modules) -> list[str]:
    if train_modules is None:  # a sequence-classification head starts random: it trains, as in HF peft
        if type(model).__name__.endswith("ForSequenceClassification"):
            return [n for n in _HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)][:1]
        return []
    if isinstance(train_modules, str):
        train_modules = [train_modules]
    names = []
    for t in train_modules:
        hits = [n for n, _ in model.named_modules() if n and (n == t or n.endswith("." + t))]
        if not hits:
            raise ValueError(f"train_modules: {type(model).__name__} has no submodule named {t!r}")
        names.extend(h for h in hits if h not in names)
    return names


def get_prefix_state(model) -> _PrefixState | None:
    return getattr(model, _STATE_ATTR, None)


def _state(model, who: str) -> _PrefixState:
    state = get_prefix_state(model)
    if state is None:
        raise ValueError(f"{who}: {type(model).__name__} has no prefix; call apply_prefix_tuning first")
    return state


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def apply_prefix_tuning(
    model,
    num_virtual_tokens: int = 32,
    projection: bool = True,
    projection_hidden: int = 512,
    train_modules=None,
    *,
    prefix=None,
    hidden_size: int | None = None,
    ignore_attention_dropout: bool = False,
):
    """Prefix-Tuning: train P virtual key/value tokens per attention layer (reparameterized by an MLP when
    ``projection``), with everything else frozen. Returns ``model``, patched in place.

    ``train_modules``: names of submodules that train too (matched on the name or its dotted suffix). None means
    the classification head (``classifier`` / ``score``) for ``*ForSequenceClassification`` models and nothing
    otherwise; ``[]`` trains the prefix alone.
    ``prefix``: instead of a new :class:`PrefixEncoder`, a module whose ``forward()`` returns one
    ``(prefix_k, prefix_v)`` ``[Hkv, P, D]`` pair per layer, or such a list (trained as :class:`PrefixParameters`).
    ``ignore_attention_dropout``: run the fused op without the model's attention-probability dropout in training
    (by default layers with attention dropout > 0 run the exact, unfused path while training).
    """
    return _apply(model, "prefix_tuning", num_virtual_tokens, projection, projection_hidden, hidden_size,
                  train_modules, prefix, ignore_attention_dropout, "apply_prefix_tuning")


def apply_p_tuning_v2(model, num_virtual_tokens: int = 32, train_modules=None, *, prefix=None,
                      ignore_attention_dropout: bool = False):
    """P-Tuning v2 (deep prompt tuning): per-layer trainable prefixes without reparameterization; for
    ``*ForSequenceClassification`` models the classification head trains as well (see :func:`apply_prefix_tuning`)."""
    return _apply(model, "p_tuning_v2", num_virtual_tokens, False, None, None, train_modules, prefix,
                  ignore_attention_dropout, "apply_p_tuning_v2")


def _apply(model, method, num_virtual_tokens, projection, projection_hidden, hidden_size, train_modules, prefix,
           ignore_attention_dropout, who):
    model_type = _model_type(model)
    if get_prefix_state(model) is not None:
        raise ValueError(f"{who}: {type(model).__name__} already has a prefix; call remove_prefix(model) first")
    attention = _find_attention(model, model_type)
    num_layers, num_kv_heads, head_dim = _dims(model.config)
    param = next(model.parameters())
    if prefix is None:
        if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"{who}: num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
        encoder = PrefixEncoder(num_layers, num_kv_heads, head_dim, num_virtual_tokens, projection=projection,
                                hidden_size=hidden_size, projection_hidden=projection_hidden or 512,
                                device=param.device)
    elif isinstance(prefix, nn.Module):
        encoder = prefix.to(param.device)
    else:
        encoder = PrefixParameters(prefix).to(param.device)
    with torch.no_grad():
        P = check_prefixes(encoder(), num_layers, num_kv_heads, head_dim, who=f"{who} ({type(encoder).__name__})")
    train_names = _resolve_train_modules(model, train_modules)

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    model.add_module(ENCODER_ATTR, encoder)
    encoder.requires_grad_(True)
    for name in train_names:
        model.get_submodule(name).requires_grad_(True)

    _register()
    original = model.config._attn_implementation
    state = _PrefixState(encoder, num_layers, num_kv_heads, head_dim, P, method, original, train_names,
                         requires_grad, bool(ignore_attention_dropout))
    for module in attention:
        setattr(module, _LAYER_ATTR, (state, module.layer_idx))
    setattr(model, _STATE_ATTR, state)
    try:
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    except Exception:
        remove_prefix(model)
        raise
    state.current_attn = model.config._attn_implementation
    if state.current_attn != ATTN_IMPLEMENTATION:
        remove_prefix(model)
        raise NotImplementedError(
            f"{who}: {type(model).__name__} refused attn_implementation={ATTN_IMPLEMENTATION!r}; its attention does "
            "not go through transformers' AttentionInterface"
        )
    # The hooks find the state through the module they run on (no closures), so copy.deepcopy(model) gives the copy
    # its own state, wired to its own encoder.
    base = model.base_model
    setattr(base, _STATE_ATTR, state)
    base.register_forward_pre_hook(_before_forward)
    base.register_forward_hook(_after_forward)
    return model


def _before_forward(module, args):
    getattr(module, _STATE_ATTR).begin_forward()


def _after_forward(module, args, output):
    state = getattr(module, _STATE_ATTR)
    state.current_attn = module.config._attn_implementation
    state.end_forward(type(module).__name__)


def remove_prefix(model):
    """Undo apply_prefix_tuning / apply_p_tuning_v2: drop the encoder and hooks, restore the attention
    implementation and every parameter's requires_grad. Returns ``model``."""
    state = _state(model, "remove_prefix")
    base = model.base_model
    for hooks, fn in ((base._forward_pre_hooks, _before_forward), (base._forward_hooks, _after_forward)):
        for key in [k for k, h in hooks.items() if h is fn]:  # found by identity: survives copy.deepcopy(model)
            del hooks[key]
    for module in model.modules():
        for attr in (_LAYER_ATTR, _STATE_ATTR):
            if attr in module.__dict__:
                delattr(module, attr)
    delattr(model, ENCODER_ATTR)
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        _set_attn_implementation(model, state.original_attn)
    for name, p in model.named_parameters():
        if name in state.requires_grad:
            p.requires_grad_(state.requires_grad[name])
    return model


def _encoder_config(state: _PrefixState, model) -> dict:
    enc = state.encoder
    cfg = {
        "format": "peft_kernels.prefix",
        "format_version": 1,
        "method": state.method,
        "encoder": type(enc).__name__,
        "model_type": _model_type(model),
        "num_layers": state.num_layers,
        "num_kv_heads": state.num_kv_heads,
        "head_dim": state.head_dim,
        "num_virtual_tokens": state.num_virtual_tokens,
        "train_modules": list(state.train_modules),
        "ignore_attention_dropout": state.ignore_attention_dropout,
    }
    if isinstance(enc, PrefixEncoder):
        cfg.update(projection=enc.projection, hidden_size=enc.hidden_size, projection_hidden=enc.projection_hidden)
    return cfg


def save_prefix(model, path: str | os.PathLike) -> None:
    """Write the prefix (and the ``train_modules`` weights) to directory ``path``: ``prefix_model.safetensors``
    (keys ``prefix.<encoder param>``, ``modules.<model param>``) and ``prefix_config.json``."""
    from safetensors.torch import save_file

    state = _state(model, "save_prefix")
    tensors = {f"prefix.{k}": v.detach().contiguous().cpu() for k, v in state.encoder.state_dict().items()}
    for name in state.train_modules:
        for k, v in model.get_submodule(name).state_dict().items():
            tensors[f"modules.{name}.{k}"] = v.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(_encoder_config(state, model), f, indent=2)


def load_prefix(model, path: str | os.PathLike):
    """Load a :func:`save_prefix` directory into ``model``: applies the saved method first if the model has no
    prefix yet, else checks that its prefix matches the saved one. Returns ``model``."""
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_NAME)) as f:
        cfg = json.load(f)
    if cfg.get("format") != "peft_kernels.prefix":
        raise ValueError(f"load_prefix: {path} is not a peft_kernels prefix checkpoint ({CONFIG_NAME} format)")
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    enc_sd = {k[len("prefix."):]: v for k, v in tensors.items() if k.startswith("prefix.")}
    mod_sd = {k[len("modules."):]: v for k, v in tensors.items() if k.startswith("modules.")}
    if cfg["model_type"] != _model_type(model):
        raise ValueError(f"load_prefix: the prefix was saved from a {cfg['model_type']!r} model, "
                         f"this one is {_model_type(model)!r}")
    state = get_prefix_state(model)
    if state is None:
        kw = {"train_modules": cfg["train_modules"], "ignore_attention_dropout": cfg["ignore_attention_dropout"]}
        if cfg["encoder"] == "PrefixParameters":
            L = cfg["num_layers"]
            kw["prefix"] = [(enc_sd[f"keys.{i}"], enc_sd[f"values.{i}"]) for i in range(L)]
        elif cfg["encoder"] != "PrefixEncoder":
            raise ValueError(f"load_prefix: the prefix was saved from a custom {cfg['encoder']} encoder; apply it to "
                             "the model (apply_prefix_tuning(model, prefix=...)) before load_prefix")
        if cfg["method"] == "p_tuning_v2":
            apply_p_tuning_v2(model, cfg["num_virtual_tokens"], **kw)
        else:
            apply_prefix_tuning(model, cfg["num_virtual_tokens"], cfg.get("projection", True),
                                cfg.get("projection_hidden") or 512, hidden_size=cfg.get("hidden_size"), **kw)
        state = get_prefix_state(model)
    else:
        mine = _encoder_config(state, model)
        for k in ("encoder", "num_layers", "num_kv_heads", "head_dim", "num_virtual_tokens", "projection",
                  "hidden_size", "projection_hidden"):
            if mine.get(k) != cfg.get(k):
                raise ValueError(f"load_prefix: the model's prefix has {k}={mine.get(k)!r}, the checkpoint "
                                 f"{k}={cfg.get(k)!r}")
    state.encoder.load_state_dict(enc_sd)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    missing = [k for k in mod_sd if k not in params]
    if missing:
        raise ValueError(f"load_prefix: {type(model).__name__} has no parameters {missing} (saved train_modules)")
    with torch.no_grad():
        for k, v in mod_sd.items():
            params[k].copy_(v)
    return model


__all__ = [
    "ATTN_IMPLEMENTATION",
    "SELF_ATTENTION_CLASSES",
    "apply_p_tuning_v2",
    "apply_prefix_tuning",
    "get_prefix_state",
    "load_prefix",
    "prefix_attention_forward",
    "remove_prefix",
    "save_prefix",
]
