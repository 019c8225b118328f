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
sees all P of them. Positions of the real tokens are an explicit option, ``positions=``:

* ``"model"`` (default for apply_prefix_tuning / apply_p_tuning_v2): the model's own positions 0..L-1, as without a
  prefix;
* ``"peft"``: HF peft's convention, P..P+L-1 (peft's prefix sits in the KV cache, so the model counts it): the
  position ids the model would use (given ones included) are shifted by P. patch_peft_prefix_model and checkpoints
  loaded from peft get this one, so their outputs and ``generate()`` tokens are peft's.

During generation the KV cache holds only real keys; the prefix is added in every step. Sliding-window layers are
exact where the window cannot cut into the prefix and the keys (P + keys <= window: peft, which counts the prefix
inside the window, sees the same keys) and refused with an error otherwise. Logit soft-capping (Gemma 2) runs an
explicit, unfused path. Gradient checkpointing works (the prefix is computed once per forward, outside the layers).
"""

from __future__ import annotations

import inspect
import os
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peft_kernels.nn.prefix import PrefixEncoder, PrefixParameters
from peft_kernels.ops.prefix_attention import prefix_attention, prefix_attention_mask
from peft_kernels.patch import _io, _methods, _save_pretrained, prefix_rows

ATTN_IMPLEMENTATION = "peft_kernels_prefix"
ENCODER_ATTR = "peft_kernels_prefix"
_STATE_ATTR = "_peft_kernels_prefix_state"
_LAYER_ATTR = "_peft_kernels_prefix_layer"
WEIGHTS_NAME = "prefix_model.safetensors"
CONFIG_NAME = "prefix_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
POSITIONS = ("model", "peft")

# model_type -> class name of its self-attention module. Each was checked to call its attention function through
# transformers' ALL_ATTENTION_FUNCTIONS with query/key/value [B, H, L, D] (after rotary, after the cache update).
SELF_ATTENTION_CLASSES = {
    "llama": "LlamaAttention",
    "mistral": "MistralAttention",
    "qwen2": "Qwen2Attention",
    "qwen3": "Qwen3Attention",
    "phi3": "Phi3Attention",
    "gemma2": "Gemma2Attention",
    "gemma3_text": "Gemma3Attention",
    "gpt2": "GPT2Attention",
    "bert": "BertSelfAttention",
    "roberta": "RobertaSelfAttention",
}
_ENCODER_TYPES = ("bert", "roberta")


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
    positions: str = "model"
    current_attn: str | None = None
    mode: str = "fused"  # "explicit": always SDPA over the concatenated K/V (the tests' reference path)
    prefix: list | None = None
    grad_prefix: list | None = None  # the last prefix computed with grad: what a reentrant checkpoint recomputes with
    prefix_key: tuple | None = None
    mask_cache: tuple | None = None
    seen: set = field(default_factory=set)
    warned: set = field(default_factory=set)

    def __getstate__(self):
        # copy.deepcopy / pickle of the model: leave out the last forward's prefix (graph tensors) and mask cache.
        return {**self.__dict__, "prefix": None, "grad_prefix": None, "prefix_key": None, "mask_cache": None,
                "seen": set()}

    def begin_forward(self) -> None:
        """Compute every layer's prefix once for this model forward (reused when nothing changed and no grad)."""
        self.seen = set()
        self.mask_cache = None
        enc = self.encoder
        params = list(enc.source_parameters() if isinstance(enc, _PeftPromptSource) else enc.parameters())
        key = tuple((id(p), p._version, p.device, p.dtype) for p in params)
        if torch.is_grad_enabled() or self.prefix is None or key != self.prefix_key:
            prefix = self.encoder()
            check_prefixes(prefix, self.num_layers, self.num_kv_heads, self.head_dim, who=type(self.encoder).__name__)
            self.prefix = prefix
            # Cached only when computed without grad: a graph-carrying prefix must be rebuilt every forward.
            self.prefix_key = None if torch.is_grad_enabled() else key
            if torch.is_grad_enabled():
                self.grad_prefix = prefix

    def layer_prefix(self, layer: int):
        """The prefix a layer attends over now. With grad enabled that is the last prefix computed with grad: a
        reentrant activation checkpoint recomputes its layers inside the backward, possibly after a no-grad forward
        (an evaluation) replaced ``prefix``; its gradient must still reach the encoder (it was lost, silently)."""
        if torch.is_grad_enabled() and self.grad_prefix is not None:
            return self.grad_prefix[layer]
        return self.prefix[layer]

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
    prefix_k, prefix_v = state.layer_prefix(layer)
    # A model split over devices (device_map) runs layers away from the encoder; the prefix is tiny to move.
    prefix_k, prefix_v = prefix_k.to(query.device), prefix_v.to(query.device)
    is_causal = kwargs.get("is_causal")
    hint = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    B, Lq, Lk = query.shape[0], query.shape[2], key.shape[2]
    decoded = state.decode_mask(attention_mask, B, Lq, Lk, hint, where)
    if decoded is not None and decoded[2] < Lk:
        key, value = key[:, :, : decoded[2]], value[:, :, : decoded[2]]
    _check_sliding_window(kwargs.get("sliding_window"), prefix_k.shape[1], key.shape[2], where)
    use_dropout = dropout > 0 and not state.ignore_attention_dropout
    softcap = kwargs.get("softcap")
    if softcap is not None:
        state.warn_once("softcap", (
            f"peft_kernels prefix attention: {where} soft-caps its attention logits ({softcap}), which the fused op "
            "does not implement, so it runs unfused (eager attention over the concatenated prefix and keys)"))
        mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
        out = _softcap_prefix_attention(query, key, value, prefix_k, prefix_v, mask, hint, scaling, softcap,
                                        dropout if use_dropout else 0.0)
        return out.transpose(1, 2), None
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
    # [B, Lq, H, D]: transformers reshapes it to [B, Lq, H * D], free when the op kept the query's HF layout.
    return out.transpose(1, 2), None


def _check_sliding_window(window, P: int, Lk: int, where: str) -> None:
    if window is None or P + Lk <= window:
        return
    raise ValueError(
        f"peft_kernels prefix attention ({where}): this layer's sliding window of {window} tokens is shorter than the "
        f"{P} prefix tokens plus {Lk} keys. Inside such a window HF peft hides its prefix (kept in the KV cache) from "
        f"queries more than {window} positions after it, while the prefix op shows every query the whole prefix; "
        f"rather than compute something else, this is refused. Keep sequences (cache included) within {window - P} "
        "tokens, or use a config with sliding_window >= P + sequence length."
    )


def _softcap_prefix_attention(query, key, value, prefix_k, prefix_v, attention_mask, causal, scaling, softcap,
                              dropout):
    """Eager attention over [prefix; keys] with logit soft-capping (as transformers' Gemma 2 eager attention)."""
    B, Hq, Lq, D = query.shape
    Hkv, Lk, P = key.shape[1], key.shape[2], prefix_k.shape[1]
    K = torch.cat([prefix_k.to(key.dtype).expand(B, -1, -1, -1), key], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    V = torch.cat([prefix_v.to(value.dtype).expand(B, -1, -1, -1), value], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    scores = (query @ K.transpose(-1, -2)) * (D**-0.5 if scaling is None else scaling)
    scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        allowed = prefix_attention_mask(B, Lq, Lk, P, causal and Lq > 1, None, query.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        pre = attention_mask.new_ones(*attention_mask.shape[:3], P)
        scores = scores.masked_fill(~torch.cat([pre, attention_mask], -1), float("-inf"))
    else:
        scores = scores + torch.cat([attention_mask.new_zeros(*attention_mask.shape[:3], P), attention_mask], -1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return probs @ V


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
def _model_type(model, allow_peft_base: bool = False) -> str:
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, nn.Module):
        raise TypeError(f"peft_kernels prefix tuning needs a transformers PreTrainedModel, got {type(model).__name__}")
    if not allow_peft_base and (type(model).__name__.startswith("Peft") or hasattr(model, "peft_config")):
        raise TypeError(
            "peft_kernels prefix tuning applies to a plain transformers model, not a peft model; for a peft "
            "PrefixTuningConfig model use patch_peft_prefix_model(peft_model) (or patch_peft_model)"
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
    positions: str = "model",
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
    ``positions``: ``"model"`` (real tokens at the model's own positions 0..L-1) or ``"peft"`` (HF peft's P..P+L-1;
    see the module doc).
    """
    return _apply(model, "prefix_tuning", num_virtual_tokens, projection, projection_hidden, hidden_size,
                  train_modules, prefix, ignore_attention_dropout, "apply_prefix_tuning", positions=positions)


def apply_p_tuning_v2(model, num_virtual_tokens: int = 32, train_modules=None, *, prefix=None,
                      ignore_attention_dropout: bool = False, positions: str = "model"):
    """P-Tuning v2 (deep prompt tuning): per-layer trainable prefixes without reparameterization; for
    ``*ForSequenceClassification`` models the classification head trains as well (see :func:`apply_prefix_tuning`,
    also for ``positions``)."""
    return _apply(model, "p_tuning_v2", num_virtual_tokens, False, None, None, train_modules, prefix,
                  ignore_attention_dropout, "apply_p_tuning_v2", positions=positions)


def _check_positions(positions, who: str) -> str:
    if positions not in POSITIONS:
        raise ValueError(f"{who}: positions must be one of {POSITIONS} (the model's own positions, or HF peft's "
                         f"shifted by P), got {positions!r}")
    return positions


# The names the method record (patch/_methods.py) knows these by.
_METHOD = {"prefix_tuning": "prefix", "p_tuning_v2": "p_tuning_v2"}


def _apply(model, method, num_virtual_tokens, projection, projection_hidden, hidden_size, train_modules, prefix,
           ignore_attention_dropout, who, *, positions="model", freeze=True, peft_base=False):
    positions = _check_positions(positions, who)
    model_type = _model_type(model, allow_peft_base=peft_base)
    if positions == "peft" and model_type in _ENCODER_TYPES:
        raise NotImplementedError(f"{who}: positions='peft' is for decoders; HF peft cannot prefix-tune "
                                  f"{model_type} models (they take no KV cache)")
    if get_prefix_state(model) is not None:
        raise ValueError(f"{who}: {type(model).__name__} already has a prefix; call remove_prefix(model) first")
    if not peft_base:  # (a peft model's own base is served by patch_peft_prefix_model, not guarded against peft)
        _methods.check_compatible(model, _METHOD[method], owner=who)
    attention = _find_attention(model, model_type)
    num_layers, num_kv_heads, head_dim = _dims(model.config)
    param = next(model.parameters())
    if prefix is None:
        if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"{who}: num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
        encoder = PrefixEncoder(num_layers, num_kv_heads, head_dim, num_virtual_tokens, projection=projection,
                                hidden_size=hidden_size,
                                projection_hidden=512 if projection_hidden is None else projection_hidden,
                                device=param.device)
    elif isinstance(prefix, nn.Module):
        encoder = prefix if isinstance(prefix, _PeftPromptSource) else prefix.to(param.device)
    else:
        encoder = PrefixParameters(prefix).to(param.device)
    with torch.no_grad():
        P = check_prefixes(encoder(), num_layers, num_kv_heads, head_dim, who=f"{who} ({type(encoder).__name__})")
    train_names = _methods.resolve_train_modules(model, train_modules)

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if freeze:  # (a peft model arrives frozen by peft, its modules_to_save trainable: left as peft set them)
        model.requires_grad_(False)
    model.add_module(ENCODER_ATTR, encoder)
    encoder.requires_grad_(True)
    for name in train_names:
        model.get_submodule(name).requires_grad_(True)

    _register()
    original = model.config._attn_implementation
    state = _PrefixState(encoder, num_layers, num_kv_heads, head_dim, P, method, original, train_names,
                         requires_grad, bool(ignore_attention_dropout), positions)
    for module in attention:
        setattr(module, _LAYER_ATTR, (state, module.layer_idx))
    setattr(model, _STATE_ATTR, state)
    prefix_rows.install(attention, P)
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
    if positions == "peft":
        base.register_forward_pre_hook(_shift_positions, with_kwargs=True)
    if not peft_base:
        _methods.register_method(model, _METHOD[method], {"num_virtual_tokens": P, "positions": positions})
        _save_pretrained.install(model, _METHOD[method])
    return model


def _shift_positions(module, args, kwargs):
    """positions="peft": the position ids the model would use, shifted by P (peft's prefix sits at 0..P-1)."""
    P = getattr(module, _STATE_ATTR).num_virtual_tokens
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        cache_position = kwargs.get("cache_position")
        if cache_position is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            x = ids if ids is not None else kwargs.get("inputs_embeds")
            if x is None:
                return None
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            cache_position = torch.arange(past, past + x.shape[1], device=x.device)
        position_ids = cache_position.unsqueeze(0)
    return args, {**kwargs, "position_ids": position_ids + P}


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
    _methods.check_removable(model, _METHOD[state.method], owner="remove_prefix")
    base = model.base_model
    for hooks, fn in ((base._forward_pre_hooks, _before_forward), (base._forward_hooks, _after_forward),
                      (base._forward_pre_hooks, _shift_positions)):
        for key in [k for k, h in hooks.items() if h is fn]:  # found by identity: survives copy.deepcopy(model)
            del hooks[key]
            base._forward_pre_hooks_with_kwargs.pop(key, None)
    prefix_rows.remove(model)
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
    _methods.unregister_method(model, _METHOD[state.method])
    _save_pretrained.uninstall(model, _METHOD[state.method])
    return model


# --------------------------------------------------------------------------------------------------
# HF peft models: PrefixTuningConfig (Prefix-Tuning, and P-Tuning v2 as peft makes it: prefix_projection=False)
# --------------------------------------------------------------------------------------------------
class _PeftPromptSource(nn.Module):
    """peft's own prompt encoder, read as (prefix_k, prefix_v) pairs the way peft's get_prompt lays them out
    ([P, 2 * layers * Hkv * D] -> per layer K, V of [Hkv, P, D]). It holds no parameters of its own: the prompt
    encoder stays peft's (its state dict, optimizer and save_pretrained are untouched), referenced, not registered."""

    def __init__(self, peft_model, adapter: str) -> None:
        super().__init__()
        object.__setattr__(self, "_peft_model", peft_model)
        self.adapter = adapter

    def source_parameters(self):
        return self._peft_model.prompt_encoder[self.adapter].parameters()

    def forward(self) -> list[tuple[Tensor, Tensor]]:
        peft_model = self._peft_model
        config = peft_model.peft_config[self.adapter]
        encoder = peft_model.prompt_encoder[self.adapter]
        P, L, H = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        if config.inference_mode:
            x = encoder.embedding.weight
        else:
            tokens = peft_model.prompt_tokens[self.adapter][:P].to(encoder.embedding.weight.device)
            x = encoder(tokens[None])[0]
        x = x.view(P, 2 * L, H, config.token_dim // H).permute(1, 2, 0, 3)  # [2L, Hkv, P, D], peft's order
        return [(x[2 * i], x[2 * i + 1]) for i in range(L)]


def _peft_prefix_config(peft_model, who: str):
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(peft_model, "get_base_model"):
        raise TypeError(f"{who}: expected a peft PeftModel, got {type(peft_model).__name__}")
    adapter = peft_model.active_adapter
    config = configs[adapter]
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type != "PREFIX_TUNING" or not hasattr(peft_model, "prompt_encoder"):
        raise TypeError(f"{who}: the active adapter {adapter!r} is {peft_type}, not PREFIX_TUNING")
    if config.num_transformer_submodules != 1:
        raise NotImplementedError(f"{who}: encoder-decoder prefix tuning (num_transformer_submodules="
                                  f"{config.num_transformer_submodules}) is not supported")
    return adapter, config


def patch_peft_prefix_model(peft_model, *, positions: str = "peft", ignore_attention_dropout: bool = False):
    """Run a peft ``PrefixTuningConfig`` model (Prefix-Tuning, or P-Tuning v2 made with ``prefix_projection=False``)
    through the fused prefix op, with peft's outputs: peft's own prompt encoder gives the prefix, real tokens get
    peft's positions (``positions="peft"``, the default here; ``"model"`` keeps the model's own), ``generate()``
    works, and so does gradient checkpointing (peft's prefix cache refuses it). The peft model keeps its
    parameters, trainable flags and ``save_pretrained``. Undo with :func:`unpatch_peft_prefix_model`.
    Returns ``peft_model``."""
    who = "patch_peft_prefix_model"
    adapter, config = _peft_prefix_config(peft_model, who)
    if getattr(peft_model, "_peft_kernels_prefix_patched", False):
        raise ValueError(f"{who}: {type(peft_model).__name__} is patched already")
    base = peft_model.get_base_model()
    model_type = _model_type(base, allow_peft_base=True)
    if model_type in _ENCODER_TYPES:
        raise NotImplementedError(f"{who}: HF peft cannot prefix-tune {model_type} (it needs a KV cache); use "
                                  "apply_prefix_tuning on the plain model instead")
    source = _PeftPromptSource(peft_model, adapter)
    method = "prefix_tuning" if config.prefix_projection and not config.inference_mode else "p_tuning_v2"
    _apply(base, method, config.num_virtual_tokens, False, None, None, [], source, ignore_attention_dropout, who,
           positions=positions, freeze=False, peft_base=True)
    get_prefix_state(base).requires_grad = {}  # peft owns the trainable flags: remove_prefix leaves them
    try:
        peft_model.forward = types.MethodType(_peft_forward, peft_model)
        # peft's generate installs this on the base model: the base model's own (no prefix cache injected). Only
        # the causal-LM peft classes have one (a sequence classifier does not generate).
        original_prepare = getattr(peft_model, "base_model_prepare_inputs_for_generation", None)
        if original_prepare is not None:
            peft_model.prepare_inputs_for_generation = original_prepare
    except BaseException:  # nothing half-patched left behind
        for attr in ("forward", "prepare_inputs_for_generation"):
            peft_model.__dict__.pop(attr, None)
        remove_prefix(base)
        raise
    peft_model._peft_kernels_prefix_patched = True
    return peft_model


def _peft_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                  output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    """A patched peft prefix model's forward: the base model directly; the prefix comes from the registered attention
    function (no prefix cache, no extended attention mask), positions from the patch's option."""
    for name, value in (("output_attentions", output_attentions), ("output_hidden_states", output_hidden_states),
                        ("return_dict", return_dict), ("labels", labels)):
        if value is not None:
            kwargs[name] = value
    return self.get_base_model()(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                 **kwargs)


def unpatch_peft_prefix_model(peft_model):
    """Undo :func:`patch_peft_prefix_model`: peft's own prefix-cache forward again. Returns ``peft_model``."""
    if not peft_model.__dict__.pop("_peft_kernels_prefix_patched", False):
        raise ValueError(f"unpatch_peft_prefix_model: {type(peft_model).__name__} is not patched")
    for attr in ("forward", "prepare_inputs_for_generation"):
        peft_model.__dict__.pop(attr, None)
    remove_prefix(peft_model.get_base_model())
    return peft_model


# --------------------------------------------------------------------------------------------------
# Checkpoints: peft_kernels' format and HF peft's
# --------------------------------------------------------------------------------------------------
def _encoder_config(state: _PrefixState, model) -> dict:
    enc = state.encoder
    cfg = {
        "format": "peft_kernels.prefix",
        "format_version": 2,
        "method": state.method,
        "encoder": type(enc).__name__,
        "model_type": _model_type(model, allow_peft_base=True),
        "num_layers": state.num_layers,
        "num_kv_heads": state.num_kv_heads,
        "head_dim": state.head_dim,
        "num_virtual_tokens": state.num_virtual_tokens,
        "train_modules": list(state.train_modules),
        "ignore_attention_dropout": state.ignore_attention_dropout,
        "positions": state.positions,
    }
    if isinstance(enc, PrefixEncoder):
        cfg.update(projection=enc.projection, hidden_size=enc.hidden_size, projection_hidden=enc.projection_hidden)
    return cfg


def _stacked_prefix(state: _PrefixState) -> Tensor:
    """The prefix as peft stores it: [P, 2 * layers * Hkv * D] (the projection MLP, if any, folded in)."""
    with torch.no_grad():
        pairs = state.encoder()
    x = torch.stack([t for pair in pairs for t in pair])  # [2L, Hkv, P, D]
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], -1).detach().float().contiguous().cpu()


def _peft_task_type(model) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else "FEATURE_EXTRACTION"


def save_prefix(model, path: str | os.PathLike, *, format: str = "peft_kernels") -> None:  # noqa: A002
    """Write the prefix to directory ``path``, atomically (a failed save leaves the old files).

    ``format="peft_kernels"``: ``prefix_model.safetensors`` (``prefix.<encoder param>`` and, for the checkpoint's
    ``train_modules`` only, ``modules.<name>.<param>``) + ``prefix_config.json`` (the method, encoder and position
    convention). ``format="peft"``: HF peft's ``adapter_model.safetensors`` (``prompt_embeddings``: the prefix with
    any projection MLP folded in, as peft saves it) + ``adapter_config.json`` (PREFIX_TUNING), loadable by
    ``PeftModel.from_pretrained``; trained modules are written as peft's ``modules_to_save``. Only a decoder
    model with ``positions="peft"`` saves in peft's format (peft would run any other with other outputs)."""
    state = _state(model, "save_prefix")
    if format == "peft":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in _ENCODER_TYPES:
            raise ValueError(f"save_prefix: format='peft' cannot hold a {model_type!r} prefix: HF peft cannot "
                             "prefix-tune encoder models (they take no KV cache); save with format='peft_kernels'")
        if state.positions != "peft":
            raise ValueError("save_prefix: format='peft' is run by peft with its own positions (real tokens at "
                             f"P..P+L-1), but this model uses positions={state.positions!r}: peft would give other "
                             "outputs. Save with format='peft_kernels' (it records the convention), or train with "
                             "positions='peft' to share the prefix with peft")
        num_heads = state.num_kv_heads
        tensors = {"prompt_embeddings": _stacked_prefix(state)}
        for name in state.train_modules:
            for k, v in model.get_submodule(name).state_dict().items():
                tensors[f"base_model.model.{name}.{k}"] = v.detach().contiguous().cpu()
        enc = state.encoder
        config = {
            "peft_type": "PREFIX_TUNING",
            "task_type": _peft_task_type(model),
            "auto_mapping": None,
            "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
            "revision": None,
            "inference_mode": True,
            "num_virtual_tokens": state.num_virtual_tokens,
            "token_dim": num_heads * state.head_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": num_heads,
            "num_layers": state.num_layers,
            "encoder_hidden_size": getattr(enc, "projection_hidden", None) or num_heads * state.head_dim,
            "prefix_projection": bool(getattr(enc, "projection", False)),
            "modules_to_save": [n.split(".")[-1] for n in state.train_modules] or None,
            "init_weights": None,
        }
        with _io.atomic_files(path, owner="save_prefix") as out:
            out.save_safetensors(PEFT_WEIGHTS_NAME, tensors, metadata={"format": "pt"})
            out.write_json(PEFT_CONFIG_NAME, config)
        return
    if format != "peft_kernels":
        raise ValueError(f"save_prefix: format must be 'peft_kernels' or 'peft', got {format!r}")
    tensors = {f"prefix.{k}": v.detach().contiguous().cpu() for k, v in state.encoder.state_dict().items()}
    for name in state.train_modules:
        for k, v in model.get_submodule(name).state_dict().items():
            tensors[f"modules.{name}.{k}"] = v.detach().contiguous().cpu()
    with _io.atomic_files(path, owner="save_prefix") as out:
        out.save_safetensors(WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        out.write_json(CONFIG_NAME, _encoder_config(state, model))


def _need(cfg: dict, key: str, path: str, types_=None):
    if key not in cfg:
        raise ValueError(f"load_prefix: {path} has no {key!r} entry (keys: {', '.join(sorted(cfg)) or 'none'}); "
                         "the file is not a complete prefix checkpoint")
    value = cfg[key]
    if types_ is not None and not isinstance(value, types_):
        raise ValueError(f"load_prefix: {path}: {key!r} is {value!r}, expected {types_}")
    return value


def _check_dims(cfg_dims: dict, model, path: str) -> None:
    num_layers, num_kv_heads, head_dim = _dims(model.config)
    mine = {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    for k, v in cfg_dims.items():
        if k in mine and v != mine[k]:
            raise ValueError(f"load_prefix: {path} has {k}={v}, the model {type(model).__name__} has {k}={mine[k]}")


def _module_tensors(model, mods: dict, train_modules: list, path: str) -> dict:
    """Check the checkpoint's module entries: only under its train_modules, each an existing tensor of that shape."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for key, value in mods.items():
        if not any(key.startswith(name + ".") for name in train_modules):
            raise ValueError(f"load_prefix: {path}: entry {key!r} is not under the checkpoint's train_modules "
                             f"{train_modules}; refusing to overwrite a parameter the checkpoint does not train")
        if key not in params:
            raise ValueError(f"load_prefix: {path}: {type(model).__name__} has no parameter {key!r} "
                             f"(saved train_modules {train_modules})")
        if tuple(params[key].shape) != tuple(value.shape):
            raise ValueError(f"load_prefix: {path}: {key!r} has shape {tuple(value.shape)}, the model's "
                             f"{tuple(params[key].shape)}")
    return params


def _read_peft_checkpoint(model, path: str):
    """(encoder or prefix pairs, train_modules, module tensors) from a peft PREFIX_TUNING checkpoint, checked."""
    cfg_path, weights_path = os.path.join(path, PEFT_CONFIG_NAME), os.path.join(path, PEFT_WEIGHTS_NAME)
    cfg = _io.read_json(cfg_path, owner="load_prefix")
    peft_type = _need(cfg, "peft_type", cfg_path)
    if peft_type != "PREFIX_TUNING":
        raise ValueError(f"load_prefix: {cfg_path} is a {peft_type} adapter, not PREFIX_TUNING")
    P = _need(cfg, "num_virtual_tokens", cfg_path, int)
    L = _need(cfg, "num_layers", cfg_path, int)
    H = _need(cfg, "num_attention_heads", cfg_path, int)
    token_dim = _need(cfg, "token_dim", cfg_path, int)
    if _need(cfg, "num_transformer_submodules", cfg_path, int) != 1:
        raise ValueError(f"load_prefix: {cfg_path}: encoder-decoder prefix checkpoints are not supported")
    if H < 1 or token_dim % H:
        raise ValueError(f"load_prefix: {cfg_path}: token_dim={token_dim} is not a multiple of num_attention_heads={H}")
    _check_dims({"num_layers": L, "num_kv_heads": H, "head_dim": token_dim // H}, model, cfg_path)
    tensors = _io.load_safetensors(weights_path, owner="load_prefix")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"load_prefix: {weights_path} has no 'prompt_embeddings' tensor (has {sorted(tensors)})")
    emb = tensors.pop("prompt_embeddings")
    if tuple(emb.shape) != (P, 2 * L * token_dim):
        raise ValueError(f"load_prefix: {weights_path}: prompt_embeddings has shape {tuple(emb.shape)}, the config "
                         f"says [num_virtual_tokens, 2 * num_layers * token_dim] = [{P}, {2 * L * token_dim}]")
    mods = {}
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        mods[name.replace(".modules_to_save.default.", ".")] = value
    to_save = cfg.get("modules_to_save") or []
    train_modules = _methods.resolve_train_modules(model, to_save) if to_save else []
    _module_tensors(model, mods, train_modules, weights_path)
    encoder = PrefixEncoder(L, H, token_dim // H, P, projection=False)
    with torch.no_grad():
        encoder.embedding.weight.copy_(emb.float())
    return encoder, train_modules, mods


def load_prefix(model, path: str | os.PathLike, *, positions: str | None = None):
    """Load a prefix checkpoint into ``model``: peft_kernels' own (:func:`save_prefix`) or HF peft's
    (``adapter_config.json`` with ``peft_type: PREFIX_TUNING`` + ``adapter_model.safetensors``).

    A model without a prefix gets the saved method applied first; one with a prefix must match the checkpoint.
    ``positions``: the position convention (see the module doc); default: the checkpoint's (``"peft"`` for peft
    checkpoints). peft stores the prefix with the projection MLP folded in, so a peft checkpoint loads as a static
    prefix (P-Tuning-v2-style parameters). Everything is read and checked before the model is touched: a failed
    load raises ValueError naming the file and the mismatch and leaves the model exactly as it was (its
    state_dict, attention implementation, trainable flags and any prefix it had). Only the modules the checkpoint's
    config says it trains are written. Returns ``model``."""
    path = os.fspath(path)
    ours = os.path.exists(os.path.join(path, CONFIG_NAME))
    if not ours and not os.path.exists(os.path.join(path, PEFT_CONFIG_NAME)):
        raise FileNotFoundError(f"load_prefix: {path} has neither {CONFIG_NAME} (peft_kernels) nor "
                                f"{PEFT_CONFIG_NAME} (HF peft)")
    model_type = _model_type(model)
    state = get_prefix_state(model)
    if ours:
        plan = _read_own_checkpoint(model, path, model_type)
    else:
        encoder, train_modules, mods = _read_peft_checkpoint(model, path)
        plan = {"method": "p_tuning_v2", "encoder": encoder, "enc_sd": encoder.state_dict(), "mods": mods,
                "train_modules": train_modules, "positions": "peft", "ignore_attention_dropout": False,
                "cfg": {"encoder": "PrefixEncoder", "num_virtual_tokens": encoder.num_virtual_tokens,
                        "projection": False, "hidden_size": encoder.hidden_size, "projection_hidden": None},
                "file": os.path.join(path, PEFT_WEIGHTS_NAME)}
    positions = _check_positions(plan["positions"] if positions is None else positions, "load_prefix")
    if state is not None:
        _check_loaded_into_existing(state, model, plan, positions)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    # Everything is checked: from here on nothing can fail on the checkpoint's account.
    if state is None:
        kw = {"train_modules": plan["train_modules"], "ignore_attention_dropout": plan["ignore_attention_dropout"],
              "positions": positions}
        if plan["method"] == "p_tuning_v2":
            apply_p_tuning_v2(model, prefix=plan["encoder"], **kw)
        else:
            apply_prefix_tuning(model, prefix=plan["encoder"], **kw)
    else:
        state.encoder.load_state_dict(plan["enc_sd"])
    with torch.no_grad():
        for k, v in plan["mods"].items():
            params[k].copy_(v)
    return model


def _read_own_checkpoint(model, path: str, model_type: str) -> dict:
    cfg_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    cfg = _io.read_json(cfg_path, owner="load_prefix")
    if cfg.get("format") != "peft_kernels.prefix":
        raise ValueError(f"load_prefix: {cfg_path} is not a peft_kernels prefix checkpoint (format "
                         f"{cfg.get('format')!r})")
    saved_type = _need(cfg, "model_type", cfg_path, str)
    if saved_type != model_type:
        raise ValueError(f"load_prefix: {cfg_path}: the prefix was saved from a {saved_type!r} model, this one is "
                         f"{model_type!r}")
    method = _need(cfg, "method", cfg_path, str)
    enc_name = _need(cfg, "encoder", cfg_path, str)
    L = _need(cfg, "num_layers", cfg_path, int)
    H = _need(cfg, "num_kv_heads", cfg_path, int)
    D = _need(cfg, "head_dim", cfg_path, int)
    P = _need(cfg, "num_virtual_tokens", cfg_path, int)
    train_modules = list(_need(cfg, "train_modules", cfg_path, list))
    _check_dims({"num_layers": L, "num_kv_heads": H, "head_dim": D}, model, cfg_path)
    tensors = _io.load_safetensors(weights_path, owner="load_prefix")
    enc_sd = {k[len("prefix."):]: v for k, v in tensors.items() if k.startswith("prefix.")}
    mods = {k[len("modules."):]: v for k, v in tensors.items() if k.startswith("modules.")}
    stray = sorted(k for k in tensors if not k.startswith(("prefix.", "modules.")))
    if stray:
        raise ValueError(f"load_prefix: {weights_path}: unexpected entries {stray} (expected prefix.* and modules.*)")
    encoder = None
    if enc_name == "PrefixEncoder":
        projection = _need(cfg, "projection", cfg_path, bool)
        encoder = PrefixEncoder(L, H, D, P, projection=projection, hidden_size=cfg.get("hidden_size"),
                                projection_hidden=cfg.get("projection_hidden") or 512)
    elif enc_name == "PrefixParameters":
        missing = [f"{kind}.{i}" for i in range(L) for kind in ("keys", "values") if f"{kind}.{i}" not in enc_sd]
        if missing:
            raise ValueError(f"load_prefix: {weights_path}: missing prefix tensors {missing[:4]}")
        encoder = PrefixParameters([(enc_sd[f"keys.{i}"], enc_sd[f"values.{i}"]) for i in range(L)])
    elif get_prefix_state(model) is None:
        raise ValueError(f"load_prefix: {cfg_path}: the prefix was saved from a custom {enc_name} encoder; apply it "
                         "to the model (apply_prefix_tuning(model, prefix=...)) before load_prefix")
    if encoder is not None:
        _check_state_dict(encoder, enc_sd, weights_path)
        encoder.load_state_dict(enc_sd)
    train_modules_resolved = _methods.resolve_train_modules(model, train_modules) if train_modules else []
    _module_tensors(model, mods, train_modules_resolved, weights_path)
    return {"method": method, "encoder": encoder, "enc_sd": enc_sd, "mods": mods,
            "train_modules": train_modules_resolved, "positions": cfg.get("positions", "model"),
            "ignore_attention_dropout": bool(cfg.get("ignore_attention_dropout", False)), "cfg": cfg,
            "file": weights_path}


def _check_state_dict(module: nn.Module, sd: dict, path: str) -> None:
    mine = module.state_dict()
    if set(mine) != set(sd):
        raise ValueError(f"load_prefix: {path}: prefix entries {sorted(sd)} do not match the encoder's "
                         f"{sorted(mine)}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(mine[k].shape):
            raise ValueError(f"load_prefix: {path}: prefix.{k} has shape {tuple(v.shape)}, the model's prefix "
                             f"{tuple(mine[k].shape)}")


def _check_loaded_into_existing(state: _PrefixState, model, plan: dict, positions: str) -> None:
    mine = _encoder_config(state, model)
    cfg = plan["cfg"]
    for k in ("encoder", "num_virtual_tokens", "projection", "hidden_size", "projection_hidden"):
        if k in cfg and mine.get(k) != cfg.get(k):
            raise ValueError(f"load_prefix: {plan['file']}: the model's prefix has {k}={mine.get(k)!r}, the "
                             f"checkpoint {k}={cfg.get(k)!r} (remove_prefix(model) first to load it as saved)")
    _check_state_dict(state.encoder, plan["enc_sd"], plan["file"])
    if positions != state.positions:
        raise ValueError(f"load_prefix: {plan['file']}: the model's prefix uses positions={state.positions!r}, the "
                         f"checkpoint positions={positions!r} (remove_prefix(model) first)")


__all__ = [
    "ATTN_IMPLEMENTATION",
    "POSITIONS",
    "SELF_ATTENTION_CLASSES",
    "apply_p_tuning_v2",
    "apply_prefix_tuning",
    "get_prefix_state",
    "load_prefix",
    "patch_peft_prefix_model",
    "prefix_attention_forward",
    "remove_prefix",
    "save_prefix",
    "unpatch_peft_prefix_model",
]
