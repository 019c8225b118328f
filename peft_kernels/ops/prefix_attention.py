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

import torch
from torch import Tensor

from peft_kernels import _backends
from peft_kernels.ops import _validate as val

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


def _reference_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
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


def _reference_backward(do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale):
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


def _triton_forward(q, *args):
    from peft_kernels.triton import prefix_attention as tk

    with _backends.on_device(q.device):
        return tk.prefix_attention_forward(q, *args)


def _triton_backward(do, *args):
    from peft_kernels.triton import prefix_attention as tk

    with _backends.on_device(do.device):
        return tk.prefix_attention_backward(do, *args)


def _triton_supports(q, k, v, prefix_k, prefix_v, key_padding_mask):
    from peft_kernels.triton import prefix_attention as tk

    ok, reason = tk.supports(q, k, v, prefix_k, prefix_v, key_padding_mask)
    return None if ok else reason


# The cuda backend: the CUDA C++ forward kernel in csrc/cuda/prefix_attention.cu (torch.ops.peft_kernels.
# prefix_attention_fwd_cuda). fp16/bf16 on tensor cores (WMMA), fp32 on a SIMT path; head dim <= 128.
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_MAX_HEAD_DIM = 128
_CUDA_MAX_LQ = 65535 * 64  # grid.y = query tiles of 64 rows


def _probe_cuda_kernel() -> str | None:
    """Why the loaded peft_kernels._C has no CUDA kernel for this op, or None (probed once, at import)."""
    if not _backends.native_status()[0]:
        return None  # _backends.backend_status already says why the native backends cannot run
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key("peft_kernels::prefix_attention_fwd_cuda", "CUDA")
    except RuntimeError:  # the schema itself is missing: an extension built before the op existed
        has = False
    if has:
        return None
    return (
        "peft_kernels._C has no CUDA kernel for prefix_attention_fwd_cuda (built before it existed, or "
        "without nvcc); rebuild with `pip install -e . --no-build-isolation`"
    )


_CUDA_KERNEL_STATUS = _probe_cuda_kernel()


def _cuda_why_not(q, k, v, prefix_k, prefix_v, key_padding_mask) -> str | None:
    # Shapes, head counts, P >= 1 and the mask's dtype are validated by the public function already.
    if _CUDA_KERNEL_STATUS is not None:
        return _CUDA_KERNEL_STATUS
    if q.dtype not in _CUDA_DTYPES:
        return f"q has dtype {q.dtype}; the kernel supports float16, bfloat16 and float32"
    D = q.shape[-1]
    if not 1 <= D <= _CUDA_MAX_HEAD_DIM:
        return f"head dim D = {D} is not supported (1 <= D <= {_CUDA_MAX_HEAD_DIM}; padded to 64, 80, 96 or 128)"
    if q.shape[2] > _CUDA_MAX_LQ:
        return f"Lq = {q.shape[2]} exceeds the launch grid ({_CUDA_MAX_LQ} queries)"
    return None


def _cuda_supports(q, k, v, prefix_k, prefix_v, key_padding_mask):
    why = _cuda_why_not(q, k, v, prefix_k, prefix_v, key_padding_mask)
    return None if why is None else f"prefix_attention[cuda]: {why}"


def _cuda_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    # The kernel reads any strides but needs a unit-stride head dim; copy the (rare) tensor that lacks one.
    q, k, v, prefix_k, prefix_v = (
        t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in (q, k, v, prefix_k, prefix_v)
    )
    return torch.ops.peft_kernels.prefix_attention_fwd_cuda(
        q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale
    )


def _cuda_backward(do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale):
    # The CUDA C++ backend implements the forward only (the issue asks for the forward at least). Its backward
    # reuses the Triton FlashAttention-2 backward when Triton can run on these tensors (it takes the same
    # out and lse: fp32 [B, Hq, Lq], natural log), and the dense reference backward otherwise.
    args = (do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale)
    if (
        _backends.backend_status("triton", q.device.type) is None
        and _triton_supports(q, k, v, prefix_k, prefix_v, key_padding_mask) is None
    ):
        return _triton_backward(*args)
    return _reference_backward(*args)


_FORWARD = {"reference": _reference_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {"reference": _reference_backward, "triton": _triton_backward, "cuda": _cuda_backward}

_backends.register_op(
    OP, {"triton": _triton_supports, "cuda": _cuda_supports}, preference={"cuda": ("triton", "cuda", "reference")}
)


# --------------------------------------------------------------------------------------------------
# Composites on PyTorch's own attention kernels: `sdpa` (LSE merge) and `concat` (one SDPA call)
# --------------------------------------------------------------------------------------------------
# `sdpa`: attention over the real keys through PyTorch's fused SDPA op that returns the log-sum-exp (the aten flash
# op on CUDA, the CPU flash op on CPU), then the P prefix keys and the exact merge of the two partial softmaxes in
# one small pass (Triton on CUDA, PyTorch below on CPU). Backward: SDPA's own backward op called with the *merged*
# O and LSE, which recomputes P = exp(s - lse) and rowsum(dO * O) and so is exact for the real keys, plus the prefix
# part's dQ (added in place) and its batch-summed dPK/dPV.
# `concat`: one SDPA call over [prefix; k] (a concatenation copy), the prefix always visible; dPK/dPV are the first
# P rows of dK/dV summed over the batch.
# Both return outputs and gradients in the inputs' own layout (transformers' [B, L, H, D]-strided views).
_FLASH_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in ``ref``'s layout (the op's contract: outputs and grads are laid out like the inputs); a copy only
    where the aten op chose another layout (the CPU flash op for [B, H, L, D]-contiguous inputs)."""
    if _same_layout(t, ref):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and all(n <= 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


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


def _aten_attention(q, k, v, n_always, causal, key_padding_mask, scale):
    """(out, lse) of attention over k/v through PyTorch's fused SDPA op; keys [0, n_always) always visible."""
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    if q.device.type == "cuda":
        # FlashAttention-2 aligns causal masks bottom-right, the prefix convention (PyTorch's sdpa front end
        # refuses is_causal with Lq != Lk for that reason; the aten op itself runs it).
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, bool(causal) and Lq > 1, False, scale=scale
        )[:2]
        return out, lse
    mask, is_causal = _cpu_attention_mask(q, B, Lq, Lk, n_always, causal, key_padding_mask)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
    )


def _cpu_attention_mask(q, B, Lq, Lk, n_always, causal, key_padding_mask):
    """(additive float mask in q's dtype or None, is_causal) for the CPU flash op (top-left is_causal only)."""
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


def _aten_attention_backward(do, q, k, v, out, lse, n_always, causal, key_padding_mask, scale):
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    if q.device.type == "cuda":
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, None, None, Lq, Lk, 0.0, bool(causal) and Lq > 1, seed, seed, scale=scale
        )
    mask, is_causal = _cpu_attention_mask(q, B, Lq, Lk, n_always, causal, key_padding_mask)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale
    )


def _aten_why_not(q, k, key_padding_mask) -> str | None:
    """What the fused SDPA ops used here cannot take (shared by `sdpa` and `concat`)."""
    if k.shape[2] == 0:
        return "k has no real keys (Lk = 0); the SDPA kernels need at least one"
    if any(t.stride(-1) != 1 for t in (q, k)):
        return "q/k/v need a unit stride in the head dim"
    if q.device.type == "cuda":
        if q.dtype not in _FLASH_CUDA_DTYPES:
            return f"q has dtype {q.dtype}; the aten flash op on CUDA runs float16/bfloat16"
        D = q.shape[-1]
        if D % 8 or D > 256:
            return f"head dim D = {D}; the aten flash op needs D % 8 == 0 and D <= 256"
        if key_padding_mask is not None:
            return ("key_padding_mask is set; the aten flash op takes no mask (the memory-efficient op that does pads "
                    "its lse and aligns is_causal top-left: not wired)")
    return None


# --- the prefix part and the merge, in PyTorch (CPU, and the oracle of the Triton kernels) -------------------------
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


def _sdpa_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    out, lse_c = _aten_attention(q, k, v, 0, causal, key_padding_mask, scale)
    dead = _dead_rows(B, Lq, Lk, causal, key_padding_mask, q.device)
    if dead is not None:
        lse_c = lse_c.masked_fill(dead, -math.inf)
    out = _like(out, q)
    lse = _prefix_merge(q, prefix_k, prefix_v, out, lse_c, scale)
    return out, lse


def _sdpa_backward(do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale):
    lse_in = lse.to(torch.float32) if q.dtype != torch.float64 else lse
    dq, dk, dv = _aten_attention_backward(do, q, k, v, out, lse_in, 0, causal, key_padding_mask, scale)
    dq, dk, dv = _like(dq, q), _like(dk, k), _like(dv, v)
    dpk, dpv = _prefix_merge_backward(do, q, prefix_k, prefix_v, out, lse, dq, scale)
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)


def _concat_forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    K, V = _concat_kv_heads(k, prefix_k), _concat_kv_heads(v, prefix_v)
    out, lse = _aten_attention(q, K, V, prefix_k.shape[-2], causal, key_padding_mask, scale)
    return _like(out, q), lse.contiguous()


def _concat_backward(do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale):
    P = prefix_k.shape[-2]
    K, V = _concat_kv_heads(k, prefix_k), _concat_kv_heads(v, prefix_v)
    dq, dK, dV = _aten_attention_backward(do, q, K, V, out, lse, P, causal, key_padding_mask, scale)
    acc = _acc_dtype(q.dtype)
    if prefix_k.dim() == 3:
        dpk, dpv = dK[:, :, :P].sum(0, dtype=acc), dV[:, :, :P].sum(0, dtype=acc)
    else:  # copied out of dK/dV (outputs may not alias), in the prefix's layout and dtype
        dpk, dpv = torch.empty_like(prefix_k).copy_(dK[:, :, :P]), torch.empty_like(prefix_v).copy_(dV[:, :, :P])
    return _like(dq, q), _like(dK[:, :, P:], k), _like(dV[:, :, P:], v), dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)


def _concat_kv_heads(t, prefix):
    """[prefix; t] along the sequence in t's physical layout (so dK/dV come back in it), prefix cast to t's dtype."""
    B, H, Lk, D = t.shape
    P = prefix.shape[-2]
    pre = prefix.to(t.dtype)
    pre = pre.expand(B, H, P, D) if pre.dim() == 3 else pre
    order = sorted(range(4), key=lambda d: -t.stride(d)) if t.stride(-1) == 1 else [0, 1, 2, 3]
    buf = torch.empty_permuted((B, H, P + Lk, D), order, dtype=t.dtype, device=t.device)
    buf[:, :, :P] = pre
    buf[:, :, P:] = t
    return buf


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("peft_kernels::prefix_attention", mutates_args=())
def _prefix_attention_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, causal: bool,
    key_padding_mask: Tensor | None, scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    return _FORWARD[backend](q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)


@_prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Every backend returns contiguous outputs, whatever q's layout ([B, H, L, D] views of [B, L, H, D]).
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("peft_kernels::prefix_attention_backward", mutates_args=())
def _prefix_attention_backward_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, key_padding_mask: Tensor | None, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _BACKWARD[backend](do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale)
    # Outputs of a custom op may not alias each other: slices of one buffer (the reference's prefix/real split)
    # are copied out.
    return tuple(g.clone() if g._is_view() else g.contiguous() for g in grads)


@_prefix_attention_backward_op.register_fake
def _(do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale, backend):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prefix_k, prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, backend = inputs
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, output[0], output[1], key_padding_mask)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward(ctx, do, dlse):
    q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask = ctx.saved_tensors
    grads = _prefix_attention_backward_op(
        do.contiguous(), q, k, v, prefix_k, prefix_v, out, lse, ctx.causal, key_padding_mask, ctx.scale,
        ctx.backend,
    )
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])) + (None,) * 4


_prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)


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
    val.check_same_device(OP, q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, key_padding_mask=key_padding_mask)
    B, Hq, Lq, D = q.shape
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
    """Attention of q over P prefix keys/values followed by the real keys/values (see the module doc)."""
    scale = validate(q, k, v, prefix_k, prefix_v, key_padding_mask, scale)
    # fp32 master prefixes are cast to the activation dtype here (P x D: tiny); autograd casts the grads back.
    prefix_k, prefix_v = prefix_k.to(q.dtype), prefix_v.to(q.dtype)
    backend = _backends.select(OP, q.device.type, q, k, v, prefix_k, prefix_v, key_padding_mask)
    out, _ = _prefix_attention_op(q, k, v, prefix_k, prefix_v, bool(causal), key_padding_mask, scale, backend)
    return out
