"""Triton kernels and launchers for the fused bottleneck adapter (no autograd here; ops/adapter.py wraps them).

Math (h [N, H], W_down [m, H], W_up [H, m], bottleneck m <= 256, scaling s):

    z  = h W_downᵀ + b_down                       [N, m]  the only saved activation (h's dtype)
    y  = [h +] s (act(z) W_upᵀ + b_up)            one kernel: z and act(z) never leave the chip in between
    da = s dout W_up,  dz = da * act'(z)          kernel 2, one pass over dout per row block; writes dz and
                                                  act(z) ([N, m] each, tiny)
    dh = [dout +] dz W_down                       kernel 3, one pass over dout and h per column block:
    dW_up = s doutᵀ act(z),  db_up = s Σ dout      every [N, H]-sized gradient term comes from the same
    dW_down = dzᵀ h,  db_down = Σ dz               dout / h tiles

Passes over N·H (a pass = N·H elements read or written): forward 3 (h, h again for the residual, y; the second
read of a row block follows the first in the same program, so it is an L2 hit when BLOCK_M·H·2 bytes per
resident program fits in L2), backward 4 (dout, dout + h, dh). benchmarks/NOTES.md counts them.

Mixed-adapter batches: the weights are stacked [A, m, H] / [A, H, m] / [A, m] / [A, H] and every row carries
an adapter id. The op sorts the rows by id once (ops/adapter.py ``_route``): the row kernels gather rows through
the sorted order and loop over the (usually one) adapters present in their row block, with row masks; the column kernel
walks each adapter's contiguous segment of the sorted order. One adapter is the A = 1 case with no gather.

Weights are cast to h's dtype once (they are tiny); every dot accumulates in fp32; fp32 inputs use exact fp32
products (no tf32) so the interpreter and the GPU agree with the reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import _config

__all__ = ["adapter_forward", "adapter_backward", "Routing", "why_not", "MAX_BOTTLENECK", "ACT_CODES"]

MAX_BOTTLENECK = 256
ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "tanh": 4, "identity": 5}
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRET = _config.SETTINGS.triton_interpret


# ----------------------------------------------------------------------------------------------------------
# Activations (fp32 in, fp32 out), the same formulas as ops/adapter.py's activation_derivative
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates to ±1 without inf/inf for large |x|.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:
        return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 3:
        return z / (1.0 + tl.exp(-z))
    elif ACT == 4:
        return _tanh(z)
    else:
        return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    elif ACT == 3:
        sig = 1.0 / (1.0 + tl.exp(-z))
        return sig * (1.0 + z * (1.0 - sig))
    elif ACT == 4:
        t = _tanh(z)
        return 1.0 - t * t
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _block_rows(pid, order_ptr, ids_ptr, N, BLOCK_M: tl.constexpr, MIXED: tl.constexpr):
    """Rows of row block `pid` (int64 row indices into h), their validity, their adapter ids and the range of
    adapter ids in the block (ids are sorted along the order, so the block holds a contiguous id range)."""
    offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < N
    if MIXED:
        rows = tl.load(order_ptr + offs, mask=ok, other=0).to(tl.int64)
        ids = tl.load(ids_ptr + offs, mask=ok, other=-1)
        a_lo = tl.load(ids_ptr + pid * BLOCK_M)
        a_hi = tl.load(ids_ptr + tl.minimum(pid * BLOCK_M + BLOCK_M, N) - 1)
    else:
        rows = offs.to(tl.int64)
        ids = tl.zeros((BLOCK_M,), tl.int32)
        a_lo = 0
        a_hi = 0
    return rows, ok, ids, a_lo, a_hi


# ----------------------------------------------------------------------------------------------------------
# Forward: y = [h +] s (act(h Wdᵀ + bd) Wuᵀ + bu); z stored (h's dtype)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _adapter_fwd_kernel(
    h_ptr, y_ptr, z_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, scale_ptr, order_ptr, ids_ptr,
    N, H, M, scaling,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, RESIDUAL: tl.constexpr,
    MIXED: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr, M_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, ok, ids, a_lo, a_hi = _block_rows(pid, order_ptr, ids_ptr, N, BLOCK_M, MIXED)
    rm = tl.arange(0, M_PAD)
    m_ok = rm < M
    h_rows = h_ptr + rows[:, None] * H
    for a in range(a_lo, a_hi + 1):
        sel = ok & (ids == a) if MIXED else ok
        a64 = tl.cast(a, tl.int64) if MIXED else 0
        wd_base = wd_ptr + a64 * M * H
        wu_base = wu_ptr + a64 * H * M
        # Phase 1: z = h Wdᵀ over the H loop, fp32 in registers.
        acc = tl.zeros((BLOCK_M, M_PAD), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < H
            x = tl.load(h_rows + rk[None, :], mask=sel[:, None] & k_ok[None, :], other=0.0)
            wdt = tl.load(wd_base + rm[None, :] * H + rk[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            acc = tl.dot(x, wdt, acc, input_precision=DOT_PREC)
        if HAS_BD:
            acc += tl.load(bd_ptr + a64 * M + rm, mask=m_ok, other=0.0).to(tl.float32)[None, :]
        zq = acc.to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + rows[:, None] * M + rm[None, :], zq, mask=sel[:, None] & m_ok[None, :])
        # act from the rounded z, as the backward recomputes it; padded columns stay act(0) = 0.
        act = _act(zq.to(tl.float32), ACT).to(h_ptr.dtype.element_ty)
        if PER_ADAPTER_SCALE:
            s = tl.load(scale_ptr + a64)
        else:
            s = scaling
        # Phase 2: y = [h +] s (act Wuᵀ + bu), column block by column block.
        for n0 in range(0, H, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < H
            wut = tl.load(wu_base + rn[None, :] * M + rm[:, None], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.dot(act, wut, input_precision=DOT_PREC)
            if HAS_BU:
                u += tl.load(bu_ptr + a64 * H + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            u = u * s
            tile_ok = sel[:, None] & n_ok[None, :]
            if RESIDUAL:
                u += tl.load(h_rows + rn[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows[:, None] * H + rn[None, :], u.to(y_ptr.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------------------
# Backward, row pass: dz = s (dout Wu) * act'(z), a = act(z)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _adapter_bwd_rows_kernel(
    dy_ptr, z_ptr, wu_ptr, scale_ptr, order_ptr, ids_ptr, dz_ptr, a_ptr,
    N, H, M, scaling,
    ACT: tl.constexpr, MIXED: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr, NEED_DZ: tl.constexpr,
    M_PAD: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, ok, ids, a_lo, a_hi = _block_rows(pid, order_ptr, ids_ptr, N, BLOCK_M, MIXED)
    rm = tl.arange(0, M_PAD)
    m_ok = rm < M
    dy_rows = dy_ptr + rows[:, None] * H
    for a in range(a_lo, a_hi + 1):
        sel = ok & (ids == a) if MIXED else ok
        a64 = tl.cast(a, tl.int64) if MIXED else 0
        small_ok = sel[:, None] & m_ok[None, :]
        z = tl.load(z_ptr + rows[:, None] * M + rm[None, :], mask=small_ok, other=0.0).to(tl.float32)
        # act(z) for dW_up, written once here rather than recomputed by every column program.
        tl.store(a_ptr + rows[:, None] * M + rm[None, :], _act(z, ACT).to(a_ptr.dtype.element_ty), mask=small_ok)
        if NEED_DZ:
            wu_base = wu_ptr + a64 * H * M
            acc = tl.zeros((BLOCK_M, M_PAD), dtype=tl.float32)
            for n0 in range(0, H, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                n_ok = rn < H
                dy = tl.load(dy_rows + rn[None, :], mask=sel[:, None] & n_ok[None, :], other=0.0)
                wu = tl.load(wu_base + rn[:, None] * M + rm[None, :], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
                acc = tl.dot(dy, wu, acc, input_precision=DOT_PREC)
            if PER_ADAPTER_SCALE:
                s = tl.load(scale_ptr + a64)
            else:
                s = scaling
            # Rounded to h's dtype first, as the reference does, then times act'(z) in fp32.
            da = (acc * s).to(dz_ptr.dtype.element_ty).to(tl.float32)
            dz = da * _act_grad(z, ACT)
            tl.store(dz_ptr + rows[:, None] * M + rm[None, :], dz.to(dz_ptr.dtype.element_ty), mask=small_ok)


# ----------------------------------------------------------------------------------------------------------
# Backward, column pass: dh, dW_up, db_up, dW_down, db_down from the same dout / h tiles
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _adapter_bwd_cols_kernel(
    dy_ptr, h_ptr, dz_ptr, a_ptr, wd_ptr, order_ptr, seg_ptr, scale_ptr,
    dh_ptr, dwu_ptr, dbu_ptr, dwd_ptr, dbd_ptr,
    N, H, M, A, scaling,
    RESIDUAL: tl.constexpr, MIXED: tl.constexpr, PER_ADAPTER_SCALE: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DWU: tl.constexpr, NEED_DBU: tl.constexpr,
    NEED_DWD: tl.constexpr, NEED_DBD: tl.constexpr,
    M_PAD: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (column block c, split p) walks every adapter's rows in BLOCK_M chunks p, p + SPLIT, ...;
    weight-gradient partials go to fp32 buffers [SPLIT, A, ...] that the launcher sums in a fixed order
    (deterministic; no atomics). db_down partials come from the programs of column block 0 only."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    split = tl.num_programs(1)
    rn = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < H
    rm = tl.arange(0, M_PAD)
    m_ok = rm < M
    for a in range(0, A):
        a64 = tl.cast(a, tl.int64) if MIXED else 0
        if MIXED:
            start = tl.load(seg_ptr + a)
            end = tl.load(seg_ptr + a + 1)
        else:
            start = 0
            end = N
        if PER_ADAPTER_SCALE:
            s = tl.load(scale_ptr + a64)
        else:
            s = scaling
        if NEED_DH:
            wd = tl.load(wd_ptr + a64 * M * H + rm[:, None] * H + rn[None, :],
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
        acc_wu = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
        acc_wd = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        acc_bu = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_bd = tl.zeros((M_PAD,), dtype=tl.float32)
        for r0 in range(start + pid_s * BLOCK_M, end, split * BLOCK_M):
            offs = r0 + tl.arange(0, BLOCK_M)
            ok = offs < end
            if MIXED:
                rows = tl.load(order_ptr + offs, mask=ok, other=0).to(tl.int64)
            else:
                rows = offs.to(tl.int64)
            tile_ok = ok[:, None] & n_ok[None, :]
            small_ok = ok[:, None] & m_ok[None, :]
            dy = tl.load(dy_ptr + rows[:, None] * H + rn[None, :], mask=tile_ok, other=0.0)
            if NEED_DH or NEED_DWD or NEED_DBD:
                dz = tl.load(dz_ptr + rows[:, None] * M + rm[None, :], mask=small_ok, other=0.0)
            if NEED_DWU:
                act = tl.load(a_ptr + rows[:, None] * M + rm[None, :], mask=small_ok, other=0.0)
                acc_wu = tl.dot(tl.trans(dy), act, acc_wu, input_precision=DOT_PREC)
            if NEED_DBU:
                acc_bu += tl.sum(dy.to(tl.float32), axis=0)
            if NEED_DWD:
                x = tl.load(h_ptr + rows[:, None] * H + rn[None, :], mask=tile_ok, other=0.0)
                acc_wd = tl.dot(tl.trans(dz), x, acc_wd, input_precision=DOT_PREC)
            if NEED_DBD:
                if pid_c == 0:
                    acc_bd += tl.sum(dz.to(tl.float32), axis=0)
            if NEED_DH:
                g = tl.dot(dz, wd, input_precision=DOT_PREC)
                if RESIDUAL:
                    g += dy.to(tl.float32)
                tl.store(dh_ptr + rows[:, None] * H + rn[None, :], g.to(dh_ptr.dtype.element_ty), mask=tile_ok)
        part = pid_s.to(tl.int64) * A + a
        if NEED_DWU:
            tl.store(dwu_ptr + part * H * M + rn[:, None] * M + rm[None, :], acc_wu * s,
                     mask=n_ok[:, None] & m_ok[None, :])  # fmt: skip
        if NEED_DBU:
            tl.store(dbu_ptr + part * H + rn, acc_bu * s, mask=n_ok)
        if NEED_DWD:
            tl.store(dwd_ptr + part * M * H + rm[:, None] * H + rn[None, :], acc_wd,
                     mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip
        if NEED_DBD:
            if pid_c == 0:
                tl.store(dbd_ptr + part * M + rm, acc_bd, mask=m_ok)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
class Routing(NamedTuple):
    """Rows sorted by adapter id: ``order`` (int64 [N]) the row indices, ``ids`` (int32 [N]) the sorted ids,
    ``seg`` (int32 [A + 1]) where each adapter's rows start in the order."""

    order: torch.Tensor
    ids: torch.Tensor
    seg: torch.Tensor


def why_not(h: torch.Tensor, W_down: torch.Tensor) -> str | None:
    """None when these launchers serve the inputs, else the reason (naming the argument)."""
    if h.device.type != "cuda" and not (_INTERPRET and h.device.type == "cpu"):
        return f"h is on {h.device}: needs CUDA (or CPU tensors under TRITON_INTERPRET=1)"
    if h.dtype not in _ACT_DTYPES:
        return f"h dtype {h.dtype} is not fp16/bf16/fp32"
    if _INTERPRET and h.dtype == torch.bfloat16:
        return "bf16 tl.dot gives wrong results under TRITON_INTERPRET=1"
    m = W_down.shape[-2]
    if m > MAX_BOTTLENECK:
        return f"bottleneck width m = W_down.shape[-2] = {m} exceeds {MAX_BOTTLENECK} (kept on chip)"
    return None


def _alloc(shape, dtype, device) -> torch.Tensor:
    if _config.poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _m_pad(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _dot_prec(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _blocks(kernel: str, m_pad: int, dtype: torch.dtype) -> dict:
    """Tile sizes (and warps) per kernel. The [*, m_pad] fp32 accumulators set the row/column block sizes:
    register tiles of ~16K fp32 per program at 8 warps, fewer at fp32 inputs (twice the operand bytes)."""
    wide = m_pad >= 128 or dtype == torch.float32
    if _INTERPRET:
        default = {"fwd": (16, 32, 32), "rows": (16, 32), "cols": (16, 32, 2)}[kernel]
        return dict(zip(("a", "b", "c"), _config.interpret_blocks(kernel, default)))
    if kernel == "fwd":  # BLOCK_M, BLOCK_K, BLOCK_N
        # 32 rows: a program's [32, H] slice of h (256 KB at H = 4096 bf16) times ~132 resident programs fits in
        # L2, so phase 2's second read of h (the residual) should hit L2 rather than HBM.
        return {"a": 32, "b": 64, "c": 64, "warps": 8 if m_pad >= 128 else 4, "stages": 3}
    if kernel == "rows":  # BLOCK_M, BLOCK_N
        return {"a": 32 if wide else 64, "b": 64, "warps": 8 if m_pad >= 128 else 4, "stages": 3}
    # cols: BLOCK_M, BLOCK_N (two [BLOCK_N, m_pad] fp32 accumulators live across the row loop), split chosen by
    # the launcher. 8 warps: at 4 the bf16 m = 64 config needed 255 registers and spilled (compile check, sm_90a).
    # fp32 dots are exact fp32 FMAs (no tensor cores): smaller tiles keep them in registers.
    if dtype == torch.float32:
        bn = {16: 32, 32: 32, 64: 16, 128: 16, 256: 16}[m_pad]
        return {"a": 16, "b": bn, "c": None, "warps": 8 if m_pad <= 128 else 16, "stages": 2}
    bm, bn = {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (32, 16), 256: (16, 16)}[m_pad]
    return {"a": bm, "b": bn, "c": None, "warps": 8, "stages": 2}


def _launch_opts(b: dict) -> dict:
    return {} if _INTERPRET else {"num_warps": b["warps"], "num_stages": b["stages"]}


def _stack(t: torch.Tensor | None, mixed: bool, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.to(dtype)
    return (t if mixed else t.unsqueeze(0)).contiguous()


def adapter_forward(h, W_down, b_down, W_up, b_up, activation: str, scaling, residual: bool,
                    routing: Routing | None = None):
    """(y [N, H], z [N, m]) for h [N, H] (contiguous). With ``routing``, weights are stacked per adapter and
    ``scaling`` is a float or an fp32 tensor [A]."""
    N, H = h.shape
    mixed = routing is not None
    m = W_down.shape[-2]
    dt = h.dtype
    wd, wu = _stack(W_down, mixed, dt), _stack(W_up, mixed, dt)
    bd, bu = _stack(b_down, mixed, dt), _stack(b_up, mixed, dt)
    y = _alloc((N, H), dt, h.device)
    z = _alloc((N, m), dt, h.device)
    if N == 0:
        return y, z
    per_scale = isinstance(scaling, torch.Tensor)
    m_pad = _m_pad(m)
    b = _blocks("fwd", m_pad, dt)
    grid = (triton.cdiv(N, b["a"]),)
    _adapter_fwd_kernel[grid](
        h, y, z, wd, bd if bd is not None else wd, wu, bu if bu is not None else wu,
        scaling if per_scale else h, routing.order if mixed else h, routing.ids if mixed else h,
        N, H, m, 0.0 if per_scale else float(scaling),
        ACT=ACT_CODES[activation], HAS_BD=bd is not None, HAS_BU=bu is not None, RESIDUAL=residual,
        MIXED=mixed, PER_ADAPTER_SCALE=per_scale, M_PAD=m_pad, DOT_PREC=_dot_prec(dt),
        BLOCK_M=b["a"], BLOCK_K=b["b"], BLOCK_N=b["c"], **_launch_opts(b),
    )  # fmt: skip
    return y, z


def adapter_backward(dy, h, W_down, b_down, W_up, b_up, z, activation: str, scaling, residual: bool,
                     needs, routing: Routing | None = None):
    """(dh, dW_down, db_down, dW_up, db_up), None where ``needs`` says so; weight gradients in each weight's
    own dtype (fp32 accumulation)."""
    need_dh, need_dwd, need_dbd, need_dwu, need_dbu = (bool(n) for n in needs)
    need_dbd, need_dbu = need_dbd and b_down is not None, need_dbu and b_up is not None
    N, H = h.shape
    mixed = routing is not None
    m = W_down.shape[-2]
    A = W_down.shape[0] if mixed else 1
    dt = h.dtype
    dev = h.device
    per_scale = isinstance(scaling, torch.Tensor)
    s_val = 0.0 if per_scale else float(scaling)
    s_ptr = scaling if per_scale else h
    m_pad = _m_pad(m)
    dot_prec = _dot_prec(dt)
    wd, wu = _stack(W_down, mixed, dt), _stack(W_up, mixed, dt)
    order = routing.order if mixed else h
    need_dz = need_dh or need_dwd or need_dbd

    dh = _alloc((N, H), dt, dev) if need_dh else None
    if N == 0:
        zero = torch.zeros
        return (dh, zero(W_down.shape, dtype=W_down.dtype, device=dev) if need_dwd else None,
                zero(b_down.shape, dtype=b_down.dtype, device=dev) if need_dbd else None,
                zero(W_up.shape, dtype=W_up.dtype, device=dev) if need_dwu else None,
                zero(b_up.shape, dtype=b_up.dtype, device=dev) if need_dbu else None)  # fmt: skip
    dz = _alloc((N, m), dt, dev) if need_dz else None
    act = _alloc((N, m), dt, dev)
    b = _blocks("rows", m_pad, dt)
    _adapter_bwd_rows_kernel[(triton.cdiv(N, b["a"]),)](
        dy, z, wu, s_ptr, order, routing.ids if mixed else h, dz if need_dz else act, act,
        N, H, m, s_val,
        ACT=ACT_CODES[activation], MIXED=mixed, PER_ADAPTER_SCALE=per_scale, NEED_DZ=need_dz,
        M_PAD=m_pad, DOT_PREC=dot_prec, BLOCK_M=b["a"], BLOCK_N=b["b"], **_launch_opts(b),
    )  # fmt: skip

    b = _blocks("cols", m_pad, dt)
    col_blocks = triton.cdiv(H, b["b"])
    if b["c"] is not None:
        split = b["c"]
    else:
        # Enough programs for two waves; each split adds A·(H·m·2 + H + m) fp32 of partials.
        split = max(1, min(triton.cdiv(2 * _num_sms(dev.index or 0), col_blocks), triton.cdiv(N, b["a"]), 16))
    f32 = torch.float32
    dwu_p = torch.empty((split, A, H, m), dtype=f32, device=dev) if need_dwu else None
    dbu_p = torch.empty((split, A, H), dtype=f32, device=dev) if need_dbu else None
    dwd_p = torch.empty((split, A, m, H), dtype=f32, device=dev) if need_dwd else None
    dbd_p = torch.empty((split, A, m), dtype=f32, device=dev) if need_dbd else None
    dummy = act
    _adapter_bwd_cols_kernel[(col_blocks, split)](
        dy, h, dz if need_dz else dummy, act, wd, order, routing.seg if mixed else h, s_ptr,
        dh if need_dh else dummy, dwu_p if need_dwu else dummy, dbu_p if need_dbu else dummy,
        dwd_p if need_dwd else dummy, dbd_p if need_dbd else dummy,
        N, H, m, A, s_val,
        RESIDUAL=residual, MIXED=mixed, PER_ADAPTER_SCALE=per_scale,
        NEED_DH=need_dh, NEED_DWU=need_dwu, NEED_DBU=need_dbu, NEED_DWD=need_dwd, NEED_DBD=need_dbd,
        M_PAD=m_pad, DOT_PREC=dot_prec, BLOCK_M=b["a"], BLOCK_N=b["b"], **_launch_opts(b),
    )  # fmt: skip

    def _reduce(p, like):
        if p is None:
            return None
        g = p[0] if split == 1 else p.sum(0)
        return (g if mixed else g[0]).to(like.dtype)

    return dh, _reduce(dwd_p, W_down), _reduce(dbd_p, b_down), _reduce(dwu_p, W_up), _reduce(dbu_p, b_up)


# ----------------------------------------------------------------------------------------------------------
# Compile-check protocol (peft_kernels/triton/_compile_check.py)
# ----------------------------------------------------------------------------------------------------------
def compile_variants(quick: bool = False) -> list:
    """Every kernel at the launchers' GPU tile choices: bf16/fp16/fp32 x bottleneck pads 16/64/128/256 x one
    adapter / a mixed batch (per-adapter scaling), with biases and residual (the benchmark case). The dots are
    thin ([32-64, m] x [m, 64]): mma, not wgmma, and memory-bound, so every variant is a "stream".
    quick (CI): bf16, m = 64, one adapter and mixed."""
    from ._compile_check import Variant

    out = []
    dtypes, pads = (("bf16",), (64,)) if quick else (("bf16", "fp16", "fp32"), (16, 64, 128, 256))
    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dt in dtypes:
        for m_pad in pads:
            for mixed in (False, True):
                tag = f"{dt}.m{m_pad}{'.mixed' if mixed else ''}"
                order_t, ids_t = ("*i64", "*i32") if mixed else (f"*{dt}", f"*{dt}")
                scale_t = "*fp32" if mixed else f"*{dt}"
                prec = "ieee" if dt == "fp32" else None
                common = dict(MIXED=mixed, PER_ADAPTER_SCALE=mixed, M_PAD=m_pad, DOT_PREC=prec)
                b = _blocks("fwd", m_pad, torch_dt[dt])
                out.append(Variant(
                    name=f"adapter.fwd.{tag}.{b['a']}x{b['b']}x{b['c']}w{b['warps']}s{b['stages']}",
                    kernel=_adapter_fwd_kernel,
                    signature={"h_ptr": f"*{dt}", "y_ptr": f"*{dt}", "z_ptr": f"*{dt}", "wd_ptr": f"*{dt}",
                               "bd_ptr": f"*{dt}", "wu_ptr": f"*{dt}", "bu_ptr": f"*{dt}", "scale_ptr": scale_t,
                               "order_ptr": order_t, "ids_ptr": ids_t, "N": "i32", "H": "i32", "M": "i32",
                               "scaling": "fp32"},
                    constexprs=dict(ACT=0, HAS_BD=True, HAS_BU=True, RESIDUAL=True, BLOCK_M=b["a"],
                                    BLOCK_K=b["b"], BLOCK_N=b["c"], **common),
                    num_warps=b["warps"], num_stages=b["stages"],
                    divisible=("h_ptr", "y_ptr", "z_ptr", "wd_ptr", "wu_ptr", "N", "H", "M"),
                ))  # fmt: skip
                b = _blocks("rows", m_pad, torch_dt[dt])
                out.append(Variant(
                    name=f"adapter.bwd_rows.{tag}.{b['a']}x{b['b']}w{b['warps']}s{b['stages']}",
                    kernel=_adapter_bwd_rows_kernel,
                    signature={"dy_ptr": f"*{dt}", "z_ptr": f"*{dt}", "wu_ptr": f"*{dt}", "scale_ptr": scale_t,
                               "order_ptr": order_t, "ids_ptr": ids_t, "dz_ptr": f"*{dt}", "a_ptr": f"*{dt}",
                               "N": "i32", "H": "i32", "M": "i32", "scaling": "fp32"},
                    constexprs=dict(ACT=0, NEED_DZ=True, BLOCK_M=b["a"], BLOCK_N=b["b"], **common),
                    num_warps=b["warps"], num_stages=b["stages"],
                    divisible=("dy_ptr", "z_ptr", "wu_ptr", "dz_ptr", "a_ptr", "N", "H", "M"),
                ))  # fmt: skip
                b = _blocks("cols", m_pad, torch_dt[dt])
                out.append(Variant(
                    name=f"adapter.bwd_cols.{tag}.{b['a']}x{b['b']}w{b['warps']}s{b['stages']}",
                    kernel=_adapter_bwd_cols_kernel,
                    signature={"dy_ptr": f"*{dt}", "h_ptr": f"*{dt}", "dz_ptr": f"*{dt}", "a_ptr": f"*{dt}",
                               "wd_ptr": f"*{dt}", "order_ptr": order_t, "seg_ptr": "*i32" if mixed else f"*{dt}",
                               "scale_ptr": scale_t, "dh_ptr": f"*{dt}", "dwu_ptr": "*fp32", "dbu_ptr": "*fp32",
                               "dwd_ptr": "*fp32", "dbd_ptr": "*fp32", "N": "i32", "H": "i32", "M": "i32",
                               "A": "i32", "scaling": "fp32"},
                    constexprs=dict(RESIDUAL=True, NEED_DH=True, NEED_DWU=True, NEED_DBU=True, NEED_DWD=True,
                                    NEED_DBD=True, BLOCK_M=b["a"], BLOCK_N=b["b"], **common),
                    num_warps=b["warps"], num_stages=b["stages"],
                    divisible=("dy_ptr", "h_ptr", "dz_ptr", "a_ptr", "wd_ptr", "dh_ptr", "dwu_ptr", "dwd_ptr", "N",
                               "H", "M"),
                ))  # fmt: skip
    return out
