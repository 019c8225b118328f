"""Triton FlashAttention-2 style kernels for prefix-augmented attention (Prefix-Tuning / P-Tuning v2).

Semantics: SDPA over K' = cat(prefix_k, k) and V' = cat(prefix_v, v) along the sequence, where

* every query sees all P prefix keys (the key padding mask and the causal rule never apply to them);
* among the real keys, ``key_padding_mask[b, j]`` (True = real token) must hold, and with ``causal``
  query i sees key j iff ``j <= i + (Lk - Lq)`` (bottom-right alignment, as ``causal_lower_right``);
* GQA/MQA: query head h reads kv head ``h // (Hq // Hkv)``; the prefix has Hkv heads too;
* the prefix is shared across the batch ([Hkv, P, D], read with batch stride 0) or per batch
  ([B, Hkv, P, D]).

K'/V' are never materialised: each query block runs the online softmax over the prefix tile(s), read
from their own tensors, and then over the real keys, splitting the real-key range into blocks that
need no causal mask, blocks on the diagonal, and (causal) blocks past the diagonal that are skipped.
Because P >= 1 and the prefix is always visible, no query row is ever fully masked, so the running
max is finite after the prefix phase and no NaN guard is needed.

``lse`` is returned in natural-log units, fp32 [B, Hq, Lq]; internally the kernels work in base 2
(scores pre-multiplied by scale * log2(e), ``exp2``).

Backward (FlashAttention-2): a preprocess kernel computes delta = rowsum(dO * O); a kernel over key
blocks (prefix blocks and real-key blocks in one launch) computes dK/dV, iterating over the query
heads of the GQA group and over the query blocks that can see the key block; a separate kernel over
query blocks computes dQ. The separate dQ kernel recomputes QK^T and dO V^T (7 GEMMs instead of 5) but
is deterministic, needs no fp32 dQ scratch buffer or cast pass, and avoids atomics that, with GQA, every
key block of every group head would contend for. Prefix gradients are written as fp32 per-batch
partials [B, Hkv, P, D] (plain stores: deterministic and autotune-safe) and summed over the batch on
the host when the prefix is shared; the buffer is tiny (P is tens of tokens).

Inputs may have arbitrary strides; a tensor whose last dimension is not unit-stride is copied once with
``.contiguous()`` (the kernels need unit stride in the head dim for vectorised loads).
Prefix tensors may have a different floating dtype from q/k/v (e.g. fp32 prefix parameters with fp16
activations): they are cast to q's dtype in registers, and their gradients come back in their own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_kernels import _config

_INTERPRET = _config.SETTINGS.triton_interpret
# PEFT_KERNELS_TRITON_AUTOTUNE=0: one fixed config per kernel (GPU test runs: many shapes, no time to tune each).
_AUTOTUNE = _config.SETTINGS.triton_autotune

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# Under the interpreter there is no autotuning: these (BLOCK_M, BLOCK_N) are passed explicitly; tests override
# them (_config.override_interpret_blocks(prefix_fwd=(16, 32), ...)) to exercise BLOCK_M != BLOCK_N.
_INTERPRET_BLOCKS = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32), "pre": 32}

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


_FWD_CONFIGS = _configs(
    [
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 128, 8, 2),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 128, 4, 2),
        (64, 32, 4, 3),
        (16, 64, 4, 3),  # decoding (Lq small)
        (16, 128, 4, 2),
    ]
)
# dK/dV hold two [BLOCK_N, D] fp32 accumulators per program: at D = 128 every 4-warp config spilled (412-4876 B,
# two with serialized wgmma) and so did the old 32x128 default (16 B with GQA 4 + padding, Triton 3.6; C7515 at
# GQA 1). Compiled for sm_90a (Triton 3.6 and 3.8), 16x64 with 8 warps is spill-free (194-207 registers):
# the default; 4-warp configs are pruned at D >= 128 (see _prune).
_DKDV_CONFIGS = _configs(
    [
        (16, 64, 8, 3),
        (32, 64, 8, 3),
        (32, 128, 8, 2),
        (32, 64, 4, 3),
        (64, 64, 4, 3),
        (16, 64, 4, 3),
        (16, 128, 4, 3),
    ]
)
_DQ_CONFIGS = _configs(
    [
        (128, 32, 8, 3),
        (64, 32, 4, 3),
        (64, 64, 4, 3),
        (128, 64, 8, 2),
        (16, 64, 4, 3),
    ]
)
_TUNE_KEY = ["LQ_KEY", "LK_KEY", "HEAD_DIM", "GROUP", "CAUSAL", "HAS_PAD"]


def _prune(configs, named_args, **kwargs):
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 0))
    if head_dim >= 128 and any(c.num_warps == 8 for c in configs) and configs is _DKDV_CONFIGS:
        configs = [c for c in configs if c.num_warps == 8]  # 4 warps spill the dK/dV accumulators there
    # fp32 ("ieee") dots compile slowly and need large shared-memory tiles: tune only the small tiles.
    if kwargs.get("PREC", named_args.get("PREC")) == "ieee":
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return small[:3] or configs[:1]
    return configs


def _maybe_autotune(configs, default: int):
    if _INTERPRET:
        return lambda fn: fn
    if not _AUTOTUNE:
        # The default, plus a small tile for what it cannot fit in shared memory (fp32 at head dim 256);
        # the autotuner drops a config that fails with out-of-resources.
        configs = [configs[default]] + _configs([(16, 32, 4, 1)])
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    # Row masks only where a tile can cross the sequence end; D masks only for padded head dims.
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _tile_ptrs(base, rows, stride_row, offs_d):
    """Pointers to the [rows, offs_d] tile of a row-major [L, D] slice (int64 row offsets: L * stride can
    exceed int32; per-step increments of BLOCK * stride fit)."""
    return base + rows.to(tl.int64)[:, None] * stride_row + offs_d[None, :]


@triton.jit
def _query_block(Lq, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Coordinates of a program over query blocks (grid: query block, query head, batch)."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return off_b, off_h, off_hk, start_m, offs_m, offs_d, offs_d < HEAD_DIM, offs_m < Lq


@triton.jit
def _key_ptrs(
    K_base, V_base, MASK_base, stride_kn, stride_vn, stride_maskn, lo, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Pointers to the K and V tiles and the padding-mask entries of key rows [lo, lo + BLOCK_N)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = lo + offs_n
    k_ptrs = _tile_ptrs(K_base, rows, stride_kn, offs_d)
    v_ptrs = _tile_ptrs(V_base, rows, stride_vn, offs_d)
    # Only dereferenced with HAS_PAD (otherwise dead code).
    pad_ptrs = MASK_base + rows.to(tl.int64) * stride_maskn
    return offs_n, k_ptrs, v_ptrs, pad_ptrs


@triton.jit
def _mask_scores(
    s, cols, col_ok, offs_m, shift, pad_ptrs,
    FILL: tl.constexpr, MASK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_PAD: tl.constexpr,
):  # fmt: skip
    """Set to FILL the entries of a [rows, cols] score (or probability) tile that a query may not see:
    columns past the key source's end (MASK_N), keys right of the bottom-right diagonal (CAUSAL_MASK),
    padded keys (HAS_PAD, mask loaded from pad_ptrs)."""
    if MASK_N:
        s = tl.where(col_ok[None, :], s, FILL)
    if CAUSAL_MASK:
        s = tl.where(cols[None, :] <= offs_m[:, None] + shift, s, FILL)
    if HAS_PAD:
        keep = tl.load(pad_ptrs, mask=col_ok, other=0)
        s = tl.where(keep[None, :] != 0, s, FILL)
    return s


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    K_base, V_base, stride_kn, stride_vn, MASK_base, stride_maskn,
    lo, hi, n_valid, offs_m, shift, qk_scale, d_ok,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_PAD: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Online-softmax update over key rows [lo, hi) of one key source (prefix or real keys)."""
    offs_n, k_ptrs, v_ptrs, pad_ptrs = _key_ptrs(
        K_base, V_base, MASK_base, stride_kn, stride_vn, stride_maskn, lo, BLOCK_N, BLOCK_D
    )
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_valid
        k = _load_tile(k_ptrs, col_ok, d_ok, MASK_N, EVEN_D).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = _mask_scores(s, cols, col_ok, offs_m, shift, pad_ptrs, float("-inf"), MASK_N, CAUSAL_MASK, HAS_PAD)
        if HAS_PAD:
            pad_ptrs += BLOCK_N * stride_maskn
        # m_i is finite after the first prefix tile (prefix key 0 is visible to every row).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, col_ok, d_ok, MASK_N, EVEN_D).to(q.dtype)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _real_key_range(start_m, Lq, Lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Real-key range of a query block: [0, mid) needs no causal/bounds mask, [mid, hi) does,
    [hi, Lk) is invisible to every row of the block (skipped)."""
    if CAUSAL:
        shift = Lk - Lq
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), Lk)
        # Block [n, n + BLOCK_N) is fully visible to row start_m iff n + BLOCK_N - 1 <= start_m + shift;
        # such blocks also end inside Lk because start_m < Lq.
        mid = tl.minimum(tl.maximum(start_m + shift + 1, 0) // BLOCK_N * BLOCK_N, hi)
    else:
        hi = Lk
        mid = Lk // BLOCK_N * BLOCK_N
    return mid, hi


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


@_maybe_autotune(_FWD_CONFIGS, default=4)
@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, MASK, OUT, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_maskb, stride_maskn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    Lq, Lk, P, qk_scale, LQ_KEY, LK_KEY,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    off_b, off_h, off_hk, start_m, offs_m, offs_d, d_ok, row_ok = _query_block(Lq, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M)
    q_ptrs = _tile_ptrs(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qm, offs_d)
    q = _load_tile(q_ptrs, row_ok, d_ok, True, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Phase 1: the prefix keys, read from their own tensors in tiles sized to P (not to BLOCK_N), masked at P only.
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q,
        PK + off_b * stride_pkb + off_hk * stride_pkh,
        PV + off_b * stride_pvb + off_hk * stride_pvh,
        stride_pkn, stride_pvn, MASK, 0,
        0, P, P, offs_m, 0, qk_scale, d_ok,
        BLOCK_P, BLOCK_D, True, False, False, EVEN_D, PREC,
    )  # fmt: skip

    # Phase 2: the real keys; unmasked blocks first, then the diagonal / ragged-end blocks.
    mid, hi = _real_key_range(start_m, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    K_base = K + off_b * stride_kb + off_hk * stride_kh
    V_base = V + off_b * stride_vb + off_hk * stride_vh
    MASK_base = MASK + off_b * stride_maskb
    shift = Lk - Lq
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, MASK_base, stride_maskn,
        0, mid, Lk, offs_m, shift, qk_scale, d_ok,
        BLOCK_N, BLOCK_D, False, False, HAS_PAD, EVEN_D, PREC,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, MASK_base, stride_maskn,
        mid, hi, Lk, offs_m, shift, qk_scale, d_ok,
        BLOCK_N, BLOCK_D, True, CAUSAL, HAS_PAD, EVEN_D, PREC,
    )  # fmt: skip

    acc = acc / l_i[:, None]
    o_ptrs = _tile_ptrs(OUT + off_b * stride_ob + off_h * stride_oh, offs_m, stride_om, offs_d)
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    o_ptrs = _tile_ptrs(OUT + off_b * stride_ob + off_h * stride_oh, offs_m, stride_om, offs_d)
    o = _load_tile(o_ptrs, row_ok, d_ok, True, EVEN_D)
    do_ptrs = _tile_ptrs(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dom, offs_d)
    do = _load_tile(do_ptrs, row_ok, d_ok, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_b * stride_lb + off_h * stride_lh + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_qloop(
    dk, dv, k, v,
    Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qm, stride_dom,
    lo, hi, Lq, offs_n, shift, qk_scale, d_ok,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dK/dV of one key tile over query rows [lo, hi) of one query head (transposed form)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = _tile_ptrs(Q_bh, lo + offs_m0, stride_qm, offs_d)
    do_ptrs = _tile_ptrs(DO_bh, lo + offs_m0, stride_dom, offs_d)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m0
        row_ok = rows < Lq
        q = _load_tile(q_ptrs, row_ok, d_ok, True, EVEN_D)
        do = _load_tile(do_ptrs, row_ok, d_ok, True, EVEN_D)
        lse2 = tl.load(LSE_bh + rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA_bh + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        keep = row_ok[None, :]
        if CAUSAL_MASK:
            keep = keep & (offs_n[:, None] <= rows[None, :] + shift)
        p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _dkdv_block(
    Q_b, DO_b, LSE_b, DELTA_b,
    K_base, V_base, DK_base, DV_base, MASK_base,
    stride_qh, stride_qm, stride_doh, stride_dom, stride_lh,
    stride_kn, stride_vn, stride_dkn, stride_dvn, stride_maskn,
    off_hk, start_n, n_valid, Lq, shift, scale, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK/dV of one key tile (prefix or real) summed over the GROUP query heads that share it."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = offs_n < n_valid
    k = _load_tile(_tile_ptrs(K_base, offs_n, stride_kn, offs_d), col_ok, d_ok, True, EVEN_D)
    v = _load_tile(_tile_ptrs(V_base, offs_n, stride_vn, offs_d), col_ok, d_ok, True, EVEN_D)
    k = k.to(Q_b.dtype.element_ty)
    v = v.to(Q_b.dtype.element_ty)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # Rows below lo see none of this tile; rows in [lo, mid) see part of it; rows >= mid see all.
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, Lq)
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0

    # Ragged key ends (col >= n_valid) only pollute dK/dV rows that are never stored: no mask needed.
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        Q_bh = Q_b + off_h * stride_qh
        DO_bh = DO_b + off_h * stride_doh
        LSE_bh = LSE_b + off_h * stride_lh
        DELTA_bh = DELTA_b + off_h * stride_lh
        if CAUSAL:
            dk, dv = _dkdv_qloop(
                dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qm, stride_dom,
                lo, mid, Lq, offs_n, shift, qk_scale, d_ok,
                BLOCK_M, BLOCK_D, True, EVEN_D, PREC,
            )  # fmt: skip
        dk, dv = _dkdv_qloop(
            dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, stride_qm, stride_dom,
            mid, Lq, Lq, offs_n, shift, qk_scale, d_ok,
            BLOCK_M, BLOCK_D, False, EVEN_D, PREC,
        )  # fmt: skip

    dk = dk * scale
    if HAS_PAD:
        # A padded key gets no probability from any query: its gradients are exactly zero. Masking here,
        # once, is equivalent to masking P^T inside the loop because key rows do not mix.
        keep = tl.load(MASK_base + offs_n.to(tl.int64) * stride_maskn, mask=col_ok, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    st_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(_tile_ptrs(DK_base, offs_n, stride_dkn, offs_d), dk.to(DK_base.dtype.element_ty), mask=st_mask)
    tl.store(_tile_ptrs(DV_base, offs_n, stride_dvn, offs_d), dv.to(DV_base.dtype.element_ty), mask=st_mask)


@_maybe_autotune(_DKDV_CONFIGS, default=0)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, PK, PV, MASK, DO, LSE, DELTA, DK, DV, DPK, DPV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_maskb, stride_maskn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dpb, stride_dph, stride_dpn,
    Lq, Lk, P, scale, qk_scale, LQ_KEY, LK_KEY,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One launch for both key sources: program ids [0, n_prefix_blocks) take prefix tiles (the longest
    # programs under causal masking, so they start first), the rest take real-key tiles.
    pid = tl.program_id(0)
    off_hk = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    n_prefix_blocks = tl.cdiv(P, BLOCK_N)
    Q_b = Q + off_b * stride_qb
    DO_b = DO + off_b * stride_dob
    LSE_b = LSE + off_b * stride_lb
    DELTA_b = DELTA + off_b * stride_lb
    if pid < n_prefix_blocks:
        _dkdv_block(
            Q_b, DO_b, LSE_b, DELTA_b,
            PK + off_b * stride_pkb + off_hk * stride_pkh,
            PV + off_b * stride_pvb + off_hk * stride_pvh,
            DPK + off_b * stride_dpb + off_hk * stride_dph,
            DPV + off_b * stride_dpb + off_hk * stride_dph,
            MASK,
            stride_qh, stride_qm, stride_doh, stride_dom, stride_lh,
            stride_pkn, stride_pvn, stride_dpn, stride_dpn, 0,
            off_hk, pid * BLOCK_N, P, Lq, 0, scale, qk_scale,
            GROUP, HEAD_DIM, BLOCK_D, EVEN_D, False, False, PREC, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    else:
        _dkdv_block(
            Q_b, DO_b, LSE_b, DELTA_b,
            K + off_b * stride_kb + off_hk * stride_kh,
            V + off_b * stride_vb + off_hk * stride_vh,
            DK + off_b * stride_dkb + off_hk * stride_dkh,
            DV + off_b * stride_dkb + off_hk * stride_dkh,
            MASK + off_b * stride_maskb,
            stride_qh, stride_qm, stride_doh, stride_dom, stride_lh,
            stride_kn, stride_vn, stride_dkn, stride_dkn, stride_maskn,
            off_hk, (pid - n_prefix_blocks) * BLOCK_N, Lk, Lq, Lk - Lq, scale, qk_scale,
            GROUP, HEAD_DIM, BLOCK_D, EVEN_D, CAUSAL, HAS_PAD, PREC, BLOCK_M, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta,
    K_base, V_base, stride_kn, stride_vn, MASK_base, stride_maskn,
    lo, hi, n_valid, offs_m, shift, qk_scale, d_ok,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_PAD: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query tile over key rows [lo, hi) of one key source."""
    offs_n, k_ptrs, v_ptrs, pad_ptrs = _key_ptrs(
        K_base, V_base, MASK_base, stride_kn, stride_vn, stride_maskn, lo, BLOCK_N, BLOCK_D
    )
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_valid
        k = _load_tile(k_ptrs, col_ok, d_ok, MASK_N, EVEN_D).to(q.dtype)
        v = _load_tile(v_ptrs, col_ok, d_ok, MASK_N, EVEN_D).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = _mask_scores(p, cols, col_ok, offs_m, shift, pad_ptrs, 0.0, MASK_N, CAUSAL_MASK, HAS_PAD)
        if HAS_PAD:
            pad_ptrs += BLOCK_N * stride_maskn
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(q.dtype), k, dq, input_precision=PREC)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@_maybe_autotune(_DQ_CONFIGS, default=1)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, MASK, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_maskb, stride_maskn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dqm,
    Lq, Lk, P, scale, qk_scale, LQ_KEY, LK_KEY,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    off_b, off_h, off_hk, start_m, offs_m, offs_d, d_ok, row_ok = _query_block(Lq, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M)
    q_ptrs = _tile_ptrs(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qm, offs_d)
    q = _load_tile(q_ptrs, row_ok, d_ok, True, EVEN_D)
    do_ptrs = _tile_ptrs(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dom, offs_d)
    do = _load_tile(do_ptrs, row_ok, d_ok, True, EVEN_D)
    lse2 = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + off_b * stride_lb + off_h * stride_lh + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    dq = _dq_inner(
        dq, q, do, lse2, delta,
        PK + off_b * stride_pkb + off_hk * stride_pkh,
        PV + off_b * stride_pvb + off_hk * stride_pvh,
        stride_pkn, stride_pvn, MASK, 0,
        0, P, P, offs_m, 0, qk_scale, d_ok,
        BLOCK_P, BLOCK_D, True, False, False, EVEN_D, PREC,
    )  # fmt: skip
    mid, hi = _real_key_range(start_m, Lq, Lk, CAUSAL, BLOCK_M, BLOCK_N)
    K_base = K + off_b * stride_kb + off_hk * stride_kh
    V_base = V + off_b * stride_vb + off_hk * stride_vh
    MASK_base = MASK + off_b * stride_maskb
    shift = Lk - Lq
    dq = _dq_inner(
        dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, MASK_base, stride_maskn,
        0, mid, Lk, offs_m, shift, qk_scale, d_ok,
        BLOCK_N, BLOCK_D, False, False, HAS_PAD, EVEN_D, PREC,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, K_base, V_base, stride_kn, stride_vn, MASK_base, stride_maskn,
        mid, hi, Lk, offs_m, shift, qk_scale, d_ok,
        BLOCK_N, BLOCK_D, True, CAUSAL, HAS_PAD, EVEN_D, PREC,
    )  # fmt: skip

    dq = dq * scale
    dq_ptrs = _tile_ptrs(DQ + off_b * stride_dqb + off_h * stride_dqh, offs_m, stride_dqm, offs_d)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------


def _why_not(q, k, v, prefix_k, prefix_v, key_padding_mask) -> str:
    tensors = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"{name}: expected a tensor, got {type(t).__name__}"
    if _INTERPRET:
        if q.device.type != "cpu":
            return f"q: TRITON_INTERPRET=1 runs on CPU tensors, got device {q.device}"
    elif q.device.type != "cuda":
        return f"q: needs a CUDA tensor (or TRITON_INTERPRET=1 with CPU tensors), got device {q.device}"
    for name, t in tensors.items():
        if t.device != q.device:
            return f"{name}: on {t.device}, q is on {q.device}"
        if t.dtype not in _SUPPORTED_DTYPES:
            return f"{name}: dtype {t.dtype} not in fp16/bf16/fp32"
        if _INTERPRET and t.dtype == torch.bfloat16:
            return f"{name}: bf16 tl.dot is wrong under TRITON_INTERPRET=1; use fp16/fp32 or a GPU"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"k/v: dtypes {k.dtype}/{v.dtype} must equal q's {q.dtype}"
    if prefix_v.dtype != prefix_k.dtype:
        return f"prefix_v: dtype {prefix_v.dtype} must equal prefix_k's {prefix_k.dtype}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q/k/v: must be 4-D [B, H, L, D], got {q.dim()}/{k.dim()}/{v.dim()}-D"
    B, Hq, _, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or Dk != D:
        return f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim"
    if tuple(v.shape) != tuple(k.shape):
        return f"v: shape {tuple(v.shape)} must equal k's {tuple(k.shape)}"
    if Hkv == 0 or Hq % Hkv != 0:
        return f"k: kv heads {Hkv} must divide query heads {Hq}"
    if not 1 <= D <= _MAX_HEAD_DIM:
        return f"q: head dim {D} not in [1, {_MAX_HEAD_DIM}]"
    if prefix_k.dim() not in (3, 4):
        return f"prefix_k: must be [Hkv, P, D] or [B, Hkv, P, D], got {prefix_k.dim()}-D"
    if tuple(prefix_v.shape) != tuple(prefix_k.shape):
        return f"prefix_v: shape {tuple(prefix_v.shape)} must equal prefix_k's {tuple(prefix_k.shape)}"
    lead = (Hkv,) if prefix_k.dim() == 3 else (B, Hkv)
    if tuple(prefix_k.shape[:-2]) != lead or prefix_k.shape[-1] != D:
        return f"prefix_k: shape {tuple(prefix_k.shape)} does not match {lead} + (P, {D})"
    if prefix_k.shape[-2] < 1:
        return "prefix_k: needs P >= 1 prefix tokens (use plain attention for P == 0)"
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            return "key_padding_mask: must be None or a bool tensor (True = attend)"
        if tuple(key_padding_mask.shape) != (B, Lk):
            return f"key_padding_mask: shape {tuple(key_padding_mask.shape)} must be (B, Lk) = {(B, Lk)}"
        if key_padding_mask.device != q.device:
            return f"key_padding_mask: on {key_padding_mask.device}, q is on {q.device}"
    return ""


def why_not(q, k, v, prefix_k, prefix_v, key_padding_mask) -> str | None:
    """Why the Triton kernels cannot serve these inputs (op, argument, constraint), or None when they can.

    Needs: CUDA tensors (CPU tensors under TRITON_INTERPRET=1); q/k/v of one dtype in fp16/bf16/fp32
    (no bf16 under the interpreter); prefix_k/prefix_v of one floating dtype (may differ from q's);
    head dim <= 256; P >= 1; Hq % Hkv == 0; a bool [B, Lk] mask or None. Any strides are accepted; a
    tensor whose last dim is not unit-stride is copied to contiguous first.
    """
    why = _why_not(q, k, v, prefix_k, prefix_v, key_padding_mask)
    return f"prefix_attention[triton]: {why}" if why else None


# Triton before 3.7 (3.6 is on the GPU machine) serializes every wgmma of the dK/dV kernel when each KV head has one
# query head (ptxas C7515 for every 8-warp config in the sm_90a compile check); 3.8 pipelines it. There dispatch
# takes another backward (the sdpa composition) rather than a kernel known to run the tensor cores serially.
_DKDV_MHA_PIPELINED = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7)


def backward_why_not(q, k) -> str | None:
    """Why the dK/dV kernel should not serve this backward on this Triton (None: it should)."""
    if not _INTERPRET and not _DKDV_MHA_PIPELINED and q.shape[1] == k.shape[1]:
        return (f"prefix_attention[triton]: Triton {triton.__version__} serializes the dK/dV kernel's wgmma "
                "without grouped KV heads (ptxas C7515); Triton >= 3.7 pipelines it")
    return None


def _check(q, k, v, prefix_k, prefix_v, key_padding_mask):
    why = why_not(q, k, v, prefix_k, prefix_v, key_padding_mask)
    if why:
        raise ValueError(why)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    # Under the interpreter (tests) or PEFT_KERNELS_POISON, an element the kernels fail to write shows up as NaN.
    return t.fill_(float("nan")) if _INTERPRET or _config.poison_outputs() else t


def _alloc(shape, dtype, device):
    return _poisoned(torch.empty(shape, dtype=dtype, device=device))


def _alloc_like(ref: torch.Tensor, dtype=None):
    # Outputs and gradients are laid out like their inputs ([B, L, H, D]-strided views stay so: no copy).
    return _poisoned(torch.empty_like(ref, dtype=dtype))


def _prefix_strides(t: torch.Tensor):
    # A shared prefix is read with batch stride 0: no expand/copy, every batch reads the same rows.
    if t.dim() == 3:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _mask_args(key_padding_mask, dummy):
    if key_padding_mask is None:
        return dummy, 0, 0, False
    m = key_padding_mask.view(torch.uint8)  # same bytes, no copy; the kernel tests != 0
    return m, m.stride(0), m.stride(1), True


def _common(q, k, prefix_k, key_padding_mask):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    meta = {
        "GROUP": Hq // Hkv,
        "HEAD_DIM": D,
        "BLOCK_D": block_d,
        "EVEN_D": block_d == D,
        # Full-precision fp32 dots (torch's fp32 matmul default); None = backend default for fp16/bf16.
        "PREC": "ieee" if q.dtype == torch.float32 else None,
    }
    keys = (triton.next_power_of_2(max(Lq, 1)), triton.next_power_of_2(max(Lk, 1)))
    return B, Hq, Hkv, Lq, Lk, prefix_k.shape[-2], D, meta, keys


def _block_p(P: int) -> int:
    # The prefix tile: P rounded up to a power of two (>= 16 for tl.dot), at most 64 keys per step.
    return max(16, min(64, triton.next_power_of_2(P)))


def _blocks(name):
    if not _INTERPRET:
        return {}
    bm, bn = _config.interpret_blocks("prefix_" + name, _INTERPRET_BLOCKS[name])
    return {"BLOCK_M": bm, "BLOCK_N": bn}


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, causal: bool, key_padding_mask, scale: float):
    """Returns (out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] fp32, natural log)."""
    _check(q, k, v, prefix_k, prefix_v, key_padding_mask)
    q, k, v, prefix_k, prefix_v = (_unit_last(t) for t in (q, k, v, prefix_k, prefix_v))
    B, Hq, Hkv, Lq, Lk, P, D, meta, keys = _common(q, k, prefix_k, key_padding_mask)
    out = _alloc_like(q)
    lse = _alloc((B, Hq, Lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    mask, smb, smn, has_pad = _mask_args(key_padding_mask, q)
    grid = lambda meta_: (triton.cdiv(Lq, meta_["BLOCK_M"]), Hq, B)
    _fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, mask, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_prefix_strides(prefix_k),
        *_prefix_strides(prefix_v),
        smb, smn,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        Lq, Lk, P, float(scale) * 1.4426950408889634, *keys,
        CAUSAL=bool(causal), HAS_PAD=has_pad, BLOCK_P=_block_p(P), **meta, **_blocks("fwd"),
    )  # fmt: skip
    return out, lse


def prefix_attention_backward(
    do, q, k, v, prefix_k, prefix_v, out, lse, causal, key_padding_mask, scale
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dprefix_k, dprefix_v), each in its input's dtype and shape.

    ``lse`` is the natural-log logsumexp returned by :func:`prefix_attention_forward`. For a shared
    prefix ([Hkv, P, D]) the prefix gradients are summed over the batch.
    """
    _check(q, k, v, prefix_k, prefix_v, key_padding_mask)
    q, k, v, prefix_k, prefix_v = (_unit_last(t) for t in (q, k, v, prefix_k, prefix_v))
    do = _unit_last(do.to(q.dtype))
    out = _unit_last(out.to(q.dtype))
    lse = lse.to(torch.float32).contiguous()
    B, Hq, Hkv, Lq, Lk, P, D, meta, keys = _common(q, k, prefix_k, key_padding_mask)
    shared = prefix_k.dim() == 3

    dq, dk, dv = _alloc_like(q), _alloc_like(k), _alloc_like(v)
    if Lq == 0 or B == 0 or Hq == 0:
        z = lambda t: torch.zeros_like(t)
        return dq, z(k), z(v), z(prefix_k), z(prefix_v)
    # fp32 per-batch partials; summed over B below when the prefix is shared.
    dpk = _alloc((B, Hkv, P, D), torch.float32, q.device)
    dpv = _alloc((B, Hkv, P, D), torch.float32, q.device)
    delta = _alloc((B, Hq, Lq), torch.float32, q.device)
    mask, smb, smn, has_pad = _mask_args(key_padding_mask, q)
    qk_scale = float(scale) * 1.4426950408889634

    pre_m = _config.interpret_blocks("prefix_pre", _INTERPRET_BLOCKS["pre"]) if _INTERPRET else 64
    _bwd_preprocess_kernel[(triton.cdiv(Lq, pre_m), Hq, B)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        delta.stride(0), delta.stride(1),
        Lq, HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], EVEN_D=meta["EVEN_D"], BLOCK_M=pre_m,
    )  # fmt: skip

    common_strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_prefix_strides(prefix_k),
        *_prefix_strides(prefix_v),
        smb, smn,
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
    )  # fmt: skip
    grid_kv = lambda meta_: (triton.cdiv(P, meta_["BLOCK_N"]) + triton.cdiv(Lk, meta_["BLOCK_N"]), Hkv, B)
    _bwd_dkdv_kernel[grid_kv](
        q, k, v, prefix_k, prefix_v, mask, do, lse, delta, dk, dv, dpk, dpv,
        *common_strides,
        dk.stride(0), dk.stride(1), dk.stride(2),
        dpk.stride(0), dpk.stride(1), dpk.stride(2),
        Lq, Lk, P, float(scale), qk_scale, *keys,
        CAUSAL=bool(causal), HAS_PAD=has_pad, **meta, **_blocks("dkdv"),
    )  # fmt: skip
    grid_q = lambda meta_: (triton.cdiv(Lq, meta_["BLOCK_M"]), Hq, B)
    _bwd_dq_kernel[grid_q](
        q, k, v, prefix_k, prefix_v, mask, do, lse, delta, dq,
        *common_strides,
        dq.stride(0), dq.stride(1), dq.stride(2),
        Lq, Lk, P, float(scale), qk_scale, *keys,
        CAUSAL=bool(causal), HAS_PAD=has_pad, BLOCK_P=_block_p(P), **meta, **_blocks("dq"),
    )  # fmt: skip

    if shared:
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)


# --------------------------------------------------------------------------------------------------
# compile-check protocol (peft_kernels/triton/_compile_check.py)
# --------------------------------------------------------------------------------------------------
def _hl_strides(name: str, L: int, H: int, D: int, rows: str = "m") -> dict:
    # transformers' [B, L, H, D] tensors viewed as [B, H, L, D]: (batch, head, row) strides
    return {f"stride_{name}b": L * H * D, f"stride_{name}h": D, f"stride_{name}{rows}": H * D}


def compile_variants(quick: bool = False) -> list:
    """Every autotune config and the PEFT_KERNELS_TRITON_AUTOTUNE=0 fallback of the four kernels, at the benchmark
    shape (B=4, L=2048, D=128, P=32, HL layout, shared fp32 prefix), causal, MHA and GQA (group 4), with and
    without padding, bf16 and fp16. quick (CI): bf16 MHA causal, the default and fallback config of each kernel."""
    from ._compile_check import jit_variant

    L, D, P, Hq = 2048, 128, 32, 32  # B = 4 enters only through strides that do not depend on it
    out = []
    dtypes = ("bf16",) if quick else ("bf16", "fp16")
    groups = (1,) if quick else (1, 4)
    if not _DKDV_MHA_PIPELINED:  # dispatch launches dK/dV only with GQA on this Triton (backward_why_not)
        groups = (1, 4)
    pads = (False,) if quick else (False, True)
    fallback = _configs([(16, 32, 4, 1)])[0]
    for dt in dtypes:
        for group in groups:
            Hkv = Hq // group
            for pad in pads:
                flags = f"g{group}{'.pad' if pad else ''}"
                common = {
                    "Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "PK": "*fp32", "PV": "*fp32", "MASK": "*u8",
                    **_hl_strides("q", L, Hq, D), **_hl_strides("k", L, Hkv, D, "n"),
                    **_hl_strides("v", L, Hkv, D, "n"),
                    "stride_pkb": 0, "stride_pkh": P * D, "stride_pkn": D,
                    "stride_pvb": 0, "stride_pvh": P * D, "stride_pvn": D,
                    "stride_maskb": L if pad else 0, "stride_maskn": 1 if pad else 0,
                    "Lq": L, "Lk": L, "P": P, "LQ_KEY": L, "LK_KEY": L,
                }  # fmt: skip
                cx = {"GROUP": group, "HEAD_DIM": D, "BLOCK_D": D, "EVEN_D": True, "CAUSAL": True, "HAS_PAD": pad,
                      "PREC": None}
                lse = {"stride_lb": Hq * L, "stride_lh": L}
                kernels = {
                    "fwd": (_fwd_kernel, _FWD_CONFIGS, 4, {
                        **common, "OUT": f"*{dt}", "LSE": "*fp32", **_hl_strides("o", L, Hq, D), **lse,
                        "qk_scale": 0.1}),
                    "dkdv": (_bwd_dkdv_kernel, _DKDV_CONFIGS, 0, {
                        **common, "DO": f"*{dt}", "LSE": "*fp32", "DELTA": "*fp32", "DK": f"*{dt}", "DV": f"*{dt}",
                        "DPK": "*fp32", "DPV": "*fp32", **_hl_strides("do", L, Hq, D), **lse,
                        **_hl_strides("dk", L, Hkv, D, "n"), "stride_dpb": Hkv * P * D, "stride_dph": P * D,
                        "stride_dpn": D, "scale": 0.08, "qk_scale": 0.1}),
                    "dq": (_bwd_dq_kernel, _DQ_CONFIGS, 1, {
                        **common, "DO": f"*{dt}", "LSE": "*fp32", "DELTA": "*fp32", "DQ": f"*{dt}",
                        **_hl_strides("do", L, Hq, D), **lse, **_hl_strides("dq", L, Hq, D), "scale": 0.08,
                        "qk_scale": 0.1}),
                }  # fmt: skip
                for kname, (kernel, configs, default, args) in kernels.items():
                    if kname == "dkdv" and group == 1 and not _DKDV_MHA_PIPELINED:
                        continue
                    # what the launcher can launch: the pruned autotune list (4-warp dK/dV configs go at D = 128)
                    tuned = [c for c in configs if kname != "dkdv" or c.num_warps == 8]
                    chosen = [configs[default], fallback] if quick or dt != "bf16" else [*tuned, fallback]
                    for c in chosen:
                        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                        tag = ".default" if c is configs[default] else (".fallback" if c is fallback else "")
                        out.append(jit_variant(
                            f"prefix_attention.{kname}.{flags}.{dt}.{bm}x{bn}w{c.num_warps}s{c.num_stages}{tag}",
                            kernel, args, {**cx, "BLOCK_M": bm, "BLOCK_N": bn,
                                           **({} if kname == "dkdv" else {"BLOCK_P": _block_p(P)})},
                            num_warps=c.num_warps,
                            num_stages=c.num_stages, main=bool(tag == ".default"),
                            # the 16-row fallback (for fp32 / head dim 256 shared memory) is below wgmma's M = 64
                            kind="stream" if c is fallback else "attention"))  # fmt: skip
        pre = {"OUT": f"*{dt}", "DO": f"*{dt}", "DELTA": "*fp32", **_hl_strides("o", L, Hq, D),
               **_hl_strides("do", L, Hq, D), "stride_lb": Hq * L, "stride_lh": L, "Lq": L}
        out.append(jit_variant(f"prefix_attention.pre.{dt}.64", _bwd_preprocess_kernel, pre,
                               {"HEAD_DIM": D, "BLOCK_D": D, "EVEN_D": True, "BLOCK_M": 64}, kind="stream"))
    return out
