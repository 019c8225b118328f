"""Triton kernels and launchers for the fused LoRA linear (no autograd here; ops/lora.py wraps them).

Math (x [M, K], W [N, K], A [r, K], B [N, r], scaling s, dropout p, mask from ``ops.dropout_mask``):

    S  = drop(x) @ A^T                       [M, r]  activation dtype: the only extra saved activation
    y  = x @ W^T + bias + S @ (s B)^T        one GEMM, the LoRA term a second phase into the same accumulator
    G  = dy @ (s B)                          [M, r]
    dB = s dy^T @ S,  db = sum_m dy          fused into the pass over dy that computes G
    dx = dy @ W + keep/(1-p) * (G @ A)       one GEMM, same two-phase epilogue (masked when p > 0) ...
    dA = G^T @ drop(x)                       ... whose epilogue also reads the x tile of its output tile and
                                             adds G_tile^T @ drop(x_tile) into dA (the keep mask computed
                                             once for both): no separate pass over x in the backward
    dW = dy^T @ x                            only when W is trainable

Passes over the big activations beyond the frozen base (x: M*K, dy: M*N): one read of x (S), one read of
dy (G/dB/db), and one read of x inside the compute-bound dx GEMM (overlapped with its tensor-core work).
Launches per forward + backward (fp32 adapters, frozen W and bias): 5 -- S, y, one zeroed fp32 workspace for
the dB/db/dA atomics, the dy pass, dx(+dA). The adapters are read in their own dtype and rounded to the
activation dtype in registers (s folded in fp32 first), so no cast kernels run; every dot accumulates in fp32.
Why S is not accumulated inside the forward GEMM's K loop (and G inside dx's): every column tile would
recompute it, r/BLOCK_N more tensor-core work (6-12 %) against the 1-3 % of a separate memory-bound pass;
benchmarks/NOTES.md has the numbers.

The dropout mask (definition in ops/dropout_mask.py) is regenerated, never stored: one Philox-4x32-10 call
yields the keep decisions of eight neighbouring columns (16 bits each against a 16-bit threshold, :func:`_keep_tile`).

Two paths for the big GEMMs: TMA tensor descriptors + a persistent, L2-grouped tile loop (the fast path on
Hopper), and a pointer-based ``tl.load``/``tl.dot`` fallback for strides/base pointers TMA cannot take
(it needs 16-byte aligned leading strides and bases and a unit inner stride).
``peft_kernels._config.force_gemm_path`` picks one. The persistent loop is flattened (pipelined across
tiles) at r <= 32; the LoRA term runs before the K loop, because after it (an epilogue) Triton 3.6 + ptxas
12.8 serialized every wgmma of the flattened loop (C7515; see ``compile_variants``, benchmarks/results/compile/).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _config
from ..ops.dropout_mask import keep_threshold, normalize_seed
from ._common import alloc as _alloc
from ._common import ensure_allocator as _ensure_allocator
from ._common import sm_count as _sm_count
from ._common import tile_coords as _tile_coords
from ._common import tma_compatible
from ._common import tma_layout as _tma_layout
from ._common import use_tma as _use_tma

__all__ = ["lora_forward", "lora_backward", "why_not", "tma_compatible", "compile_variants", "launch_hook"]

_INTERPRET = _config.SETTINGS.triton_interpret
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_RANK = 128
# Flattening the persistent loop lets the compiler pipeline across tiles. With the LoRA term in an epilogue
# after the K loop, Triton 3.6 (ptxas 12.8) serialized every wgmma of the flattened loop (C7515); with it in
# the prologue (_lora_init) both 3.6 and 3.8 pipeline it -- the compile check holds this on both versions.
_FLATTEN = _config.SETTINGS.triton_flatten
# Hopper's opt-in shared memory per block: a config whose estimate exceeds it can never launch.
SMEM_LIMIT = 232448  # 227 KB

# ----------------------------------------------------------------------------------------------------------
# Configs: autotuned on a GPU (pruned by problem size and a shared-memory estimate before anything compiles);
# under the interpreter, block sizes from _config.interpret_blocks and no autotuning.
# ----------------------------------------------------------------------------------------------------------

# BM, BN, BK, warps, stages. 4-warp 128x128 spills its accumulator with the LoRA epilogue; dropped.
_GEMM_SHAPES = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 3),
]
# The config of last resort: fits 227 KB for every dtype and rank (fp32 at r = 128 with dropout and dA).
_GEMM_SMALLEST = (64, 64, 32, 4, 2)
# PEFT_KERNELS_TRITON_AUTOTUNE=0: the fast config plus the smallest.
_GEMM_FIXED = [(128, 128, 64, 8, 3), _GEMM_SMALLEST]
_INTERPRET_GEMM = (32, 32, 32)


def _gemm_config(bm, bn, bk, w, s) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)


def _gemm_configs() -> list[triton.Config]:
    return [_gemm_config(*c) for c in (_GEMM_SHAPES if _config.SETTINGS.triton_autotune else _GEMM_FIXED)]


def gemm_smem_estimate(bm, bn, bk, stages, elem, out_elem, r_pad, tma, fuse_da=False, dropout=False) -> int:
    """Shared memory (bytes) a GEMM config needs: the pipelined A/B ring, the LoRA prologue's dot operands
    (L, R tiles; the x tile of the fused dA dot), the TMA store's staging tile, and, with dropout, the layout
    conversion of the keep-mask tile. Calibrated on the sm_90a compile of every variant (Triton 3.6 and 3.8);
    the compile check fails a variant whose compiled figure exceeds this estimate."""
    ring = stages * (bm * bk + bk * bn) * elem
    lora = r_pad * (bm + bn) * elem + (bm * bn * elem if fuse_da else 0)
    store = bm * bn * out_elem if tma else 0
    mask = bm * bn if dropout else 0
    return ring + lora + store + mask + 2048  # + barriers, alignment


def _flatten(r_pad: int) -> bool:
    # Flattened, the pipeliner multi-buffers the prologue's L/R loads too: fine at r <= 32, 130-230 KB more
    # shared memory at r = 128 (every 128-row config over 227 KB), so larger ranks keep the plain loop.
    return _FLATTEN and r_pad <= 32


def _config_fits(c: triton.Config, elem: int, out_elem: int, r_pad: int, tma: bool, fuse_da: bool,
                 dropout: bool) -> bool:  # fmt: skip
    kw = c.kwargs
    est = gemm_smem_estimate(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, elem, out_elem, r_pad,
                             tma, fuse_da, dropout)  # fmt: skip
    return est <= SMEM_LIMIT


def _prune_gemm(configs, named_args, **kwargs):
    m, n = named_args["M"], named_args["N"]
    elem = named_args["a_ptr"].element_size()
    out_elem = named_args["c_ptr"].element_size()
    tma = "stride_a" in named_args
    r_pad, fuse, drop = kwargs.get("R_PAD", 16), kwargs.get("FUSE_DA", False), kwargs.get("HAS_DROPOUT", False)
    fit = [c for c in configs if _config_fits(c, elem, out_elem, r_pad, tma, fuse, drop)]
    # Tiles far larger than the problem only waste benchmarking time (decode-sized M, tiny N).
    keep = [
        c
        for c in fit
        if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
        and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
    ]
    return keep or fit[-1:] or [_gemm_config(*_GEMM_SMALLEST)]


def _skinny_configs(block_names: dict[str, list[int]], warps=(4, 8), stages=(2, 3, 4)) -> list[triton.Config]:
    if not _config.SETTINGS.triton_autotune:
        return [triton.Config({k: v[0] for k, v in block_names.items()}, num_warps=4, num_stages=3)]
    keys = list(block_names)
    return [
        triton.Config(dict(zip(keys, vals)), num_warps=w, num_stages=s)
        for vals in zip(*block_names.values())
        for w in warps
        for s in stages
    ]


# Rows per program of the dy pass: fixed, the launcher sizes the deterministic partial buffers with it.
# 32 rows: 256 programs at M = 8192 (two waves' worth on 132 SMs), still a 32-row dot for G.
_DY_BLOCK_M = 32
_DA_BLOCK_K = 128
# Split granules: the largest reduction block of the S (BLOCK_K) and dy (BLOCK_N) autotune configs; the S
# pass counts its programs at its largest BLOCK_M (the autotuner may pick 32 rows: twice the programs).
_DOWN_GRANULE, _DOWN_MAX_BM, _DY_GRANULE = 256, 64, 128
_SUM_BLOCK = 1024


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


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
def _keep_tile(seed, keep_t, rows, col0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Keep mask of the [BLOCK_R, BLOCK_C] tile at (rows, col0 + [0, BLOCK_C)) of an activation, col0 % 8 == 0:
    column j of row i takes half j % 2 (low, high) of word (j % 8) // 2 of Philox-4x32-10(key = seed,
    counter = (j // 8, i, 0, 0)), kept iff those 16 bits >= keep_t (ops/dropout_mask.py). One Philox call
    per eight elements; a shift or an AND and one compare per element for the decision."""
    q = (col0 // 8 + tl.arange(0, BLOCK_C // 8)).to(tl.uint32)
    r = rows.to(tl.uint32)
    c0 = q[None, :] + tl.zeros((BLOCK_R, BLOCK_C // 8), dtype=tl.uint32)
    c1 = r[:, None] + tl.zeros((BLOCK_R, BLOCK_C // 8), dtype=tl.uint32)
    z = tl.zeros((BLOCK_R, BLOCK_C // 8), dtype=tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, z, z)
    # The words are joined first (32-bit values: register moves; joining 8-bit decisions made LLVM pack and
    # unpack bit fields), then split into halves, one compare per element: [i, q, a, b] -> word column
    # 4q + 2a + b (word w = 2a + b), then [.., h] -> column 8q + 2w + h.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_R, BLOCK_C // 2))
    u = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (BLOCK_R, BLOCK_C))
    return u >= keep_t.to(tl.uint32)


@triton.jit
def _lora_init(
    rm, rn, off_n, pid_m, M, N, R,
    l_ptr, r_ptr, bias_ptr, x_ptr, da_ptr,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_bias, stride_xm, stride_xk, stride_dap,
    r_scale, keep_t, inv_keep, seed,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FUSE_DA: tl.constexpr, DA_PARTIALS: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The GEMM tile's initial accumulator: bias[rn] + L[rm, :R] @ (r_scale * Rt)[:R, rn], the LoRA term
    masked by the keep mask and scaled by 1/(1-p) when HAS_DROPOUT.

    Computed before the main K loop rather than after it: the low-rank dot and the mask then never live next
    to the full accumulator (a second [BM, BN] fp32 accumulator spilled and serialized the wgmma of the dx
    GEMM with dropout), and the main loop is followed by nothing but the store.
    Rt is read in its own dtype (the fp32 adapter masters) and rounded to L's dtype after scaling in fp32.
    FUSE_DA (dx GEMM): also dA[:, rn] += L^T @ drop(x[rm, rn]) -- the same keep mask -- as fp32 atomics, or
    per-row-block partials (DA_PARTIALS, deterministic). r is padded to R_PAD (>= 16) by masked loads."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        m_ok = rm < M
        n_ok = rn < N
        if HAS_DROPOUT:
            keep = _keep_tile(seed, keep_t, rm, off_n, BLOCK_M, BLOCK_N)
        if FUSE_DA:
            xt = _load_2d(x_ptr, rm64, rn64, stride_xm, stride_xk, m_ok, n_ok)
            if HAS_DROPOUT:
                xt = tl.where(keep, xt, 0.0)
        # r in chunks of R_CHUNK (<= 32): at r = 128 the L/R tiles and the dA partial stay small.
        for r0 in tl.static_range(0, R_PAD, R_CHUNK):
            rr = r0 + tl.arange(0, R_CHUNK)
            r_ok = rr < R
            lt = _load_2d(l_ptr, rm64, rr, stride_lm, stride_lr, m_ok, r_ok)
            if FUSE_DA:
                # dA before the LoRA dot: the x tile is dead before the accumulator grows (register pressure).
                part = tl.dot(tl.trans(lt), xt, input_precision=DOT_PREC)
                if HAS_DROPOUT:
                    part = part * inv_keep
                da_ptrs = da_ptr + rr[:, None] * N + rn64[None, :]
                da_mask = r_ok[:, None] & n_ok[None, :]
                if DA_PARTIALS:
                    tl.store(da_ptrs + pid_m.to(tl.int64) * stride_dap, part, mask=da_mask)
                else:
                    tl.atomic_add(da_ptrs, part, mask=da_mask, sem="relaxed")
            rt = _load_2d(r_ptr, rr, rn64, stride_rr, stride_rn, r_ok, n_ok)
            rt = (rt.to(tl.float32) * r_scale).to(lt.dtype)
            acc = tl.dot(lt, rt, acc, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            # A select, not a 0/1 factor: the fp32 factor tile needs a 64 KB layout conversion in shared memory
            # (over 227 KB at 4 stages) for 6 % fewer instructions (sm_90a SASS, benchmarks/NOTES.md).
            acc = tl.where(keep, acc * inv_keep, 0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn.to(tl.int64) * stride_bias, mask=rn < N, other=0.0).to(tl.float32)
        acc += bias[None, :]
    return acc


# ----------------------------------------------------------------------------------------------------------
# Main GEMM: C[M, N] = A[M, K] @ B[K, N] (+ LoRA phase 2, + bias). fwd: A=x, B=W^T, L=S, Rt=(sB)^T.
# dx: A=dy, B=W, L=G, Rt=A_lora (masked), fused dA. dW: A=dy^T, B=x.
# ----------------------------------------------------------------------------------------------------------

_GEMM_KEY = ["M_BUCKET", "N", "K", "R_PAD", "HAS_LORA", "HAS_DROPOUT", "FUSE_DA"]


@triton.autotune(
    configs=_gemm_configs(),
    key=_GEMM_KEY + ["A_T", "B_T"],
    prune_configs_by={"early_config_prune": _prune_gemm},
    restore_value=["da_ptr"],  # the fused dA atomics must not keep what benchmarking runs added
)
@triton.jit(do_not_specialize=["keep_t", "seed"])
def _gemm_lora_tma_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, r_ptr, x_ptr, da_ptr,
    M, N, K, R, M_BUCKET,
    stride_a, stride_b, stride_c,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_bias, stride_xm, stride_xk, stride_dap,
    r_scale, keep_t, inv_keep, seed,
    A_T: tl.constexpr, B_T: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FUSE_DA: tl.constexpr, DA_PARTIALS: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, NUM_SMS: tl.constexpr,
    FLATTEN: tl.constexpr,
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
    # The store recomputes its tile id separately so the flattened loop's prologue (loads of the next
    # tile) does not depend on it.
    tile_id_c = start_pid - NUM_SMS
    for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = _lora_init(
            off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N), off_n, pid_m, M, N, R,
            l_ptr, r_ptr, bias_ptr, x_ptr, da_ptr,
            stride_lm, stride_lr, stride_rr, stride_rn, stride_bias, stride_xm, stride_xk, stride_dap,
            r_scale, keep_t, inv_keep, seed,
            HAS_BIAS, HAS_LORA, HAS_DROPOUT, FUSE_DA, DA_PARTIALS, R_PAD, R_CHUNK, DOT_PREC, BLOCK_M, BLOCK_N,
        )  # fmt: skip
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
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))


@triton.autotune(
    configs=_gemm_configs(),
    key=_GEMM_KEY,
    prune_configs_by={"early_config_prune": _prune_gemm},
    restore_value=["da_ptr"],
)
@triton.jit(do_not_specialize=["keep_t", "seed"])
def _gemm_lora_ptr_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, r_ptr, x_ptr, da_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_bias, stride_xm, stride_xk, stride_dap,
    r_scale, keep_t, inv_keep, seed,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FUSE_DA: tl.constexpr, DA_PARTIALS: tl.constexpr,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    acc = _lora_init(
        rm, rn, pid_n * BLOCK_N, pid_m, M, N, R, l_ptr, r_ptr, bias_ptr, x_ptr, da_ptr,
        stride_lm, stride_lr, stride_rr, stride_rn, stride_bias, stride_xm, stride_xk, stride_dap,
        r_scale, keep_t, inv_keep, seed,
        HAS_BIAS, HAS_LORA, HAS_DROPOUT, FUSE_DA, DA_PARTIALS, R_PAD, R_CHUNK, DOT_PREC, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        rk64 = rk.to(tl.int64)
        a = tl.load(a_rows + rk64[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + rk64[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    _store_2d(c_ptr, rm.to(tl.int64), rn.to(tl.int64), stride_cm, stride_cn, m_ok, n_ok, acc)


# ----------------------------------------------------------------------------------------------------------
# Skinny kernels (memory-bound streams over x or dy; pointer-based, the r-sized operands are L2-resident)
# ----------------------------------------------------------------------------------------------------------


def down_smem_estimate(bm, bk, stages, elem, a_elem, r_pad) -> int:
    """Shared memory of an S-pass config: x and A tiles per stage (calibrated like gemm_smem_estimate)."""
    return stages * (bm * bk * elem + bk * r_pad * a_elem)


def _prune_down(configs, named_args, **kwargs):
    elem, a_elem = named_args["x_ptr"].element_size(), named_args["a_ptr"].element_size()
    r_pad = kwargs.get("R_PAD", 16)
    fit = [c for c in configs
           if down_smem_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_stages, elem, a_elem, r_pad)
           <= SMEM_LIMIT]  # fmt: skip
    return fit or [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)]


@triton.autotune(
    configs=_skinny_configs({"BLOCK_M": [32, 64, 32, 64], "BLOCK_K": [128, 128, 256, 64]}),
    key=["M_BUCKET", "K", "K_SPLIT", "R_PAD", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_down},
)
@triton.jit(do_not_specialize=["keep_t", "seed"])
def _lora_down_kernel(
    x_ptr, a_ptr, s_ptr, M, K, R, M_BUCKET, K_SPLIT,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sp, stride_sm, stride_sr,
    keep_t, inv_keep, seed,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """S = (keep * x) @ A^T / (1 - p): one pass over x, the mask generated once per element; A read in its
    own dtype and rounded to x's in registers. Program (row block, split s) reduces columns
    [s * K_SPLIT, (s + 1) * K_SPLIT) into slice s of s_ptr (stride_sp; K_SPLIT a multiple of BLOCK_K): with
    one split s_ptr is S itself, with several an fp32 partial buffer that _sum_splits_kernel reduces."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_s = tl.program_id(1)
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    r_ok = rr < R
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        rk64 = rk.to(tl.int64)
        x = tl.load(x_rows + rk64[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_tile(seed, keep_t, rm, k0, BLOCK_M, BLOCK_K), x, 0.0)
        at = _load_2d(a_ptr, rk64, rr, stride_ak, stride_ar, k_ok, r_ok).to(x.dtype)
        acc = tl.dot(x, at, acc, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    _store_2d(s_ptr + pid_s.to(tl.int64) * stride_sp, rm.to(tl.int64), rr, stride_sm, stride_sr, m_ok, r_ok, acc)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, n, SPLITS, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i] over the flat [SPLITS, n] fp32 partials, in split order (deterministic), cast
    to out's dtype: the second stage of a split S or G pass (contiguous [M, r] both)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for sp in range(0, SPLITS):
        acc += tl.load(part_ptr + sp * n + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.autotune(
    configs=_skinny_configs({"BLOCK_N": [64, 128]}),
    key=["M_BUCKET", "N", "N_SPLIT", "R_PAD", "COMPUTE_G", "COMPUTE_DLB", "COMPUTE_DBIAS"],
    # Atomic targets must not keep what benchmarking runs added.
    restore_value=["dlb_ptr", "dbias_ptr"],
)
@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, s_ptr, g_ptr, dlb_ptr, dbias_ptr,
    M, N, R, M_BUCKET, N_SPLIT,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_gp, stride_gm, stride_gr,
    scaling,
    COMPUTE_G: tl.constexpr, COMPUTE_DLB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, PARTIALS: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One pass over dy per BLOCK_M rows: G = dy @ (sB) (kept in registers across the N loop), and the
    M-reductions dB += s dy^T @ S and dbias += colsum(dy) of the same dy tile.

    Reduction choice: the program owns a row block, so dB/dbias partials are fp32 atomics (relaxed) per
    (row block, column block) -- cM/BLOCK_M * N * r adds, cheap next to re-reading dy for a separate
    reduction kernel. PARTIALS (set under torch.use_deterministic_algorithms) writes per-row-block partials
    [num_row_blocks, N, r] instead, summed by the launcher in a fixed order.
    Program (row block, split s) covers columns [s * N_SPLIT, (s + 1) * N_SPLIT) (N_SPLIT a multiple of
    BLOCK_N): its G is slice s of g_ptr (stride_gp) -- G itself with one split, else fp32 partials that
    _sum_splits_kernel reduces; the dB/dbias partials of different splits are different columns."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_lo = pid_s * N_SPLIT
    n_hi = tl.minimum(N, n_lo + N_SPLIT)
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
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_hi
        rn64 = rn.to(tl.int64)
        dy = _load_2d(dy_ptr, rm64, rn64, stride_dym, stride_dyn, m_ok, n_ok)
        if COMPUTE_G:
            # s folded into B in fp32, then one rounding to the activation dtype.
            bt = _load_2d(b_ptr, rn64, rr, stride_bn, stride_br, n_ok, r_ok)
            bt = (bt.to(tl.float32) * scaling).to(dy.dtype)
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
        _store_2d(g_ptr + pid_s.to(tl.int64) * stride_gp, rm64, rr, stride_gm, stride_gr, m_ok, r_ok, g)


@triton.autotune(
    configs=_skinny_configs({"BLOCK_M": [32, 64, 128]}),
    key=["M_BUCKET", "K", "R_PAD", "HAS_DROPOUT", "SPLIT_M"],
)
@triton.jit(do_not_specialize=["keep_t", "seed"])
def _lora_da_kernel(
    g_ptr, x_ptr, part_ptr, M, K, R, M_BUCKET, SPLIT_M,
    stride_gm, stride_gr, stride_xm, stride_xk,
    keep_t, inv_keep, seed,
    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dA when dx is not needed (otherwise the dx GEMM's epilogue computes it): program (k block, split s)
    reduces G^T @ (keep * x) over row blocks s, s+SPLIT_M, ... into part[s] ([R, K] slices, summed by the
    launcher: two-stage, deterministic). One pass over x, the mask regenerated once per element."""
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
            x = tl.where(_keep_tile(seed, keep_t, rm, pid_k * BLOCK_K, BLOCK_M, BLOCK_K), x, 0.0)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    part_ptrs = part_ptr + pid_s.to(tl.int64) * R * K + rr[:, None] * K + rk64[None, :]
    tl.store(part_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------

# Interpreter block sizes per kernel (tests shrink them with _config.override_interpret_blocks).
_INTERPRET_DEFAULTS = {
    "lora_gemm": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
    "lora_down": {"BLOCK_M": 32, "BLOCK_K": 32},
    "lora_dy": {"BLOCK_N": 32},
    "lora_da": {"BLOCK_M": 32},
}


def launch_hook(name: str, kernel, grid, *args, **kwargs) -> None:
    """Every Triton launch of this module goes through here (tests patch it to count launches). Under the
    interpreter the autotuner is bypassed and the block sizes come from ``_config.interpret_blocks``."""
    if _INTERPRET and isinstance(kernel, triton.runtime.Autotuner):
        blocks = dict(_INTERPRET_DEFAULTS[name])
        blocks.update(_config.interpret_blocks(name, {}))
        kernel.fn[grid](*args, **kwargs, **blocks)
    else:
        kernel[grid](*args, **kwargs)


def _interpret_block(name: str, key: str) -> int:
    blocks = dict(_INTERPRET_DEFAULTS[name])
    blocks.update(_config.interpret_blocks(name, {}))
    return blocks[key]


def _splits(programs: int, length: int, granule: int, num_sms: int) -> tuple[int, int]:
    """(splits, columns per split) of the reduction axis of a row-block pass (S over K, the dy pass over N).

    Rule on the grid: the programs of a memory-bound pass share the SMs (several resident per SM), so the
    pass takes as long as its busiest SM; ``balance(k)`` = average / busiest load with k splits. The
    smallest k with balance >= 0.9 wins (else the best k): M = 8192 keeps one split (128-256 programs on 132
    SMs: balance 0.97, no partial buffer, no extra launch); M = 512 (8-16 programs) splits K = 4096 into 8.
    Splits are whole granules (the largest block of the autotune configs, so no block straddles two splits),
    at least two each (a program's partial write stays small next to what it reads), and at most ~4 programs
    per SM."""
    def balance(k: int) -> float:
        n = programs * k
        return n / (num_sms * triton.cdiv(n, num_sms))

    k_max = max(1, min(length // (2 * granule), triton.cdiv(4 * num_sms, programs)))
    ks = range(1, k_max + 1)
    k = next((k for k in ks if balance(k) >= 0.9), max(ks, key=balance))
    if k == 1:
        return 1, length
    per = triton.cdiv(triton.cdiv(length, k), granule) * granule
    splits = triton.cdiv(length, per)
    return (1, length) if splits == 1 else (splits, per)


def _sum_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    # Second stage of a split pass: part [splits, M, r] fp32 -> out [M, r] (contiguous), one launch.
    n = out.numel()
    _launch("lora_sum", _sum_splits_kernel, (triton.cdiv(n, _SUM_BLOCK),), part, out, n, part.shape[0],
            BLOCK=_SUM_BLOCK)  # fmt: skip


def _launch(name, kernel, grid, *args, **kwargs) -> None:
    # Indirection through the module attribute so a patched launch_hook sees every launch.
    globals()["launch_hook"](name, kernel, grid, *args, **kwargs)


def why_not(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor | None = None):
    """None when these launchers can serve the inputs, else the reason (memory safety and kernel limits only;
    the public op validated shapes)."""
    named = (("x", x), ("weight", weight), ("lora_A", lora_A)) + ((("lora_B", lora_B),) if lora_B is not None else ())
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a tensor"
        if t.dim() != 2:
            return f"{name} must be 2-D, got shape {tuple(t.shape)}"
        if t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}: all operands must share a device"
    if not _INTERPRET and x.device.type != "cuda":
        return f"device {x.device} needs CUDA (or TRITON_INTERPRET=1 for CPU tensors)"
    if x.dtype not in _ACT_DTYPES:
        return f"x dtype {x.dtype} not in fp16/bf16/fp32"
    if weight.dtype != x.dtype:
        return f"weight dtype {weight.dtype} must equal x dtype {x.dtype}"
    for name, t in named[2:]:
        if t.dtype not in _ACT_DTYPES:
            return f"{name} dtype {t.dtype} not in fp16/bf16/fp32"
    if _INTERPRET and x.dtype == torch.bfloat16:
        return "bf16 tl.dot gives wrong results under TRITON_INTERPRET=1"
    M, K = x.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    if weight.shape[1] != K or lora_A.shape[1] != K:
        shapes = f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}"
        return f"in_features mismatch: {shapes}"
    if lora_B is not None and tuple(lora_B.shape) != (N, r):
        return f"lora_B must be [{N}, {r}], got {tuple(lora_B.shape)}"
    if K < 1 or N < 1:
        return f"in_features and out_features must be >= 1, got K={K}, N={N}"
    if not 1 <= r <= _MAX_RANK:
        return f"rank r={r} outside [1, {_MAX_RANK}]"
    return None


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
    r_scale: float = 1.0,
    p: float = 0.0,
    seed: int = 0,
    x_da: torch.Tensor | None = None,
    da: torch.Tensor | None = None,
) -> None:
    """c[M, N] = a[M, K] @ b[K, N] (+ lora_l[M, r] @ (r_scale * lora_rt)[r, N], masked by the dropout keep
    mask of the [M, N] output grid when p > 0) (+ bias[N]); with x_da/da also da[r, N] (fp32; [P, r, N]
    partials when 3-D) += lora_l^T @ drop(x_da[M, N]). a, b, lora_rt may be transposed views; c is row-major."""
    M, K = a.shape
    N = b.shape[1]
    has_lora = lora_l is not None
    R = lora_l.shape[1] if has_lora else 1
    dummy = c
    l_t = lora_l if has_lora else dummy
    r_t = lora_rt if has_lora else dummy
    fuse_da = da is not None
    x_t = x_da if fuse_da else dummy
    da_t = da if fuse_da else dummy
    has_dropout = has_lora and p > 0.0
    inv_keep = 1.0 / (1.0 - p) if has_dropout else 1.0
    bias_t = bias if bias is not None else dummy
    tail = (
        l_t.stride(0), l_t.stride(1), r_t.stride(0), r_t.stride(1), bias_t.stride(0),
        x_t.stride(0), x_t.stride(1), da_t.stride(0) if fuse_da and da.dim() == 3 else 0,
        float(r_scale), keep_threshold(p), inv_keep, seed,
    )  # fmt: skip
    common = dict(
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        HAS_DROPOUT=has_dropout,
        FUSE_DA=fuse_da,
        DA_PARTIALS=fuse_da and da.dim() == 3,
        R_PAD=_r_pad(R),
        R_CHUNK=min(_r_pad(R), 32),
        DOT_PREC=_dot_prec(a.dtype),
    )
    ptrs = (a, b, c, bias_t, l_t, r_t, x_t, da_t)
    if _use_tma("lora", a, b, c):
        _ensure_allocator(c.device)
        a_t, lda = _tma_layout(a)
        b_kn_t, ldb = _tma_layout(b)  # b is the [K, N] view: "transposed" storage means W-style [N, K]
        c_t, ldc = _tma_layout(c)
        assert not c_t
        num_sms = _sm_count(c.device)
        grid = lambda META: (min(num_sms, triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"])),)
        _launch(
            "lora_gemm", _gemm_lora_tma_kernel, grid, *ptrs, M, N, K, R, _m_bucket(M), lda, ldb, ldc, *tail,
            A_T=a_t, B_T=b_kn_t, NUM_SMS=num_sms, FLATTEN=_flatten(_r_pad(R)), **common,
        )  # fmt: skip
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
        _launch(
            "lora_gemm", _gemm_lora_ptr_kernel, grid, *ptrs, M, N, K, R, _m_bucket(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), *tail, **common,
        )  # fmt: skip


def _validate(x, weight, lora_A, lora_B, where: str) -> tuple[int, int, int, int]:
    why = why_not(x, weight, lora_A, lora_B)
    if why is not None:
        raise ValueError(f"peft_kernels lora {where} (triton): {why}")
    M, K = x.shape
    return M, K, weight.shape[0], lora_A.shape[0]


_Opt = torch.Tensor | None


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
    """x [M, K] 2-D (any strides). Returns (y [M, N] in x.dtype, S [M, r] in x.dtype). Two launches."""
    M, K, N, r = _validate(x, weight, lora_A, lora_B, "forward")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N or bias.device != x.device):
        raise ValueError(f"peft_kernels lora forward (triton): bias must be [{N}] on {x.device}")
    p = _check_p(dropout_p)
    seed = normalize_seed(seed)
    dt = x.dtype
    y = _alloc((M, N), dt, x.device)
    S = _alloc((M, r), dt, x.device)
    if M == 0:
        return y, S
    if _INTERPRET:
        granule, max_bm = _interpret_block("lora_down", "BLOCK_K"), _interpret_block("lora_down", "BLOCK_M")
    else:
        granule, max_bm = _DOWN_GRANULE, _DOWN_MAX_BM
    splits, k_split = _splits(triton.cdiv(M, max_bm), K, granule, _sm_count(x.device))
    # Several splits: fp32 partials [splits, M, r], reduced into S by one more launch.
    s_out = S if splits == 1 else torch.empty((splits, M, r), dtype=torch.float32, device=x.device)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), splits)
    _launch(
        "lora_down", _lora_down_kernel, grid,
        x, lora_A, s_out, M, K, r, _m_bucket(M), k_split,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), M * r if splits > 1 else 0,
        s_out.stride(-2), s_out.stride(-1),
        keep_threshold(p), 1.0 / (1.0 - p), seed,
        HAS_DROPOUT=p > 0.0, R_PAD=_r_pad(r), DOT_PREC=_dot_prec(dt),
    )  # fmt: skip
    if splits > 1:
        _sum_splits(s_out, S)
    # y = x @ W^T + bias + S @ (sB)^T; the dropout is already inside S.
    _gemm(x, weight.t(), y, bias=bias, lora_l=S, lora_rt=lora_B.t(), r_scale=scaling)
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
    db_dtype: torch.dtype | None = None,
) -> tuple[_Opt, _Opt, _Opt, _Opt, _Opt]:
    """Returns (dx [M, K] in x.dtype, dW [N, K] in weight.dtype, db [N] in db_dtype (default weight.dtype; it is
    summed in fp32, so an fp32 master bias gets an unrounded gradient), dA in lora_A.dtype,
    dB in lora_B.dtype); None where not requested. S is the forward's saved [M, r].

    With fp32 adapters dA and dB are views into one fp32 workspace (no cast kernels)."""
    M, K, N, r = _validate(x, weight, lora_A, lora_B, "backward")
    dt = x.dtype
    if dy.shape != (M, N) or dy.dtype != dt or dy.device != x.device:
        raise ValueError(f"peft_kernels lora backward (triton): dy must be [{M}, {N}] {dt} on {x.device}")
    if S.shape != (M, r) or S.dtype != dt or S.device != x.device:
        raise ValueError(f"peft_kernels lora backward (triton): S must be [{M}, {r}] {dt} on {x.device}")
    p = _check_p(dropout_p)
    seed = normalize_seed(seed)
    dev = x.device
    dot_prec = _dot_prec(dt)
    r_pad = _r_pad(r)

    dx = _alloc((M, K), dt, dev) if need_dx else None
    if M == 0:
        dW = torch.zeros((N, K), dtype=weight.dtype, device=dev) if need_dW else None
        db = torch.zeros((N,), dtype=db_dtype or weight.dtype, device=dev) if need_db else None
        dA = torch.zeros((r, K), dtype=lora_A.dtype, device=dev) if need_dA else None
        dB = torch.zeros((N, r), dtype=lora_B.dtype, device=dev) if need_dB else None
        return dx, dW, db, dA, dB

    partials = torch.are_deterministic_algorithms_enabled()
    fuse_da = need_dA and need_dx
    # One fp32 workspace for every atomic target -- [dB: N*r | db: N | dA: r*K] -- one zeroing launch.
    # Deterministic mode: per-row-block partials (fully written, no zeroing), summed in a fixed order.
    sizes = (N * r if need_dB else 0, N if need_db else 0, r * K if fuse_da else 0)
    dlb32 = dbias32 = da32 = None
    if not partials and any(sizes):
        ws = torch.zeros(sum(sizes), dtype=torch.float32, device=dev)
        dlb32, dbias32, da32 = (ws[o : o + n] if n else None for o, n in zip((0, sizes[0], sizes[0] + sizes[1]), sizes))
        dlb32 = dlb32.view(N, r) if dlb32 is not None else None
        da32 = da32.view(r, K) if da32 is not None else None

    need_g = need_dx or need_dA
    G = _alloc((M, r), dt, dev) if need_g else None
    if need_g or need_dB or need_db:
        n_blocks = triton.cdiv(M, _DY_BLOCK_M)
        if partials:
            dlb32 = torch.empty((n_blocks, N, r), dtype=torch.float32, device=dev) if need_dB else None
            dbias32 = torch.empty((n_blocks, N), dtype=torch.float32, device=dev) if need_db else None
        granule = _interpret_block("lora_dy", "BLOCK_N") if _INTERPRET else _DY_GRANULE
        splits, n_split = _splits(n_blocks, N, granule, _sm_count(dev))
        g_t = G if G is not None else S
        if need_g and splits > 1:
            g_t = torch.empty((splits, M, r), dtype=torch.float32, device=dev)  # fp32 partials of G
        _launch(
            "lora_dy", _lora_dy_kernel, (n_blocks, splits),
            dy, lora_B, S, g_t, dlb32 if dlb32 is not None else dy, dbias32 if dbias32 is not None else dy,
            M, N, r, _m_bucket(M), n_split,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), S.stride(0), S.stride(1),
            M * r if g_t.dim() == 3 else 0, g_t.stride(-2), g_t.stride(-1),
            float(scaling),
            COMPUTE_G=need_g, COMPUTE_DLB=need_dB, COMPUTE_DBIAS=need_db, PARTIALS=partials,
            R_PAD=r_pad, DOT_PREC=dot_prec, BLOCK_M=_DY_BLOCK_M,
        )  # fmt: skip
        if g_t.dim() == 3:
            _sum_splits(g_t, G)
        if partials:
            dlb32 = dlb32.sum(0) if need_dB else None
            dbias32 = dbias32.sum(0) if need_db else None

    if need_dx:
        # dx = dy @ W + keep/(1-p) * (G @ A): W [N, K] is already the [K_red=N, K] operand; the epilogue also
        # accumulates dA from the x tile of each output tile.
        da_out = None
        if fuse_da:
            # Partials: one [r, K] slice per row tile; the row tile is a config choice, so size for the smallest.
            da_out = torch.empty((triton.cdiv(M, 32), r, K), dtype=torch.float32, device=dev) if partials else da32
            if partials:
                da_out.zero_()  # row tiles > 32 leave slices unwritten
        _gemm(dy, weight, dx, lora_l=G, lora_rt=lora_A, p=p, seed=seed, x_da=x if fuse_da else None, da=da_out)
        if fuse_da and partials:
            da32 = da_out.sum(0)

    dW = None
    if need_dW:
        dW = _alloc((N, K), weight.dtype, dev)
        _gemm(dy.t(), x, dW)

    if need_dA and not fuse_da:
        k_blocks = triton.cdiv(K, _DA_BLOCK_K)
        # Enough (k block, M split) programs to fill the GPU twice over; never more splits than row blocks.
        split_m = max(1, min(math.ceil(2 * _sm_count(dev) / k_blocks), triton.cdiv(M, 32)))
        part = torch.empty((split_m, r, K), dtype=torch.float32, device=dev)
        _launch(
            "lora_da", _lora_da_kernel, (k_blocks, split_m),
            G, x, part, M, K, r, _m_bucket(M), split_m,
            G.stride(0), G.stride(1), x.stride(0), x.stride(1),
            keep_threshold(p), 1.0 / (1.0 - p), seed,
            HAS_DROPOUT=p > 0.0, R_PAD=r_pad, DOT_PREC=dot_prec, BLOCK_K=_DA_BLOCK_K,
        )  # fmt: skip
        da32 = part.sum(0) if split_m > 1 else part[0]

    dA = da32.to(lora_A.dtype) if need_dA else None
    dB = dlb32.to(lora_B.dtype) if need_dB else None
    db = dbias32.to(db_dtype or weight.dtype) if need_db else None
    return dx, dW, db, dA, dB


# ----------------------------------------------------------------------------------------------------------
# Compile check (peft_kernels/triton/_compile_check.py): every variant the launchers can run for the
# benchmark shapes, as it would be compiled for sm_90a.
# ----------------------------------------------------------------------------------------------------------


def _gemm_variant(jit_variant, path, role, dt, r, shape, *, bias, drop, fuse, main, tag=""):
    bm, bn, bk, w, st = shape
    es = 2 if dt in ("bf16", "fp16") else 4
    r_pad = _r_pad(r)
    # Example launch values at M = 8192, K = N = 4096 (every benchmark shape specializes the same way):
    # contiguous x/dy/W/S/G/lora_A, (sB)^T read through lora_B.t(), fp32 adapters, a contiguous bias.
    M, K, N = 8192, 4096, 4096
    if role == "fwd":  # y[M, N] = x @ W^T, L = S [M, r], Rt = B^T (strides (1, r))
        gm, gn, gk, ab, lor, rtr = M, N, K, ((K, 1), (1, K)), (r, 1), (1, r)
    elif role == "dx":  # dx[M, K] = dy @ W, L = G [M, r], Rt = A [r, K]
        gm, gn, gk, ab, lor, rtr = M, K, N, ((N, 1), (K, 1)), (r, 1), (K, 1)
    else:  # dW[N, K] = dy^T @ x (dy^T: strides (1, N)); no LoRA operands (dummies: the output)
        gm, gn, gk, ab, lor, rtr = N, K, M, ((1, N), (K, 1)), (K, 1), (K, 1)
    args = {n: f"*{dt}" for n in ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "l_ptr", "x_ptr")}
    args.update(r_ptr="*fp32" if role != "dW" else f"*{dt}", da_ptr="*fp32" if fuse else f"*{dt}")
    args.update(M=gm, N=gn, K=gk, R=r if role != "dW" else 1, M_BUCKET=triton.next_power_of_2(gm))
    cx = dict(HAS_BIAS=bias, HAS_LORA=role != "dW", HAS_DROPOUT=drop, FUSE_DA=fuse, DA_PARTIALS=False,
              R_PAD=r_pad if role != "dW" else 16, R_CHUNK=min(r_pad, 32) if role != "dW" else 16, DOT_PREC=None,
              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)  # fmt: skip
    if path == "tma":
        kern = _gemm_lora_tma_kernel
        lead = [s_[0] if s_[1] == 1 else s_[1] for s_ in ab]
        args.update(stride_a=lead[0], stride_b=lead[1], stride_c=gn)
        cx.update(A_T=role == "dW", B_T=role == "fwd", NUM_SMS=132, FLATTEN=_flatten(cx["R_PAD"]))
    else:
        kern = _gemm_lora_ptr_kernel
        (sam, sak), (sbk, sbn) = ab
        args.update(stride_am=sam, stride_ak=sak, stride_bk=sbk, stride_bn=sbn, stride_cm=gn, stride_cn=1)
    args.update(stride_lm=lor[0], stride_lr=lor[1], stride_rr=rtr[0], stride_rn=rtr[1], stride_bias=1,
                stride_xm=K, stride_xk=1, stride_dap=0,
                r_scale=0.5, keep_t=keep_threshold(0.05), inv_keep=1 / 0.95, seed=2**40 + 3)  # fmt: skip
    flags = ("b" if bias else "") + ("d" if drop else "") + ("+dA" if fuse else "")
    est = gemm_smem_estimate(bm, bn, bk, st, es, es, r_pad, path == "tma", fuse, drop)
    return jit_variant(
        f"lora.gemm_{path}.{role}{'.' + flags if flags else ''}.{dt}.r{r}.{bm}x{bn}x{bk}w{w}s{st}{tag}",
        kern, args, cx, num_warps=w, num_stages=st, kind="gemm_tma" if path == "tma" else "gemm", main=main,
        smem_estimate=est,
    )  # fmt: skip


def compile_variants(quick: bool = False) -> list:
    """The compile-check protocol (peft_kernels/triton/_compile_check.py): every GEMM config that survives
    :func:`_prune_gemm` for bf16/fp16 at r = 16 and r = 128, each role (forward y with bias, with dropout;
    dx with the fused dA, with dropout; plain dW), the PEFT_KERNELS_TRITON_AUTOTUNE=0 configs, one pointer-path
    variant per role, and every config of the skinny S and dy passes. The benchmark shapes (M = 8192,
    K, N in {4096, 14336}) only enter through divisibility by 16, the same for all of them.
    quick (CI): bf16, r = 16, per role the largest surviving config and the fixed fallback config."""
    from ._compile_check import jit_variant

    out = []
    # fp16 compiles like bf16 (same wgmma shapes, same layouts): one config per role is enough to show it.
    dtypes, ranks = (("bf16",), (16,)) if quick else (("bf16", "fp16"), (16, 128))
    roles = [  # role, bias, dropout, fused dA
        ("fwd", True, False, False), ("fwd", False, True, False),
        ("dx", False, False, True), ("dx", False, True, True), ("dW", False, False, False),
    ]  # fmt: skip
    for dt in dtypes:
        es = 2
        for r in ranks if dt == "bf16" else ranks[:1]:
            few = quick or dt != "bf16"
            for role, bias, drop, fuse in roles:
                if role == "dW" and r != ranks[0]:
                    continue  # no LoRA operand: r does not matter
                fits = [
                    c
                    for c in _GEMM_SHAPES
                    if gemm_smem_estimate(*c[:3], c[4], es, es, _r_pad(r), True, fuse, drop) <= SMEM_LIMIT
                ]
                tuned = fits[:1] if few else fits
                for c in tuned:
                    out.append(_gemm_variant(jit_variant, "tma", role, dt, r, c, bias=bias, drop=drop, fuse=fuse,
                                             main=c[0] * c[1] >= 128 * 128))  # fmt: skip
                # PEFT_KERNELS_TRITON_AUTOTUNE=0 runs the fixed config, or the smallest where that is pruned.
                fixed = _GEMM_FIXED[0]
                if gemm_smem_estimate(*fixed[:3], fixed[4], es, es, _r_pad(r), True, fuse, drop) > SMEM_LIMIT:
                    fixed = _GEMM_SMALLEST
                if fixed not in tuned:
                    out.append(_gemm_variant(jit_variant, "tma", role, dt, r, fixed, bias=bias, drop=drop, fuse=fuse,
                                             main=True, tag=".fixed"))  # fmt: skip
                if not few or role == "fwd" and not drop:
                    out.append(_gemm_variant(jit_variant, "pointer", role, dt, r, fixed, bias=bias, drop=drop,
                                             fuse=fuse, main=False))  # fmt: skip
            # Skinny passes (memory-bound, reported only): every autotune config of the S and dy kernels.
            # (One num_warps/num_stages per block shape: these are memory-bound streams, reported only.)
            down = [
                c
                for c in _lora_down_kernel.configs
                if c.num_warps == 4
                and c.num_stages == 3
                and down_smem_estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], 3, es, 4, _r_pad(r)) <= SMEM_LIMIT
            ]
            for c in down[:1] if few else down:
                # (split: small M, K cut into _splits pieces, fp32 partials; M = 512 at K = 4096 -> 4 splits)
                for drop, split in ((False, False), (True, False), (True, True)):
                    if few and (not drop or split):
                        continue
                    M, K = (512, 4096) if split else (8192, 4096)
                    out.append(jit_variant(
                        f"lora.down{'.d' if drop else ''}{'.split' if split else ''}.{dt}.r{r}."
                        f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_K']}w{c.num_warps}s{c.num_stages}",
                        _lora_down_kernel,
                        dict(x_ptr=f"*{dt}", a_ptr="*fp32", s_ptr="*fp32" if split else f"*{dt}", M=M, K=K, R=r,
                             M_BUCKET=M, K_SPLIT=1024 if split else K, stride_xm=K, stride_xk=1, stride_ar=K,
                             stride_ak=1, stride_sp=M * r if split else 0, stride_sm=r, stride_sr=1,
                             keep_t=keep_threshold(0.05), inv_keep=1 / 0.95, seed=2**40 + 3),
                        dict(HAS_DROPOUT=drop, R_PAD=_r_pad(r), DOT_PREC=None, **c.kwargs),
                        num_warps=c.num_warps, num_stages=c.num_stages,
                    ))  # fmt: skip
            dy = [c for c in _lora_dy_kernel.configs if c.num_warps == 4 and c.num_stages == 3]
            for c in dy[:1] if few else dy:
                M, N = 8192, 4096
                out.append(jit_variant(
                    f"lora.dy.{dt}.r{r}.{_DY_BLOCK_M}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}",
                    _lora_dy_kernel,
                    dict(dy_ptr=f"*{dt}", b_ptr="*fp32", s_ptr=f"*{dt}", g_ptr=f"*{dt}", dlb_ptr="*fp32",
                         dbias_ptr="*fp32", M=M, N=N, R=r, M_BUCKET=M, N_SPLIT=N, stride_dym=N, stride_dyn=1,
                         stride_bn=r, stride_br=1, stride_sm=r, stride_sr=1, stride_gp=0, stride_gm=r, stride_gr=1,
                         scaling=0.5),
                    dict(COMPUTE_G=True, COMPUTE_DLB=True, COMPUTE_DBIAS=True, PARTIALS=False,
                         R_PAD=_r_pad(r), DOT_PREC=None, BLOCK_M=_DY_BLOCK_M, **c.kwargs),
                    num_warps=c.num_warps, num_stages=c.num_stages,
                ))  # fmt: skip
            if not few:
                # The dy pass split over N at small M (M = 512: 16 row blocks, N = 4096 in 2 pieces): fp32 G.
                c = dy[0]
                M, N = 512, 4096
                out.append(jit_variant(
                    f"lora.dy.split.{dt}.r{r}.{_DY_BLOCK_M}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}",
                    _lora_dy_kernel,
                    dict(dy_ptr=f"*{dt}", b_ptr="*fp32", s_ptr=f"*{dt}", g_ptr="*fp32", dlb_ptr="*fp32",
                         dbias_ptr="*fp32", M=M, N=N, R=r, M_BUCKET=M, N_SPLIT=2048, stride_dym=N, stride_dyn=1,
                         stride_bn=r, stride_br=1, stride_sm=r, stride_sr=1, stride_gp=M * r, stride_gm=r,
                         stride_gr=1, scaling=0.5),
                    dict(COMPUTE_G=True, COMPUTE_DLB=True, COMPUTE_DBIAS=True, PARTIALS=False,
                         R_PAD=_r_pad(r), DOT_PREC=None, BLOCK_M=_DY_BLOCK_M, **c.kwargs),
                    num_warps=c.num_warps, num_stages=c.num_stages,
                ))  # fmt: skip
        if not quick or dt == "bf16":
            out.append(jit_variant(
                f"lora.sum_splits.{dt}", _sum_splits_kernel,
                dict(part_ptr="*fp32", out_ptr=f"*{dt}", n=512 * 16, SPLITS=4), dict(BLOCK=_SUM_BLOCK),
                num_warps=4, num_stages=3,
            ))  # fmt: skip
    return out
