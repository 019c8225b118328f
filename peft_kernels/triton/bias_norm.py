"""Triton kernels for the bias-only norms (LayerNorm / RMSNorm with a frozen weight and a trainable bias).

Math over the last dim (H) of x [M, H], in fp32:

    LayerNorm:  mean = Σx/H,  rstd = 1/sqrt(Σ(x-mean)²/H + eps),  x̂ = (x - mean) rstd
    RMSNorm:    rstd = 1/sqrt(Σx²/H + eps),                     x̂ = x rstd
    y  = x̂ w + b
    g  = dy w;  dx = rstd (g - x̂ mean(g x̂) [- mean(g) for LayerNorm]);  db = Σ_rows dy;  dw never formed

Forward: one tile of BLOCK_M whole rows per program; mean and rstd (fp32, [M]) are saved, x̂ is recomputed.
Backward: one pass over x and dy. Program p walks the row blocks p, p + G, ... and keeps its running column
sum of dy in registers; it stores that once into partial[p, :], and ``_reduce_rows_kernel`` adds the G
partials in a fixed order (db is deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_kernels import _config
from peft_kernels.triton.bias_only import _alloc, _on_device, _reduce, _sm_count

__all__ = ["bias_norm_forward", "bias_norm_backward", "why_not", "MAX_HIDDEN"]

_INTERPRET = _config.SETTINGS.triton_interpret
MAX_HIDDEN = 16384  # one row tile in registers: beyond this the kernel would spill


def _row_block(h_pad: int) -> int:
    # ~8K elements per tile: enough rows in flight for small H, one row at H >= 8192.
    default = max(1, min(16, 8192 // h_pad))
    return _config.interpret_blocks("bias_norm", default) if _INTERPRET else default


def _warps(h_pad: int, block_m: int) -> int:
    return max(1, min(16, h_pad * block_m // 1024))


@triton.jit
def _normalize(x, w_ok_2d, H, eps, RMS: tl.constexpr):
    """(x̂, mean, rstd) of a [BLOCK_M, BLOCK_H] fp32 tile whose out-of-range columns are zero."""
    if RMS:
        mean = tl.zeros((x.shape[0],), dtype=tl.float32)
        xc = x
    else:
        mean = tl.sum(x, axis=1) / H
        xc = tl.where(w_ok_2d, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / H + eps)
    return xc * rstd[:, None], mean, rstd


@triton.jit
def _bias_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, H, eps,
    RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rh = tl.arange(0, BLOCK_H)
    m_ok = rm < M
    h_ok = rh < H
    ok = m_ok[:, None] & h_ok[None, :]
    offs = rm.to(tl.int64)[:, None] * H + rh[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xhat, mean, rstd = _normalize(x, ok, H, eps, RMS)
    w = tl.load(w_ptr + rh, mask=h_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rh, mask=h_ok, other=0.0).to(tl.float32)
    y = xhat * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    if not RMS:
        tl.store(mean_ptr + rm, mean, mask=m_ok)
    tl.store(rstd_ptr + rm, rstd, mask=m_ok)


@triton.jit
def _bias_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, M, H, n_programs,
    RMS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rh = tl.arange(0, BLOCK_H)
    h_ok = rh < H
    w = tl.load(w_ptr + rh, mask=h_ok, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for m0 in range(pid * BLOCK_M, M, n_programs * BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        ok = m_ok[:, None] & h_ok[None, :]
        offs = rm.to(tl.int64)[:, None] * H + rh[None, :]
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if NEED_DB:
            db += tl.sum(dy, axis=0)
        if NEED_DX:
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rm, mask=m_ok, other=0.0)
            if RMS:
                xhat = x * rstd[:, None]
            else:
                mean = tl.load(mean_ptr + rm, mask=m_ok, other=0.0)
                xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * w[None, :]
            c1 = tl.sum(xhat * g, axis=1) / H
            dx = g - xhat * c1[:, None]
            if not RMS:
                dx -= (tl.sum(g, axis=1) / H)[:, None]
            tl.store(dx_ptr + offs, (dx * rstd[:, None]).to(dx_ptr.dtype.element_ty), mask=ok)
    if NEED_DB:
        tl.store(part_ptr + pid.to(tl.int64) * H + rh, db, mask=h_ok)


def why_not(x: torch.Tensor) -> str | None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x has dtype {x.dtype}; the triton backend takes fp16, bf16 or fp32"
    if _INTERPRET and x.dtype == torch.bfloat16:
        return "x is bf16: bf16 is not exact under TRITON_INTERPRET=1 (tested on the GPU only)"
    if x.shape[1] > MAX_HIDDEN:
        return f"hidden size {x.shape[1]} > {MAX_HIDDEN}: one row must fit the kernel's tile"
    return None


def bias_norm_forward(x, weight, bias, eps: float, rms: bool):
    """x [M, H] contiguous -> (y in x's dtype, mean [M] fp32 (empty for RMS), rstd [M] fp32)."""
    M, H = x.shape
    dev = x.device
    y = _alloc((M, H), x.dtype, dev)
    mean = _alloc((0,) if rms else (M,), torch.float32, dev)
    rstd = _alloc((M,), torch.float32, dev)
    if M == 0:
        return y, mean, rstd
    h_pad = triton.next_power_of_2(H)
    bm = _row_block(h_pad)
    with _on_device(dev):
        _bias_norm_fwd_kernel[(triton.cdiv(M, bm),)](
            x, weight, bias, y, mean if not rms else rstd, rstd, M, H, float(eps),
            RMS=rms, BLOCK_M=bm, BLOCK_H=h_pad, num_warps=_warps(h_pad, bm),
        )  # fmt: skip
    return y, mean, rstd


def bias_norm_backward(dy, x, weight, mean, rstd, rms: bool, need_dx: bool, need_db: bool, db_dtype):
    """(dx [M, H] in x's dtype, db [H] in db_dtype), None where not requested; dy and x contiguous."""
    M, H = x.shape
    dev = x.device
    dx = _alloc((M, H), x.dtype, dev) if need_dx else None
    if M == 0:
        return dx, (torch.zeros((H,), dtype=db_dtype, device=dev) if need_db else None)
    h_pad = triton.next_power_of_2(H)
    bm = _row_block(h_pad)
    n_programs = max(1, min(triton.cdiv(M, bm), 2 * _sm_count(dev)))
    part = torch.empty((n_programs, H), dtype=torch.float32, device=dev) if need_db else rstd
    with _on_device(dev):
        _bias_norm_bwd_kernel[(n_programs,)](
            dy, x, weight, mean if not rms else rstd, rstd, dx if need_dx else dy, part, M, H, n_programs,
            RMS=rms, NEED_DX=need_dx, NEED_DB=need_db, BLOCK_M=bm, BLOCK_H=h_pad, num_warps=_warps(h_pad, bm),
        )  # fmt: skip
        db = _reduce(part, db_dtype) if need_db else None
    return dx, db


def compile_variants(quick: bool = False) -> list:
    """Forward and backward at the benchmark width (H = 4096, M = 8192) and the widest served (16384)."""
    from ._compile_check import jit_variant

    out = []
    for dt in ("bf16",) if quick else ("bf16", "fp16", "fp32"):
        for H in (4096,) if quick else (4096, 431, MAX_HIDDEN):
            h_pad = triton.next_power_of_2(H)
            bm = max(1, min(16, 8192 // h_pad))
            w = _warps(h_pad, bm)
            for rms in (False, True):
                tag = f"{'rms' if rms else 'layer'}.{dt}.H{H}"
                out.append(jit_variant(
                    f"bias_norm.fwd.{tag}", _bias_norm_fwd_kernel,
                    dict(x_ptr=f"*{dt}", w_ptr="*fp32", b_ptr="*fp32", y_ptr=f"*{dt}", mean_ptr="*fp32",
                         rstd_ptr="*fp32", M=8192, H=H, eps=1e-5),
                    dict(RMS=rms, BLOCK_M=bm, BLOCK_H=h_pad), num_warps=w, num_stages=1, kind="stream"))
                out.append(jit_variant(
                    f"bias_norm.bwd.{tag}", _bias_norm_bwd_kernel,
                    dict(dy_ptr=f"*{dt}", x_ptr=f"*{dt}", w_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
                         dx_ptr=f"*{dt}", part_ptr="*fp32", M=8192, H=H, n_programs=264),
                    dict(RMS=rms, NEED_DX=True, NEED_DB=True, BLOCK_M=bm, BLOCK_H=h_pad), num_warps=w,
                    num_stages=1, kind="stream"))
    return out
