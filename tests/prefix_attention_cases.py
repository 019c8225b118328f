"""Shared by the prefix-attention tests (reference, Triton and CUDA backends): seeded inputs, and attention written
out over the concatenated K/V with an explicit bool mask (the oracle, in float64, or eager PyTorch in low precision).
"""

from __future__ import annotations

import torch


def make_inputs(
    device, dtype, B, Hq, Hkv, Lq, Lk, P, D, shared, pad, *,
    bshd=False, prefix_dtype=None, seed=0, hole_in_row0=False, with_grad_out=False,
):  # fmt: skip
    """(q, k, v, prefix_k, prefix_v, key_padding_mask[, grad_out]) from a seeded CPU generator, moved to `device`.

    bshd: q/k/v in the HF layout [B, L, H, D] viewed as [B, H, L, D] (non-contiguous strides). The prefix is
    [Hkv, P, D] when shared, else [B, Hkv, P, D], in `prefix_dtype` (default: `dtype`). With pad, rows 1.. of the
    mask are right- and left-padded by different amounts; row 0 is full, or has a hole in the middle with
    hole_in_row0. with_grad_out: a [B, Hq, Lq, D] upstream gradient drawn last.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    if bshd:
        q, k, v = (rnd(B, L, H, D).transpose(1, 2) for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))
    else:
        q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    pshape = (Hkv, P, D) if shared else (B, Hkv, P, D)
    pk, pv = rnd(*pshape, dt=prefix_dtype or dtype), rnd(*pshape, dt=prefix_dtype or dtype)
    mask = None
    if pad:
        mask = torch.ones(B, Lk, dtype=torch.bool)
        if hole_in_row0:
            mask[0, Lk // 3 : Lk // 2] = False
        for b in range(1, B):
            n = max(1, Lk // (b + 2))
            mask[b, Lk - n :] = False
            mask[b, : b * 2] = False
        mask = mask.to(device)
    if with_grad_out:
        return q, k, v, pk, pv, mask, rnd(B, Hq, Lq, D)
    return q, k, v, pk, pv, mask


def concat_kv(q, k, v, pk, pv):
    """K' = cat(prefix_k, k) and V' = cat(prefix_v, v) along the sequence, a shared prefix broadcast over q's
    batch and the KV heads repeated up to q's heads (GQA/MQA)."""
    B, Hq = q.shape[:2]
    group = Hq // k.shape[1]
    if pk.dim() == 3:
        pk, pv = pk.expand(B, *pk.shape), pv.expand(B, *pv.shape)
    return torch.cat([pk, k], 2).repeat_interleave(group, 1), torch.cat([pv, v], 2).repeat_interleave(group, 1)


def eager_attention(q, k, v, pk, pv, causal, mask, scale):
    """(out, lse) of attention in q's dtype over cat(prefix, real) with an explicit bool mask (what users would
    write): every query sees the prefix; bottom-right causal and key padding apply to the real keys only."""
    B, Hq, Lq, _ = q.shape
    Lk, P = k.shape[2], pk.shape[-2]
    K, V = concat_kv(q, k, v, pk.to(q.dtype), pv.to(q.dtype))
    allowed = torch.ones(B, 1, Lq, P + Lk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        allowed[..., P:] &= j <= i + (Lk - Lq)
    if mask is not None:
        allowed[..., P:] &= mask[:, None, None, :]
    s = (q @ K.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s.to(torch.promote_types(s.dtype, torch.float32)), -1)
    return torch.softmax(s, -1) @ V, lse
