"""Prefix-augmented attention (Prefix-Tuning, P-Tuning v2).

``out = softmax(q [Pk; k]ᵀ · scale + mask) [Pv; v]`` where Pk/Pv are P trainable key/value vectors that every
query sees, and among the real keys the mask is causal (bottom-right aligned: query i sees key j iff
j <= i + Lk - Lq) and/or a key padding mask. GQA: q has Hq heads, k/v/prefix Hkv heads, Hq % Hkv == 0.

Shapes: q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D]; prefix_k, prefix_v [Hkv, P, D] (shared by the batch) or
[B, Hkv, P, D]; key_padding_mask [B, Lk] bool (True = a real token) or None. Returns [B, Hq, Lq, D].
The fused kernels never build the concatenated K/V; the reference below does, for clarity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from peft_kernels import _backends
from peft_kernels._op import OpFamily, autocast_applies, autocast_dtype, grads_may_be_views, signature
from peft_kernels.ops import _validate as val
from peft_kernels.ops.prefix_kv_buffer import is_dense, reserved_rows, same_strides, share_rows, write_prefix

OP = "prefix_attention"


# --------------------------------------------------------------------------------------------------
# Reference math
# --------------------------------------------------------------------------------------------------
def prefix_attention_mask(B, Lq, Lk, P, causal, key_padding_mask, device) -> Tensor:
    """Boolean mask [B, 1, Lq, P + Lk] over the concatenated keys (True = may attend)."""
    prefix = torch.ones(B, 1, Lq, P, dtype=torch.bool, device=device)
    real = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        real = real & (j <= i + (Lk - Lq))
    if key_padding_mask is not None:
        real = real & key_padding_mask[:, None, None, :].bool()
    return torch.cat([prefix, real], dim=-1)


def _concat_kv(k, v, prefix_k, prefix_v):
    B = k.shape[0]
    pk = prefix_k.expand(B, *prefix_k.shape) if prefix_k.dim() == 3 else prefix_k
    pv = prefix_v.expand(B, *prefix_v.shape) if prefix_v.dim() == 3 else prefix_v
    return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)


def prefix_attention_reference(q, k, v, prefix_k, prefix_v, causal=False, key_padding_mask=None, scale=None,
                               upcast=False):
    """Autograd-differentiable reference (SDPA-equivalent math on the concatenated K/V)."""
    dtype = torch.float64 if upcast else (torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    K, V = _concat_kv(k.to(dtype), v.to(dtype), prefix_k.to(dtype), prefix_v.to(dtype))
    K, V = K.repeat_interleave(Hq // Hkv, dim=1), V.repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.to(dtype) @ K.transpose(-1, -2)) * scale
    mask = prefix_attention_mask(B, Lq, Lk, P, causal, key_padding_mask, q.device)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ V).to(q.dtype)


def _dense_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Lq, D = q.shape
    Hkv, Lk, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    K, V = _concat_kv(k.to(acc), v.to(acc), prefix_k.to(acc), prefix_v.to(acc))
    K, V = K.repeat_interleave(Hq // Hkv, dim=1), V.repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.to(acc) @ K.transpose(-1, -2)) * scale
    mask = prefix_attention_mask(B, Lq, Lk, P, causal, key_padding_mask, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ V
    return out.to(q.dtype), lse.float() if acc == torch.float32 else lse


def _dense_backward(do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale):
    """FlashAttention's backward written densely: dS = P ⊙ (dP - rowsum(dO ⊙ O))."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Lq, D = q.shape
    Hkv, Lk, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    g = Hq // Hkv
    K, V = _concat_kv(k.to(acc), v.to(acc), prefix_k.to(acc), prefix_v.to(acc))
    Kr, Vr = K.repeat_interleave(g, dim=1), V.repeat_interleave(g, dim=1)
    mask = prefix_attention_mask(B, Lq, Lk, P, causal, key_padding_mask, q.device)
    scores = ((q.to(acc) @ Kr.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    probs = torch.exp(scores - lse.to(acc)[..., None])
    do_, out_ = do.to(acc), out.to(acc)
    delta = (do_ * out_).sum(-1, keepdim=True)
    dV = probs.transpose(-1, -2) @ do_                          # [B, Hq, P+Lk, D]
    dS = probs * (do_ @ Vr.transpose(-1, -2) - delta)
    dq = (dS @ Kr) * scale
    dK = (dS.transpose(-1, -2) @ q.to(acc)) * scale
    dK = dK.reshape(B, Hkv, g, P + Lk, D).sum(2)                # fold the query heads of each KV group
    dV = dV.reshape(B, Hkv, g, P + Lk, D).sum(2)
    dpk, dk = dK[:, :, :P], dK[:, :, P:]
    dpv, dv = dV[:, :, :P], dV[:, :, P:]
    if prefix_k.dim() == 3:                                     # shared prefix: sum over the batch
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype))


# --------------------------------------------------------------------------------------------------
# The family: one input record for every backend
# --------------------------------------------------------------------------------------------------
class PrefixInputs(NamedTuple):
    q: Tensor  # [B, Hq, Lq, D], any strides (transformers' [B, L, H, D] views)
    k: Tensor  # [B, Hkv, Lk, D]
    v: Tensor  # [B, Hkv, Lk, D]
    prefix_k: Tensor  # [Hkv, P, D] (shared by the batch) or [B, Hkv, P, D], any float dtype (fp32 master weights)
    prefix_v: Tensor  # like prefix_k
    causal: bool
    key_padding_mask: Tensor | None  # [B, Lk] bool, True = a real token
    scale: float


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake(inp: PrefixInputs):
    # The contract of every backend: the output is laid out like q (no layout copy), lse is contiguous.
    return torch.empty_like(inp.q), inp.q.new_empty(inp.q.shape[:-1], dtype=_lse_dtype(inp.q))


def _backward_fake(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale, needs):
    return tuple(torch.empty_like(t) if n else None for t, n in zip((q, k, v, prefix_k, prefix_v), needs))


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tune_key(inp: PrefixInputs):
    q, k, pk = inp.q, inp.k, inp.prefix_k
    grads = tuple(t.requires_grad for t in (q, k, pk))
    P = pk.shape[-2]
    # concat copies nothing
    reserved = (reserved_rows(k, P) is not None and reserved_rows(inp.v, P) is not None
                and not share_rows(k, inp.v))
    return (q.shape[0], q.shape[1], k.shape[1], _bucket(q.shape[2]), _bucket(k.shape[2]), P, q.shape[3],
            q.dtype, pk.dtype, pk.dim(), inp.causal, inp.key_padding_mask is not None, grads, reserved)


_CPU_CONCAT_CAUSAL_MAX_LK = 512  # real keys up to which causal concat (explicit mask) beats the merge on CPU


def _cpu_preference(inp) -> tuple[str, ...]:
    # Not causal: one flash call over [prefix; k] (no mask) beats the merge's elementwise passes at every size
    # measured. Causal: the CPU flash op aligns is_causal top-left, so [prefix; k] needs an explicit mask, which
    # loses at long sequences (2.7 s vs 0.8 s at L = 2048, 197 vs 148 ms at 1024) and wins at short ones (the
    # merge's extra ops: 46 vs 60 ms at L = 512, 17.5 vs 18.3 at 256, 2.0 vs 2.2 ms at 64); NOTES.md.
    if not inp.causal or inp.q.shape[2] == 1 or inp.k.shape[2] <= _CPU_CONCAT_CAUSAL_MAX_LK:
        return ("concat", "sdpa")
    return ("sdpa", "concat")


FAMILY = OpFamily(
    OP,
    PrefixInputs,
    schema="(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, bool causal, Tensor? key_padding_mask, "
    "float scale) -> (Tensor, Tensor)",
    backward_schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor out, "
    "Tensor lse, bool causal, Tensor? key_padding_mask, float scale)",
    differentiable=("q", "k", "v", "prefix_k", "prefix_v"),
    save=lambda i, out: (i.q, i.k, i.v, i.prefix_k, i.prefix_v, out[0], out[1], i.causal, i.key_padding_mask,
                         i.scale),
    fake=_fake,
    backward_fake=_backward_fake,
    public_outputs=1,
    primary="q",
    # CUDA: measured among those that serve (tune_key); CPU: the composition on the CPU flash op.
    # CPU: by a rule the CPU measurement justifies (benchmarks/NOTES.md, "Prefix attention on CPU tensors").
    preference={"cuda": ("sdpa", "triton", "concat", "cuda"), "cpu": lambda i: _cpu_preference(i)},
    autocast=("q", "k", "v"),
    tune_key=_tune_key,
    doc="softmax(q [Pk; k]^T * scale + mask) [Pv; v], the prefix always visible",
)


def _grads(grads, needs):
    return tuple(g if n else None for g, n in zip(grads, needs))


@FAMILY.forward("reference")
def _reference_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """Dense attention over the concatenated K/V (the oracle)."""
    out, lse = _dense_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)
    return _like(out, q), lse


@FAMILY.backward("reference")
def _reference_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale, needs):
    grads = _dense_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale)
    return _grads((_like(g, t) for g, t in zip(grads, (q, k, v, prefix_k, prefix_v))), needs)


# --------------------------------------------------------------------------------------------------
# Composites on PyTorch's own attention kernels: `sdpa` and `cuda` (LSE merge), `concat` (one SDPA call)
# --------------------------------------------------------------------------------------------------
# `sdpa` and `cuda`: attention over the real keys through PyTorch's fused SDPA op that returns the log-sum-exp (on
# CUDA the aten flash op, or the memory-efficient op where a key padding mask or fp32 needs its additive bias; the
# CPU flash op on CPU), then the P prefix keys and the exact merge of the two partial softmaxes in one small pass:
# Triton (`sdpa` on CUDA), CUDA C++ (`cuda`, csrc/cuda/prefix_merge.cu), PyTorch below (`sdpa` on CPU). Backward:
# SDPA's own backward op called with the *merged* O and LSE, which recomputes P = exp(s - lse) and rowsum(dO * O) and
# so is exact for the real keys, plus the prefix part's dQ (added in place) and its batch-summed dPK/dPV from the
# same small kernel family. The two backends share all the glue below; only the merge kernels differ.
# `concat`: one SDPA call over [prefix; k] (a concatenation copy), the prefix always visible; dPK/dPV are the first
# P rows of dK/dV summed over the batch.
# All return outputs and gradients in the inputs' own layout (transformers' [B, L, H, D]-strided views).
_FLASH_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_EFFICIENT_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BIAS_ALIGN = 16  # the memory-efficient kernels read bias rows with 16-element alignment (torch pads the same way)
_LSE_ALIGN = 32  # ... and return (and read back, without bound checks) an lse padded along Lq to this multiple


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in ``ref``'s layout (the op's contract: outputs and grads are laid out like the inputs); a copy only
    where the aten op chose another layout (the CPU flash op for [B, H, L, D]-contiguous inputs)."""
    if _same_layout(t, ref) or (grads_may_be_views() and not is_dense(ref)):
        return t  # (a ref with gaps, e.g. a prefix_kv_buffer view another backend read: no layout to match in eager)
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """a is laid out as torch.empty_like(b) would be (the fake kernels' answer): same strides, its own storage."""
    return (a.shape == b.shape and a.stride() == torch.empty_like(b, device="meta").stride()
            and a.storage_offset() == 0 and a.untyped_storage().nbytes() == a.numel() * a.element_size())


def _allowed_keys(B, Lq, Lk, n_always, causal, key_padding_mask, device) -> Tensor:
    """Bool [B or 1, 1, Lq, Lk]: keys [0, n_always) always visible, the rest bottom-right causal / padded."""
    allowed = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        allowed = allowed & ((j <= i + (Lk - Lq)) | (j < n_always))
    if key_padding_mask is not None:
        keep = key_padding_mask
        if n_always:
            keep = torch.cat([keep.new_ones(B, n_always), keep], 1)
        allowed = allowed & keep[:, None, None, :]
    return allowed


def _dead_rows(B, Lq, Lk, causal, key_padding_mask, device) -> Tensor | None:
    """Bool [B or 1, 1, Lq]: query rows that see no real key (their SDPA lse is 0 or +inf, not -inf), or None."""
    if key_padding_mask is None and not (causal and Lq > Lk):
        return None
    last = torch.arange(Lq, device=device) + (Lk - Lq) if causal else torch.full((Lq,), Lk - 1, device=device)
    if key_padding_mask is None:
        return (last < 0)[None, None]
    seen = key_padding_mask.cumsum(-1)[:, last.clamp(0, Lk - 1)]  # real keys visible to each row
    return ((seen == 0) | (last < 0))[:, None]


def _on_cuda(t: Tensor) -> bool:
    """Whether the CUDA ops run for t (one place: the tests run the CUDA glue on meta tensors through it)."""
    return t.device.type == "cuda"


def _flash_serves(q: Tensor, Lk: int, n_always: int, causal: bool, key_padding_mask) -> bool:
    """On CUDA, whether the aten flash op computes this attention exactly: it takes no mask and runs 16-bit types;
    its causal mask is bottom-right aligned, which keeps the n_always leading keys visible to every query row only
    while Lq <= Lk - n_always + 1 (Lk counts them). Otherwise the memory-efficient op runs, with an additive bias."""
    Lq = q.shape[2]
    return (key_padding_mask is None and q.dtype in _FLASH_CUDA_DTYPES
            and not (n_always and causal and Lq > Lk - n_always + 1))


def _additive_mask(q, B, Lq, Lk, n_always, causal, key_padding_mask):
    """(additive float mask [B or 1, 1, Lq or 1, Lk] in q's dtype, or None; is_causal) for the fused ops that take
    a bias and align is_causal top-left (the CPU flash op, the CUDA memory-efficient op). Keys [0, n_always) are
    always visible, the rest bottom-right causal and/or padded (``_allowed_keys``): top-left is_causal is the same
    only where Lq == Lk and no key is always visible, otherwise the causal part goes into the mask."""
    causal = bool(causal) and Lq > 1
    aligned = causal and Lq == Lk and n_always == 0
    if not causal or aligned:
        if key_padding_mask is None:
            return None, aligned
        keep = key_padding_mask
        if n_always:
            keep = torch.cat([keep.new_ones(B, n_always), keep], 1)
        mask = torch.zeros(B, 1, 1, Lk, dtype=q.dtype, device=q.device).masked_fill_(~keep[:, None, None, :], -math.inf)
        return mask, aligned
    allowed = _allowed_keys(B, Lq, Lk, n_always, True, key_padding_mask, q.device)
    return torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, -math.inf), False


def _efficient_bias(mask: Tensor | None, B: int, H: int, Lq: int) -> Tensor | None:
    """The additive mask as the memory-efficient op takes it: [B, H, Lq, Lk] (an expanded view) with a unit-stride
    last dim and rows 16-element aligned: the last dim padded to a multiple of 16 in storage and sliced back, as
    torch's SDPA front end pads it."""
    if mask is None:
        return None
    Lk = mask.shape[-1]
    pad = -Lk % _BIAS_ALIGN
    if pad or mask.stride(-1) != 1:
        mask = torch.nn.functional.pad(mask, (0, pad))[..., :Lk]
    return mask.expand(B, H, Lq, Lk)


def _trim_lse(lse: Tensor, Lq: int) -> Tensor:
    """The memory-efficient op's lse [B, H, ceil32(Lq)] cut to the Lq real rows (a view)."""
    return lse[..., :Lq]


def _pad_lse(lse: Tensor) -> Tensor:
    """lse [B, H, Lq] as the memory-efficient backward reads it: contiguous, padded along Lq to a multiple of 32 with
    +inf (the layout its forward returns; its kernel reads the padding rows without bound checks)."""
    B, H, Lq = lse.shape
    pad = -Lq % _LSE_ALIGN
    if pad == 0 and lse.is_contiguous():
        return lse
    out = lse.new_full((B, H, Lq + pad), math.inf)
    out[..., :Lq] = lse
    return out


def _blhd(t: Tensor) -> Tensor:
    """t [B, H, L, D] in the [B, L, H, D]-contiguous storage the memory-efficient backward assumes for `out` (it
    takes the batch and head strides of `out`; the row stride is implied, H * D): t itself when it has it (HF)."""
    if t.transpose(1, 2).is_contiguous():
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _expand_kv_heads(t: Tensor, Hq: int) -> Tensor:
    """[B, Hkv, L, D] -> [B, Hq, L, D], each KV head repeated for its query heads (the memory-efficient op has no
    GQA; PyTorch's own SDPA front end repeats the same way)."""
    Hkv = t.shape[1]
    return t if Hkv == Hq else t.repeat_interleave(Hq // Hkv, dim=1)


def _fold_kv_heads(g: Tensor, Hkv: int) -> Tensor:
    """The gradient through ``_expand_kv_heads``: the query heads of each KV group summed."""
    return g if g.shape[1] == Hkv else g.unflatten(1, (Hkv, g.shape[1] // Hkv)).sum(2)


def _aten_attention(q, k, v, n_always, causal, key_padding_mask, scale):
    """(out, lse [B, Hq, Lq]) of attention over k/v through PyTorch's fused SDPA ops; keys [0, n_always) always
    visible, the rest bottom-right causal and/or padded."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    if _on_cuda(q):
        if _flash_serves(q, Lk, n_always, causal, key_padding_mask):
            # FlashAttention-2 aligns causal masks bottom-right, the prefix convention (PyTorch's sdpa front end
            # refuses is_causal with Lq != Lk for that reason; the aten op itself runs it).
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, bool(causal) and Lq > 1, False, scale=scale
            )[:2]
            return out, lse
        mask, is_causal = _additive_mask(q, B, Lq, Lk, n_always, causal, key_padding_mask)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, _expand_kv_heads(k, Hq), _expand_kv_heads(v, Hq), _efficient_bias(mask, B, Hq, Lq), True, 0.0,
            is_causal, scale=scale,
        )[:2]
        return out, _trim_lse(lse, Lq)
    mask, is_causal = _additive_mask(q, B, Lq, Lk, n_always, causal, key_padding_mask)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
    )


def _aten_attention_backward(do, q, k, v, out, lse, n_always, causal, key_padding_mask, scale):
    """(dq, dk, dv) of ``_aten_attention`` through the same op's backward, given (out, lse) (the merged ones for the
    LSE-merge backends: exact for the real keys)."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if do.stride(-1) != 1:  # the fused kernels read rows of the head dim; any other strides are taken as they are
        do = do.contiguous()
    if _on_cuda(q):
        seed = torch.empty((), dtype=torch.int64, device=q.device)  # dropout off: never read
        if _flash_serves(q, Lk, n_always, causal, key_padding_mask):
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                do, q, k, v, out, lse, None, None, Lq, Lk, 0.0, bool(causal) and Lq > 1, seed, seed, scale=scale
            )
        mask, is_causal = _additive_mask(q, B, Lq, Lk, n_always, causal, key_padding_mask)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            do, q, _expand_kv_heads(k, Hq), _expand_kv_heads(v, Hq), _efficient_bias(mask, B, Hq, Lq), _blhd(out),
            _pad_lse(lse), seed, seed, 0.0, [True, True, True, False], is_causal, scale=scale,
        )
        return dq, _fold_kv_heads(dk, Hkv), _fold_kv_heads(dv, Hkv)
    mask, is_causal = _additive_mask(q, B, Lq, Lk, n_always, causal, key_padding_mask)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale
    )


def _aten_cuda_limits(dtype: torch.dtype, D: int) -> str | None:
    """What the CUDA fused SDPA ops used here cannot take (flash: fp16/bf16; memory-efficient: also fp32)."""
    if dtype not in _EFFICIENT_CUDA_DTYPES:
        return f"q has dtype {dtype}; the aten flash / memory-efficient ops on CUDA run float16/bfloat16/float32"
    if D % 8 or D > 256:
        return f"head dim D = {D}; the aten flash / memory-efficient ops need D % 8 == 0 and D <= 256"
    return None


def _aten_why_not(q, k, key_padding_mask) -> str | None:
    """What the fused SDPA ops used here cannot take (shared by `sdpa`, `cuda` and `concat`)."""
    if k.shape[2] == 0:
        return "k has no real keys (Lk = 0); the SDPA kernels need at least one"
    if q.numel() == 0:  # the CPU flash op divides by zero on an empty batch or query range
        return f"q of shape {tuple(q.shape)} is empty; the SDPA kernels need at least one query"
    if any(t.stride(-1) != 1 for t in (q, k)):
        return "q/k/v need a unit stride in the head dim"
    if _on_cuda(q):
        return _aten_cuda_limits(q.dtype, q.shape[-1])
    return None


# --- the prefix part and the merge, in PyTorch (CPU, and the oracle of the Triton and CUDA C++ kernels) ------------
def _grouped(t: Tensor, Hkv: int) -> Tensor:
    return t.unflatten(1, (Hkv, t.shape[1] // Hkv))  # [B, Hkv, g, L, D]: a view, any strides


def _prefix_scores(q, prefix_k, scale, acc):
    Hkv = prefix_k.shape[-3]
    pk = prefix_k.to(acc)
    pk = pk[None, :, None] if pk.dim() == 3 else pk[:, :, None]  # [B or 1, Hkv, 1, P, D]
    return (_grouped(q, Hkv).to(acc) @ pk.transpose(-1, -2)) * scale, pk  # [B, Hkv, g, Lq, P]


def prefix_merge_torch(q, prefix_k, prefix_v, out_c, lse_c, scale):
    """The prefix part merged into (out_c, lse_c) by log-sum-exp; writes out_c in place, returns the merged lse.
    lse_c must be -inf in rows that see no real key."""
    acc = _acc_dtype(q.dtype)
    Hkv = prefix_k.shape[-3]
    s, _ = _prefix_scores(q, prefix_k, scale, acc)
    lse_p = torch.logsumexp(s, -1)                                        # [B, Hkv, g, Lq]
    lse_cg = _grouped(lse_c.to(acc).unsqueeze(-1), Hkv).squeeze(-1)
    lse = torch.logaddexp(lse_cg, lse_p)
    pv = prefix_v.to(acc)
    pv = pv[None, :, None] if pv.dim() == 3 else pv[:, :, None]
    o_p = torch.exp(s - lse[..., None]) @ pv                              # e^(lse_p - lse) * O_p
    w_c = torch.exp(lse_cg - lse)[..., None]                              # 0 where lse_c = -inf
    o_c = _grouped(out_c, Hkv)
    merged = torch.where(w_c > 0, o_c.to(acc) * w_c, 0.0) + o_p
    o_c.copy_(merged)
    return lse.flatten(1, 2).to(torch.float64 if acc == torch.float64 else torch.float32)


def prefix_merge_backward_torch(do, q, prefix_k, prefix_v, out, lse, dq, scale):
    """Adds the prefix part's dQ into dq in place; returns (dprefix_k, dprefix_v) in the accumulation dtype."""
    acc = _acc_dtype(q.dtype)
    Hkv = prefix_k.shape[-3]
    s, pk = _prefix_scores(q, prefix_k, scale, acc)
    lse_g = _grouped(lse.to(acc).unsqueeze(-1), Hkv)                    # [B, Hkv, g, Lq, 1]
    p = torch.exp(s - lse_g)
    do_g = _grouped(do, Hkv).to(acc)
    delta = (do_g * _grouped(out, Hkv).to(acc)).sum(-1, keepdim=True)
    pv = prefix_v.to(acc)
    pv = pv[None, :, None] if pv.dim() == 3 else pv[:, :, None]
    ds = p * (do_g @ pv.transpose(-1, -2) - delta)
    dq_g = _grouped(dq, Hkv)
    dq_g.add_((ds @ pk * scale).to(dq.dtype))
    dpk = (ds.transpose(-1, -2) @ _grouped(q, Hkv).to(acc)).sum(2) * scale  # [B, Hkv, P, D]
    dpv = (p.transpose(-1, -2) @ do_g).sum(2)
    if prefix_k.dim() == 3:
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    return dpk, dpv


def _prefix_merge(q, prefix_k, prefix_v, out_c, lse_c, scale):
    if q.is_cuda:
        from peft_kernels.triton.prefix_merge import prefix_merge_forward

        with _backends.on_device(q.device):
            return prefix_merge_forward(q, prefix_k, prefix_v, out_c, lse_c, scale)
    return prefix_merge_torch(q, prefix_k, prefix_v, out_c, lse_c, scale)


def _prefix_merge_backward(do, q, prefix_k, prefix_v, out, lse, dq, scale):
    if q.is_cuda:
        from peft_kernels.triton.prefix_merge import prefix_merge_backward

        with _backends.on_device(q.device):
            return prefix_merge_backward(do, q, prefix_k, prefix_v, out, lse, dq, scale)
    return prefix_merge_backward_torch(do, q, prefix_k, prefix_v, out, lse, dq, scale)


# --- the CUDA C++ merge kernels (csrc/cuda/prefix_merge.cu), the `cuda` backend's half of the composition ----------
def _prefix_merge_cuda(q, prefix_k, prefix_v, out_c, lse_c, scale):
    return torch.ops.peft_kernels.prefix_merge_fwd_cuda(q, prefix_k, prefix_v, out_c, lse_c, scale)


def _prefix_merge_backward_cuda(do, q, prefix_k, prefix_v, out, lse, dq, scale):
    return torch.ops.peft_kernels.prefix_merge_bwd_cuda(do, q, prefix_k, prefix_v, out, lse, dq, scale)


# --- the LSE-merge composition, shared by `sdpa` and `cuda` (merge / merge_backward: the prefix kernels) ----------
def _sdpa_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, merge):
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    out, lse_c = _aten_attention(q, k, v, 0, causal, key_padding_mask, scale)
    dead = _dead_rows(B, Lq, Lk, causal, key_padding_mask, q.device)
    if dead is not None:
        lse_c = lse_c.masked_fill(dead, -math.inf)
    out = _like(out, q)
    lse = merge(q, prefix_k, prefix_v, out, lse_c, scale)
    return out, lse


def _sdpa_backward(do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale, merge_backward):
    if do.stride(-1) != 1:  # once for both halves: the kernels read rows of the head dim
        do = do.contiguous()
    lse_in = lse.to(torch.float32) if q.dtype != torch.float64 else lse
    dq, dk, dv = _aten_attention_backward(do, q, k, v, out, lse_in, 0, causal, key_padding_mask, scale)
    dq, dk, dv = _like(dq, q), _like(dk, k), _like(dv, v)
    dpk, dpv = merge_backward(do, q, prefix_k, prefix_v, out, lse, dq, scale)
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)


def _concat_pair(k, v, prefix_k, prefix_v):
    """(K', V') over [prefix; k] and [prefix; v]; v uses its reserved rows only when they are not k's (the same
    buffer passed twice: its rows can hold one prefix, so v is concatenated; k and v as two column blocks of one
    fused projection's buffer each have their own)."""
    K = _concat_kv_heads(k, prefix_k)
    return K, _concat_kv_heads(v, prefix_v, reserved=not share_rows(k, v))


def _concat_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    K, V = _concat_pair(k, v, prefix_k, prefix_v)
    out, lse = _aten_attention(q, K, V, prefix_k.shape[-2], causal, key_padding_mask, scale)
    return _like(out, q), lse.contiguous()


def _concat_backward(do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale):
    P = prefix_k.shape[-2]
    K, V = _concat_pair(k, v, prefix_k, prefix_v)
    dq, dK, dV = _aten_attention_backward(do, q, K, V, out, lse, P, causal, key_padding_mask, scale)
    acc = _acc_dtype(q.dtype)
    if prefix_k.dim() == 3:
        dpk, dpv = dK[:, :, :P].sum(0, dtype=acc), dV[:, :, :P].sum(0, dtype=acc)
    else:  # copied out of dK/dV (outputs may not alias), in the prefix's layout and dtype
        dpk, dpv = torch.empty_like(prefix_k).copy_(dK[:, :, :P]), torch.empty_like(prefix_v).copy_(dV[:, :, :P])
    return (_like(dq, q), _rows_grad(dK, P, k), _rows_grad(dV, P, v), dpk.to(prefix_k.dtype),
            dpv.to(prefix_v.dtype))


def _rows_grad(dK: Tensor, P: int, k: Tensor) -> Tensor:
    """k's gradient out of dK' over [prefix; k]: its last rows, as that view where they are laid out as k is (k in a
    prefix_kv_buffer: no copy of dK) and autograd takes a view (the eager path; a custom op's outputs must be laid
    out as its fake), else copied into k's layout."""
    rows = dK.narrow(2, P, dK.shape[2] - P)
    return rows if same_strides(rows, k.stride()) and grads_may_be_views() else _like(rows, k)


def _concat_kv_heads(t, prefix, reserved: bool = True):
    """[prefix; t] along the sequence in t's physical layout (so dK/dV come back in it), prefix cast to t's dtype:
    t's own buffer where t is a ``prefix_kv_buffer`` view (rewritten in the backward too: a few rows), else a copy."""
    B, H, Lk, D = t.shape
    P = prefix.shape[-2]
    full = reserved_rows(t, P) if reserved else None
    if full is not None:  # t was computed into a prefix_kv_buffer: the prefix goes in front of it, no copy of t
        write_prefix(full, prefix)
        return full
    pre = prefix if prefix.dtype == t.dtype else prefix.to(t.dtype)
    pre = pre.expand(B, H, P, D) if pre.dim() == 3 else pre
    if t.is_contiguous():  # [B, H, L, D] order: torch.cat makes the same buffer in one call
        return torch.cat([pre, t], 2)
    order = sorted(range(4), key=lambda d: -t.stride(d)) if t.stride(-1) == 1 else [0, 1, 2, 3]
    buf = torch.empty_permuted((B, H, P + Lk, D), order, dtype=t.dtype, device=t.device)
    buf.narrow(2, 0, P).copy_(pre)  # narrow + copy_: two calls; slice assignment's index parsing costs more
    buf.narrow(2, P, Lk).copy_(t)
    return buf


@FAMILY.forward("sdpa")
def _sdpa_forward_backend(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """SDPA's fused causal attention (returns its LSE) + the prefix part merged by log-sum-exp (Triton on CUDA)."""
    return _sdpa_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, _prefix_merge)


@FAMILY.backward("sdpa")
def _sdpa_backward_backend(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale, needs):
    """SDPA's own backward with the merged O and LSE + the prefix part's dQ and dPK/dPV (Triton on CUDA)."""
    return _grads(_sdpa_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale,
                                 _prefix_merge_backward), needs)


# The Python concat backend's calls on CPU tensors (causal or not, padded or not) as one C++ autograd node over the
# record's fields (csrc/prefix.cpp; tested bit-identical): the eager host path.
_CONCAT_NODE = _backends.native_function("prefix_concat_attention_autograd")


def _concat_eager_serves(inp: PrefixInputs) -> bool:
    # The CPU flash op (the node builds the causal / padding mask itself); k/v not in a reserved-row buffer (the node
    # concatenates; the Python composition attends over the buffer itself).
    P = inp.prefix_k.shape[-2]
    return inp.q.device.type == "cpu" and reserved_rows(inp.k, P) is None and reserved_rows(inp.v, P) is None


@FAMILY.forward("concat", eager=_CONCAT_NODE,
                eager_when=_concat_eager_serves if _CONCAT_NODE is not None else None)
def _concat_forward_backend(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """One fused SDPA call over [prefix; k] (a concatenation copy), bottom-right causal."""
    return _concat_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)


@FAMILY.backward("concat")
def _concat_backward_backend(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale, needs):
    """SDPA's backward over [prefix; k]; dPK/dPV = the first P rows of dK/dV summed over the batch."""
    return _grads(_concat_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale),
                  needs)


@FAMILY.why_not("sdpa", both=True)
def _sdpa_why_not(inp: PrefixInputs) -> str | None:
    why = _aten_why_not(inp.q, inp.k, inp.key_padding_mask)
    if why is None and _on_cuda(inp.q):
        # The prefix part runs in Triton on CUDA tensors.
        why = _backends.availability("triton", "cuda")
    return why


@FAMILY.why_not("concat", both=True)
def _concat_why_not(inp: PrefixInputs) -> str | None:
    return _aten_why_not(inp.q, inp.k, inp.key_padding_mask)


# --- `cuda`: the LSE-merge composition with the CUDA C++ merge kernels (no Triton anywhere) ----------------------
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_KERNEL_STATUS = _backends.cuda_kernel_status("prefix_merge_fwd_cuda")  # probed once, at import
_CUDA_MAX_HEAD_DIM = 256
_CUDA_SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on sm_90 (H100/H200)


def _cuda_merge_smem(P: int, D: int) -> tuple[int, int]:
    """Shared-memory bytes of the CUDA merge kernels (forward, backward): the formulas of csrc/cuda/prefix_merge.cu
    (forward: the P x D prefix in fp32 + P fp32 scores per row of a 128-row tile; backward: 32-key chunks, 32-row
    tiles)."""
    Dp = -(-D // 8) * 8
    return 4 * P * (Dp + 128), 4 * (4 * 32 * Dp + 2 * 32 * (Dp + 4) + 2 * 32 * 32 + 4 * 32)


def _cuda_merge_limits(P: int, D: int) -> str | None:
    if D > _CUDA_MAX_HEAD_DIM:
        return f"head dim D = {D}; the CUDA merge kernels take D <= {_CUDA_MAX_HEAD_DIM}"
    fwd, bwd = _cuda_merge_smem(P, D)
    if max(fwd, bwd) > _CUDA_SMEM_LIMIT:
        return (f"P = {P} prefix keys at head dim D = {D}: the CUDA merge forward keeps them in shared memory "
                f"({max(fwd, bwd)} bytes > {_CUDA_SMEM_LIMIT})")
    return None


@FAMILY.forward("cuda", dtypes=_CUDA_DTYPES)
def _cuda_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """SDPA's fused attention over the real keys + the CUDA C++ prefix-and-merge kernel (csrc/cuda/prefix_merge.cu)."""
    return _sdpa_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, _prefix_merge_cuda)


@FAMILY.backward("cuda", dtypes=_CUDA_DTYPES)
def _cuda_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale, needs):
    """SDPA's own backward with the merged O and LSE + the CUDA C++ prefix backward (dQ in place, fp32 dPK/dPV)."""
    return _grads(_sdpa_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale,
                                 _prefix_merge_backward_cuda), needs)


@FAMILY.why_not("cuda", both=True)
def _cuda_why_not(inp: PrefixInputs) -> str | None:
    return (_CUDA_KERNEL_STATUS or _aten_why_not(inp.q, inp.k, inp.key_padding_mask)
            or _cuda_merge_limits(inp.prefix_k.shape[-2], inp.q.shape[-1]))


# --- the fused Triton kernels (peft_kernels/triton/prefix_attention.py) ------------------------------------------
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@FAMILY.forward("triton", dtypes=_TRITON_DTYPES)
def _triton_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """FlashAttention-2-style forward over the prefix tile(s) then the real keys, never concatenated."""
    from peft_kernels.triton import prefix_attention as tk

    with _backends.on_device(q.device):
        return tk.prefix_attention_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)


@FAMILY.backward("triton", dtypes=_TRITON_DTYPES)
def _triton_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale, needs):
    """FlashAttention-2-style backward (dK/dV kernel over key blocks, dQ kernel over query blocks)."""
    from peft_kernels.triton import prefix_attention as tk

    with _backends.on_device(dout.device):
        grads = tk.prefix_attention_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask,
                                             scale)
    return _grads(grads, needs)


@FAMILY.why_not("triton", "forward")
def _triton_why_not(inp: PrefixInputs) -> str | None:
    from peft_kernels.triton import prefix_attention as tk

    return tk.why_not(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v, inp.key_padding_mask)


@FAMILY.why_not("triton", "backward")
def _triton_backward_why_not(inp: PrefixInputs) -> str | None:
    from peft_kernels.triton import prefix_attention as tk

    return _triton_why_not(inp) or tk.backward_why_not(inp.q, inp.k)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def validate(q, k, v, prefix_k, prefix_v, key_padding_mask, scale) -> float:
    val.check_tensor(OP, "q", q, ndim=4)
    val.check_tensor(OP, "k", k, ndim=4)
    val.check_tensor(OP, "v", v, ndim=4)
    val.check_tensor(OP, "prefix_k", prefix_k, ndim=(3, 4))
    val.check_tensor(OP, "prefix_v", prefix_v, ndim=(3, 4))
    val.check_same_dtype(OP, "q", q, k=k, v=v)
    val.check_same_dtype(OP, "prefix_k", prefix_k, prefix_v=prefix_v)
    val.check_same_device(OP, q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, key_padding_mask=key_padding_mask)
    B, Hq, Lq, D = q.shape
    val.check_nonzero(OP, "q", q, 3, "head dim D")
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k of shape {tuple(k.shape)} and v of shape {tuple(v.shape)} must match")
    val.check_size(OP, "k", k, 0, B, "batch = q.shape[0]")
    val.check_size(OP, "k", k, 3, D, "head dim = q.shape[3]")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{OP}: q has {Hq} heads, k has {Hkv}; the query heads must be a multiple of the KV heads")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(
            f"{OP}: prefix_k of shape {tuple(prefix_k.shape)} and prefix_v of shape {tuple(prefix_v.shape)} must match"
        )
    if prefix_k.dim() == 4:
        val.check_size(OP, "prefix_k", prefix_k, 0, B, "batch = q.shape[0] (or pass a shared [Hkv, P, D] prefix)")
    val.check_size(OP, "prefix_k", prefix_k, -3, Hkv, "KV heads = k.shape[1]")
    val.check_size(OP, "prefix_k", prefix_k, -1, D, "head dim = q.shape[3]")
    if prefix_k.shape[-2] < 1:
        raise ValueError(f"{OP}: prefix_k has no virtual tokens (P = 0); use plain attention instead")
    if key_padding_mask is not None:
        val.check_tensor(OP, "key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"{OP}: key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected [batch, Lk] = [{B}, {Lk}]"
            )
    return 1.0 / math.sqrt(D) if scale is None else val.check_positive(OP, "scale", scale)


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, causal: bool = False,
                     key_padding_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Attention of q over P prefix keys/values followed by the real keys/values (see the module doc).

    The output is laid out like ``q`` (a [B, L, H, D]-strided view in, the same layout out: no copy). The prefix
    may stay in its own dtype (fp32 master weights with bf16 activations): the backends cast it where they read
    it, and its gradients come back in fp32, summed over the batch for a shared prefix, without a rounding to
    the activation dtype on the way.
    """
    if type(causal) is bool and (scale is None or (type(scale) is float and 0.0 < scale < math.inf)):
        # The steady state: a signature validated before, then the backends' call.
        hit = FAMILY.steady_hit(causal, q, k, v, prefix_k, prefix_v, key_padding_mask)
        if hit is not None:
            s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            if hit[2] is not None:  # the backend's eager node (its key decides that it serves these inputs)
                return hit[2](q, k, v, prefix_k, prefix_v, causal, key_padding_mask, s)
            return FAMILY.run_eager(PrefixInputs(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, s),
                                    hit[0], hit[1])
    if isinstance(q, Tensor) and torch._C._is_any_autocast_enabled():
        # As SDPA under autocast: q/k/v in the autocast dtype before they are compared (a model's rotary part may
        # leave q/k in fp32 beside a bf16 v); the family's own autocast then has nothing left to cast.
        q, k, v = _autocast_qkv(q, k, v)
    scale = validate(q, k, v, prefix_k, prefix_v, key_padding_mask, scale)
    key = None if torch.compiler.is_compiling() else _key(q, k, v, prefix_k, prefix_v, causal, key_padding_mask)
    return FAMILY.call_checked(PrefixInputs(q, k, v, prefix_k, prefix_v, bool(causal), key_padding_mask, scale), key)


def _autocast_qkv(q, k, v):
    dtype = autocast_dtype(q.device.type)
    if dtype is None:
        return q, k, v
    return tuple(t.to(dtype) if autocast_applies(t, dtype) else t for t in (q, k, v))


def _key(q, k, v, prefix_k, prefix_v, causal, key_padding_mask):
    sig = signature(q, k, v, prefix_k, prefix_v, key_padding_mask)
    return None if sig is None else (bool(causal), sig)
