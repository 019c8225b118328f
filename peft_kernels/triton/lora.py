"""Triton kernels and launchers for the fused LoRA linear (no autograd here; ops/lora.py wraps them).

Math (x [M, K], W [N, K], A [r, K], B [N, r], scaling s, dropout p, mask from ``ops.dropout_mask``):

    S  = drop(x) @ A^T                       [M, r]  activation dtype: the only extra saved activation
    y  = x @ W^T + bias + S @ (s B)^T        one GEMM, the LoRA term a second phase into the same accumulator
    G  = dy @ (s B)                          [M, r]
    dx = dy @ W + keep/(1-p) * (G @ A)       one GEMM, same two-phase epilogue (masked when p > 0)
    dB = s dy^T @ S,  db = sum_m dy          fused into the pass over dy that computes G
    dA = G^T @ drop(x)                       split-M pass over x, mask regenerated
    dW = dy^T @ x                            only when W is trainable

Adapter weights (usually fp32 masters) are cast to the activation dtype once (they are tiny); every dot
accumulates in fp32, activations are never copied to fp32. The dropout mask is regenerated from
(seed, offset) with ``tl.rand`` -- bit-identical to ``ops.dropout_mask.dropout_keep_mask`` -- never stored.

Two paths for the big GEMMs: TMA tensor descriptors + a persistent, L2-grouped tile loop (the fast path on
Hopper), and a pointer-based ``tl.load``/``tl.dot`` fallback for strides/base pointers TMA cannot take
(it needs 16-byte aligned leading strides and bases and a unit inner stride). ``force_path`` picks one.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

from ..ops.dropout_mask import normalize_seed

__all__ = ["lora_forward", "lora_backward", "supports", "tma_compatible", "force_path"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# PEFT_KERNELS_TRITON_AUTOTUNE=0: one fixed config per kernel (GPU test runs: many shapes, no time to tune each).
_AUTOTUNE = os.environ.get("PEFT_KERNELS_TRITON_AUTOTUNE", "1") != "0"
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_RANK = 128
_HAS_TMA_API = hasattr(tl, "make_tensor_descriptor")
# Flattening the persistent loop lets the compiler pipeline across tiles; the env switch is an escape hatch
# should a Triton release miscompile the two-phase epilogue with it.
_FLATTEN = os.environ.get("PEFT_KERNELS_TRITON_FLATTEN", "1") != "0"

# None: choose per GEMM (TMA when the operands allow it); "tma" or "pointer": force (tests).
FORCE_PATH: str | None = None
# Tests set this: launchers then allocate their outputs filled with NaN, so an unwritten element shows.
POISON_OUTPUTS: bool = os.environ.get("PEFT_KERNELS_POISON") == "1"


@contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Force the GEMM path (``"tma"``, ``"pointer"``, or ``None`` for automatic) within the block."""
    global FORCE_PATH
    if path not in (None, "tma", "pointer"):
        raise ValueError(f"force_path: path must be 'tma', 'pointer' or None, got {path!r}")
    old, FORCE_PATH = FORCE_PATH, path
    try:
        yield
    finally:
        FORCE_PATH = old


# ----------------------------------------------------------------------------------------------------------
# Configs: autotuned on a GPU; one small config under the interpreter so tests stay fast.
# ----------------------------------------------------------------------------------------------------------


def _gemm_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
    if not _AUTOTUNE:
        # The fast config, plus a small one that fits shared memory where it does not (fp32 at r = 128): the
        # autotuner drops a config that fails with out-of-resources.
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=2)]
    shapes = [
        # BM, BN, BK, warps, stages
        (128, 256, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _prune_gemm(configs, named_args, **kwargs):
    # Tiles far larger than the problem only waste benchmarking time (decode-sized M, tiny N).
    m, n = named_args["M"], named_args["N"]
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
        and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
    ]
    return keep or configs[-1:]


def _skinny_configs(block_names: dict[str, list[int]]) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({k: 32 for k in block_names})]
    if not _AUTOTUNE:
        return [triton.Config({k: v[0] for k, v in block_names.items()}, num_warps=4, num_stages=3)]
    keys = list(block_names)
    out = []
    for vals in zip(*block_names.values()):
        for w in (4, 8):
            for s in (2, 3, 4):
                out.append(triton.Config(dict(zip(keys, vals)), num_warps=w, num_stages=s))
    return out


# Fixed (not autotuned) tile sizes where the launcher must size a buffer or a grid before launch.
_DY_BLOCK_M = 32 if _INTERPRET else 64
_DA_BLOCK_K = 32 if _INTERPRET else 128


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # GROUP_M row-tiles share the same column tiles consecutively, so W/B tiles stay in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _load_2d(ptr, rows, cols, stride_row, stride_col, row_ok, col_ok):
    """The [rows, cols] tile of a strided 2-D operand, zero outside row_ok x col_ok."""
    return tl.load(
        ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    )


@triton.jit
def _store_2d(ptr, rows, cols, stride_row, stride_col, row_ok, col_ok, value):
    """Store `value` (cast to the pointee type) into the [rows, cols] tile of a strided 2-D operand."""
    ptrs = ptr + rows[:, None] * stride_row + cols[None, :] * stride_col
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _keep_mask(seed, p, rows, cols, n_cols):
    """Keep mask of the [rows, cols] tile of a [*, n_cols] activation: tl.rand(seed, (i*n_cols+j) mod 2**32)
    >= p, the definition in ops/dropout_mask.py. uint32 arithmetic wraps exactly like the mod 2**32."""
    offs = rows.to(tl.uint32)[:, None] * n_cols + cols.to(tl.uint32)[None, :]
    tl.static_assert(offs.dtype == tl.uint32)
    return tl.rand(seed, offs) >= p


@triton.jit
def _lora_epilogue(
    acc, rm, rn, M, N, R,
    l_ptr, r_ptr, bias_ptr,
    stride_lm, stride_lr, stride_rr, stride_rn,
    p, inv_keep, seed,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """acc += L[rm, :R] @ Rt[:R, rn] (masked by the dropout keep mask, scaled by 1/(1-p)) + bias[rn].

    r is padded to R_PAD (>= 16, a power of two) by masked loads, so tl.dot gets legal shapes for any r."""
    if HAS_LORA:
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        lt = _load_2d(l_ptr, rm64, rr, stride_lm, stride_lr, rm < M, r_ok)
        rt = _load_2d(r_ptr, rr, rn64, stride_rr, stride_rn, r_ok, rn < N)
        if HAS_DROPOUT:
            # The mask applies to the LoRA term only: a second small accumulator, masked here.
            lo = tl.dot(lt, rt, input_precision=DOT_PREC)
            keep = _keep_mask(seed, p, rm, rn, N)
            acc += tl.where(keep, lo * inv_keep, 0.0)
        else:
            acc = tl.dot(lt, rt, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += bias[None, :]
    return acc


# ----------------------------------------------------------------------------------------------------------
# Main GEMM: C[M, N] = A[M, K] @ B[K, N] (+ LoRA phase 2, + bias). fwd: A=x, B=W^T, L=S, Rt=(sB)^T.
# dx: A=dy, B=W, L=G, Rt=A_lora (masked). dW: A=dy^T, B=x.
# ----------------------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_LORA", "HAS_DROPOUT", "A_T", "B_T"],
    prune_configs_by={"early_config_prune": _prune_gemm},
)
@triton.jit
def _gemm_lora_tma_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, r_ptr,
    M, N, K, R, M_BUCKET,
    stride_a, stride_b, stride_c,
    stride_lm, stride_lr, stride_rr, stride_rn,
    p, inv_keep, seed,
    A_T: tl.constexpr, B_T: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PREC: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # A_T: A is stored [K, M] (row stride stride_a); B_T: B is stored [N, K]. TMA zero-fills out-of-bounds
    # loads and clips stores, so partial tiles need no masks here.
    if A_T:
        a_desc = tl.make_tensor_descriptor(a_ptr, [K, M], [stride_a, 1], [BLOCK_K, BLOCK_M])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_a, 1], [BLOCK_M, BLOCK_K])
    if B_T:
        b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [stride_b, 1], [BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [stride_b, 1], [BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_c, 1], [BLOCK_M, BLOCK_N])

    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue recomputes its tile id separately so the flattened loop's prologue (loads of the next
    # tile) does not depend on it.
    tile_id_c = start_pid - NUM_SMS
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            if A_T:
                a = a_desc.load([off_k, off_m]).T
            else:
                a = a_desc.load([off_m, off_k])
            if B_T:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)

        tile_id_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _lora_epilogue(
            acc, rm, rn, M, N, R, l_ptr, r_ptr, bias_ptr,
            stride_lm, stride_lr, stride_rr, stride_rn, p, inv_keep, seed,
            HAS_BIAS, HAS_LORA, HAS_DROPOUT, R_PAD, DOT_PREC,
        )  # fmt: skip
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "R_PAD", "HAS_LORA", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_gemm},
)
@triton.jit
def _gemm_lora_ptr_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, r_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_rr, stride_rn,
    p, inv_keep, seed,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        rk64 = rk.to(tl.int64)
        a = tl.load(a_rows + rk64[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + rk64[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    acc = _lora_epilogue(
        acc, rm, rn, M, N, R, l_ptr, r_ptr, bias_ptr,
        stride_lm, stride_lr, stride_rr, stride_rn, p, inv_keep, seed,
        HAS_BIAS, HAS_LORA, HAS_DROPOUT, R_PAD, DOT_PREC,
    )  # fmt: skip
    _store_2d(c_ptr, rm.to(tl.int64), rn.to(tl.int64), stride_cm, stride_cn, m_ok, n_ok, acc)


# ----------------------------------------------------------------------------------------------------------
# Skinny kernels (memory-bound streams over x or dy; pointer-based, the r-sized operands are L2-resident)
# ----------------------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_skinny_configs({"BLOCK_M": [64, 64, 128], "BLOCK_K": [64, 128, 64]}),
    key=["M_BUCKET", "K", "R_PAD", "HAS_DROPOUT"],
)
@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, s_ptr, M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    p, inv_keep, seed,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """S = (keep * x) @ A^T / (1 - p): one pass over x, the mask generated once per element."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    r_ok = rr < R
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        rk64 = rk.to(tl.int64)
        x = tl.load(x_rows + rk64[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, p, rm, rk, K), x, 0.0)
        at = _load_2d(a_ptr, rk64, rr, stride_ak, stride_ar, k_ok, r_ok)
        acc = tl.dot(x, at, acc, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    _store_2d(s_ptr, rm.to(tl.int64), rr, stride_sm, stride_sr, m_ok, r_ok, acc)


@triton.autotune(
    configs=_skinny_configs({"BLOCK_N": [64, 128]}),
    key=["M_BUCKET", "N", "R_PAD", "COMPUTE_G", "COMPUTE_DLB", "COMPUTE_DBIAS"],
    # Atomic targets must not keep what benchmarking runs added.
    restore_value=["dlb_ptr", "dbias_ptr"],
)
@triton.jit
def _lora_dy_kernel(
    dy_ptr, bs_ptr, s_ptr, g_ptr, dlb_ptr, dbias_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_gm, stride_gr,
    scaling,
    COMPUTE_G: tl.constexpr, COMPUTE_DLB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, PARTIALS: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One pass over dy per BLOCK_M rows: G = dy @ (sB) (kept in registers across the N loop), and the
    M-reductions dB += s dy^T @ S and dbias += colsum(dy) of the same dy tile.

    Reduction choice: the program owns a row block, so dB/dbias partials are fp32 atomics (relaxed) per
    (row block, column block) -- cM/BLOCK_M * N * r adds, cheap next to re-reading dy for a separate
    reduction kernel. PARTIALS (set under torch.use_deterministic_algorithms) writes per-row-block partials
    [num_row_blocks, N, r] instead, summed by the launcher in a fixed order."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    r_ok = rr < R
    rm64 = rm.to(tl.int64)
    if COMPUTE_DLB:
        s_tile = _load_2d(s_ptr, rm64, rr, stride_sm, stride_sr, m_ok, r_ok)
    g = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    # Partial buffers are contiguous fp32 [(P,) N, R] / [(P,) N]; int64 offsets.
    if PARTIALS:
        dlb_base = dlb_ptr + pid.to(tl.int64) * N * R
        dbias_base = dbias_ptr + pid.to(tl.int64) * N
    else:
        dlb_base = dlb_ptr
        dbias_base = dbias_ptr
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rn64 = rn.to(tl.int64)
        dy = _load_2d(dy_ptr, rm64, rn64, stride_dym, stride_dyn, m_ok, n_ok)
        if COMPUTE_G:
            bt = _load_2d(bs_ptr, rn64, rr, stride_bn, stride_br, n_ok, r_ok)
            g = tl.dot(dy, bt, g, input_precision=DOT_PREC)
        if COMPUTE_DLB:
            part = tl.dot(tl.trans(dy), s_tile, input_precision=DOT_PREC) * scaling
            dlb_ptrs = dlb_base + rn64[:, None] * R + rr[None, :]
            dlb_mask = n_ok[:, None] & r_ok[None, :]
            if PARTIALS:
                tl.store(dlb_ptrs, part, mask=dlb_mask)
            else:
                tl.atomic_add(dlb_ptrs, part, mask=dlb_mask, sem="relaxed")
        if COMPUTE_DBIAS:
            colsum = tl.sum(dy.to(tl.float32), axis=0)
            if PARTIALS:
                tl.store(dbias_base + rn64, colsum, mask=n_ok)
            else:
                tl.atomic_add(dbias_base + rn64, colsum, mask=n_ok, sem="relaxed")
    if COMPUTE_G:
        _store_2d(g_ptr, rm64, rr, stride_gm, stride_gr, m_ok, r_ok, g)


@triton.autotune(
    configs=_skinny_configs({"BLOCK_M": [32, 64, 128]}),
    key=["M_BUCKET", "K", "R_PAD", "HAS_DROPOUT", "SPLIT_M"],
)
@triton.jit
def _lora_da_kernel(
    g_ptr, x_ptr, part_ptr, M, K, R, M_BUCKET, SPLIT_M,
    stride_gm, stride_gr, stride_xm, stride_xk,
    p, inv_keep, seed,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dA partials: program (k block, split s) reduces G^T @ (keep * x) over row blocks s, s+SPLIT_M, ...
    and stores [R, BLOCK_K] into part[s]; the launcher sums the SPLIT_M slices (two-stage, deterministic,
    SPLIT_M * r * K floats: small). One pass over x, the mask regenerated once per element."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    k_ok = rk < K
    r_ok = rr < R
    rk64 = rk.to(tl.int64)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, SPLIT_M * BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rm64 = rm.to(tl.int64)
        g = _load_2d(g_ptr, rm64, rr, stride_gm, stride_gr, m_ok, r_ok)
        x = _load_2d(x_ptr, rm64, rk64, stride_xm, stride_xk, m_ok, k_ok)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, p, rm, rk, K), x, 0.0)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    part_ptrs = part_ptr + pid_s.to(tl.int64) * R * K + rr[:, None] * K + rk64[None, :]
    tl.store(part_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and not _INTERPRET:
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few persistent programs so each walks several tiles


def _device_ok(device: torch.device) -> tuple[bool, str]:
    if _INTERPRET:
        return True, ""
    if device.type != "cuda":
        return False, f"device {device} needs CUDA (or TRITON_INTERPRET=1 for CPU tensors)"
    return True, ""


def supports(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> tuple[bool, str]:
    """Whether these launchers can serve the inputs, and the reason when they cannot."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A)):
        if not isinstance(t, torch.Tensor):
            return False, f"{name} must be a tensor"
        if t.dim() != 2:
            return False, f"{name} must be 2-D, got shape {tuple(t.shape)}"
    ok, why = _device_ok(x.device)
    if not ok:
        return False, why
    if weight.device != x.device or lora_A.device != x.device:
        return (
            False,
            f"x, weight and lora_A must share a device, got {x.device}, {weight.device}, {lora_A.device}",
        )
    if x.dtype not in _ACT_DTYPES:
        return False, f"x dtype {x.dtype} not in fp16/bf16/fp32"
    if weight.dtype != x.dtype:
        return False, f"weight dtype {weight.dtype} must equal x dtype {x.dtype}"
    if lora_A.dtype not in _ACT_DTYPES:
        return False, f"lora_A dtype {lora_A.dtype} not in fp16/bf16/fp32"
    if _INTERPRET and x.dtype == torch.bfloat16:
        return False, "bf16 tl.dot gives wrong results under TRITON_INTERPRET=1"
    M, K = x.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    if weight.shape[1] != K or lora_A.shape[1] != K:
        shapes = f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}"
        return False, f"in_features mismatch: {shapes}"
    if K < 1 or N < 1:
        return False, f"in_features and out_features must be >= 1, got K={K}, N={N}"
    if not 1 <= r <= _MAX_RANK:
        return False, f"rank r={r} outside [1, {_MAX_RANK}]"
    return True, ""


def _tma_layout(t: torch.Tensor) -> tuple[bool, int] | None:
    """(stored transposed, leading stride) of a 2-D operand as a TMA descriptor sees it, or None if TMA
    cannot address it: unit inner stride, 16-byte aligned leading stride and base pointer."""
    if t.dim() != 2 or t.data_ptr() % 16:
        return None
    es = t.element_size()
    if t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0 and t.stride(0) >= max(1, t.size(1)):
        return False, t.stride(0)
    if t.stride(0) == 1 and (t.stride(1) * es) % 16 == 0 and t.stride(1) >= max(1, t.size(0)):
        return True, t.stride(1)
    return None


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether the TMA path can take every given 2-D operand (as a row-major or transposed view):
    a Hopper+ GPU (or the interpreter) and 16-byte aligned strides and bases."""
    if not _HAS_TMA_API:
        return False
    dev = tensors[0].device
    if not _INTERPRET:
        if dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 9:
            return False
    return all(_tma_layout(t) is not None for t in tensors)


def _use_tma(*tensors: torch.Tensor) -> bool:
    if FORCE_PATH == "pointer":
        return False
    ok = tma_compatible(*tensors)
    if FORCE_PATH == "tma" and not ok:
        shapes = ", ".join(f"{tuple(t.shape)}/{t.stride()}/{t.dtype}" for t in tensors)
        msg = f"TMA path forced but operands are not TMA-compatible: {shapes}"
        raise ValueError(f"peft_kernels lora (triton): {msg}")
    return ok


class _TmaScratch:
    """Scratch allocator for device-side tensor descriptors (triton.set_allocator)."""

    def __init__(self) -> None:
        self.device: torch.device | str = "cpu"

    def __call__(self, size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=self.device)


_tma_allocator = _TmaScratch()


def _ensure_allocator(device: torch.device) -> None:
    # Device-side descriptors need a scratch allocator. triton keeps it in a ContextVar, which autograd's
    # backward threads do not inherit, so check on every launch.
    _tma_allocator.device = "cpu" if _INTERPRET else device
    try:  # keep an allocator the user set; the module is private, so tolerate its changes
        from triton.runtime._allocation import NullAllocator, _allocator

        current = _allocator.get() if hasattr(_allocator, "get") else _allocator
        if not isinstance(current, NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_tma_allocator)


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _m_bucket(m: int) -> int:
    # Autotune key: one tuning per power-of-two M, not per sequence length.
    return triton.next_power_of_2(max(1, m))


def _dot_prec(dtype: torch.dtype):
    # fp32 activations: exact fp32 products (no tf32), so the interpreter and the GPU agree.
    return "ieee" if dtype == torch.float32 else None


def _check_p(dropout_p: float) -> float:
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"peft_kernels lora (triton): dropout_p must be in [0, 1), got {p}")
    return p


def _gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    lora_l: torch.Tensor | None = None,
    lora_rt: torch.Tensor | None = None,
    p: float = 0.0,
    seed: int = 0,
) -> None:
    """c[M, N] = a[M, K] @ b[K, N] (+ lora_l[M, r] @ lora_rt[r, N], masked by the dropout keep mask of the
    [M, N] output grid when p > 0) (+ bias[N]). a, b, lora_rt may be transposed views; c is row-major."""
    M, K = a.shape
    N = b.shape[1]
    has_lora = lora_l is not None
    R = lora_l.shape[1] if has_lora else 1
    dummy = c
    l_t = lora_l if has_lora else dummy
    r_t = lora_rt if has_lora else dummy
    lora_strides = (l_t.stride(0), l_t.stride(1), r_t.stride(0), r_t.stride(1))
    has_dropout = has_lora and p > 0.0
    inv_keep = 1.0 / (1.0 - p) if has_dropout else 1.0
    common = dict(
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        HAS_DROPOUT=has_dropout,
        R_PAD=_r_pad(R),
        DOT_PREC=_dot_prec(a.dtype),
    )
    bias_t = bias if bias is not None else dummy
    if _use_tma(a, b, c):
        _ensure_allocator(c.device)
        a_t, lda = _tma_layout(a)
        b_kn_t, ldb = _tma_layout(b)  # b is the [K, N] view: "transposed" storage means W-style [N, K]
        c_t, ldc = _tma_layout(c)
        assert not c_t
        num_sms = _sm_count(c.device)
        grid = lambda META: (min(num_sms, triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"])),)
        _gemm_lora_tma_kernel[grid](
            a, b, c, bias_t, l_t, r_t,
            M, N, K, R, _m_bucket(M),
            lda, ldb, ldc,
            *lora_strides,
            p, inv_keep, seed,
            A_T=a_t, B_T=b_kn_t, NUM_SMS=num_sms, FLATTEN=_FLATTEN,
            **common,
        )  # fmt: skip
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
        _gemm_lora_ptr_kernel[grid](
            a, b, c, bias_t, l_t, r_t,
            M, N, K, R, _m_bucket(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            *lora_strides,
            p, inv_keep, seed,
            **common,
        )  # fmt: skip


def _validate(x, weight, lora_A, lora_B, where: str) -> tuple[int, int, int, int]:
    ok, why = supports(x, weight, lora_A)
    if not ok:
        raise ValueError(f"peft_kernels lora {where} (triton): {why}")
    M, K = x.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        msg = f"lora_B must be [{N}, {r}], got {tuple(lora_B.shape)}"
        raise ValueError(f"peft_kernels lora {where} (triton): {msg}")
    if lora_B.dtype not in _ACT_DTYPES or lora_B.device != x.device:
        raise ValueError(f"peft_kernels lora {where} (triton): lora_B must be fp16/bf16/fp32 on {x.device}")
    return M, K, N, r


_Opt = torch.Tensor | None


def _adapters(lora_A, lora_B, scaling: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Tiny casts, once per call: A and s*B in the activation dtype (s folded in fp32, then one rounding).
    a = lora_A.to(dtype)
    bs = (lora_B.to(torch.float32) * float(scaling)).to(dtype)
    return a, bs


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] contiguous 2-D. Returns (y [M, N] in x.dtype, S [M, r] in x.dtype)."""
    M, K, N, r = _validate(x, weight, lora_A, lora_B, "forward")
    if bias is not None and (bias.shape != (N,) or bias.device != x.device):
        raise ValueError(f"peft_kernels lora forward (triton): bias must be [{N}] on {x.device}")
    p = _check_p(dropout_p)
    seed = normalize_seed(seed)
    dt = x.dtype
    y = _alloc((M, N), dt, x.device)
    S = _alloc((M, r), dt, x.device)
    if M == 0:
        return y, S
    a, bs = _adapters(lora_A, lora_B, scaling, dt)
    has_dropout = p > 0.0
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]),)
    _lora_down_kernel[grid](
        x, a, S, M, K, r, _m_bucket(M),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), S.stride(0), S.stride(1),
        p, 1.0 / (1.0 - p), seed,
        HAS_DROPOUT=has_dropout, R_PAD=_r_pad(r), DOT_PREC=_dot_prec(dt),
    )  # fmt: skip
    # y = x @ W^T + bias + S @ (sB)^T; the dropout is already inside S.
    _gemm(x, weight.t(), y, bias=bias, lora_l=S, lora_rt=bs.t())
    return y, S


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    need_dx: bool,
    need_dW: bool,
    need_db: bool,
    need_dA: bool,
    need_dB: bool,
) -> tuple[_Opt, _Opt, _Opt, _Opt, _Opt]:
    """Returns (dx [M, K] in x.dtype, dW [N, K] and db [N] in weight.dtype, dA in lora_A.dtype,
    dB in lora_B.dtype); None where not requested. S is the forward's saved [M, r]."""
    M, K, N, r = _validate(x, weight, lora_A, lora_B, "backward")
    dt = x.dtype
    if dy.shape != (M, N) or dy.dtype != dt or dy.device != x.device:
        raise ValueError(f"peft_kernels lora backward (triton): dy must be [{M}, {N}] {dt} on {x.device}")
    if S.shape != (M, r) or S.dtype != dt or S.device != x.device:
        raise ValueError(f"peft_kernels lora backward (triton): S must be [{M}, {r}] {dt} on {x.device}")
    p = _check_p(dropout_p)
    seed = normalize_seed(seed)
    dev = x.device
    has_dropout = p > 0.0
    inv_keep = 1.0 / (1.0 - p)
    dot_prec = _dot_prec(dt)
    r_pad = _r_pad(r)

    dx = _alloc((M, K), dt, dev) if need_dx else None
    if M == 0:
        dW = torch.zeros((N, K), dtype=weight.dtype, device=dev) if need_dW else None
        db = torch.zeros((N,), dtype=weight.dtype, device=dev) if need_db else None
        dA = torch.zeros((r, K), dtype=lora_A.dtype, device=dev) if need_dA else None
        dB = torch.zeros((N, r), dtype=lora_B.dtype, device=dev) if need_dB else None
        return dx, dW, db, dA, dB

    a, bs = _adapters(lora_A, lora_B, scaling, dt)
    need_g = need_dx or need_dA
    G = None
    dB = db = None
    if need_g or need_dB or need_db:
        partials = torch.are_deterministic_algorithms_enabled()
        n_blocks = triton.cdiv(M, _DY_BLOCK_M)
        lead = (n_blocks,) if partials else ()
        G = _alloc((M, r), dt, dev) if need_g else None
        dlb32 = torch.zeros((*lead, N, r), dtype=torch.float32, device=dev) if need_dB else None
        dbias32 = torch.zeros((*lead, N), dtype=torch.float32, device=dev) if need_db else None
        g_t = G if G is not None else S
        _lora_dy_kernel[(n_blocks,)](
            dy, bs, S, g_t,
            dlb32 if dlb32 is not None else dy, dbias32 if dbias32 is not None else dy,
            M, N, r, _m_bucket(M),
            dy.stride(0), dy.stride(1), bs.stride(0), bs.stride(1), S.stride(0), S.stride(1),
            g_t.stride(0), g_t.stride(1),
            float(scaling),
            COMPUTE_G=need_g, COMPUTE_DLB=need_dB, COMPUTE_DBIAS=need_db, PARTIALS=partials,
            R_PAD=r_pad, DOT_PREC=dot_prec, BLOCK_M=_DY_BLOCK_M,
        )  # fmt: skip
        if need_dB:
            dB = (dlb32.sum(0) if partials else dlb32).to(lora_B.dtype)
        if need_db:
            db = (dbias32.sum(0) if partials else dbias32).to(weight.dtype)

    if need_dx:
        # dx = dy @ W + keep/(1-p) * (G @ A): W [N, K] is already the [K_red=N, K] operand.
        _gemm(dy, weight, dx, lora_l=G, lora_rt=a, p=p, seed=seed)

    dW = None
    if need_dW:
        dW = _alloc((N, K), weight.dtype, dev)
        _gemm(dy.t(), x, dW)

    dA = None
    if need_dA:
        k_blocks = triton.cdiv(K, _DA_BLOCK_K)
        # Enough (k block, M split) programs to fill the GPU twice over; never more splits than row blocks.
        target = 2 * _sm_count(dev)
        split_m = max(1, min(math.ceil(target / k_blocks), triton.cdiv(M, 32)))
        part = torch.empty((split_m, r, K), dtype=torch.float32, device=dev)
        _lora_da_kernel[(k_blocks, split_m)](
            G, x, part, M, K, r, _m_bucket(M), split_m,
            G.stride(0), G.stride(1), x.stride(0), x.stride(1),
            p, inv_keep, seed,
            HAS_DROPOUT=has_dropout, R_PAD=r_pad, DOT_PREC=dot_prec, BLOCK_K=_DA_BLOCK_K,
        )  # fmt: skip
        dA = (part.sum(0) if split_m > 1 else part[0]).to(lora_A.dtype)

    return dx, dW, db, dA, dB
