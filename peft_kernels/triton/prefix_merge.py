"""Triton kernels for the prefix part of prefix attention, merged into a causal attention computed elsewhere.

The ``sdpa`` backend of ``prefix_attention`` runs attention over the real keys through PyTorch's fused SDPA ops
(flash / cuDNN on CUDA, the CPU flash op on CPU), which return the output ``O_c`` and the log-sum-exp ``lse_c``.
These kernels add the P prefix keys:

* forward, one pass per query tile: the prefix softmax (``s = q·pkᵀ·scale``, P <= a few tiles) and the exact
  merge of the two partial softmaxes, ``lse = logaddexp(lse_c, lse_p)``, ``O = e^(lse_c−lse)·O_c +
  e^(lse_p−lse)·O_p``, written over ``O_c`` in place (no new buffer, the caller's layout kept);
* backward, given the *merged* O and lse (with which SDPA's own backward is exact for the real keys): the
  prefix part's dQ added in place into SDPA's dQ, and per-split fp32 partials of dPK/dPV that the host sums over
  the splits (and the batch, for a shared prefix). Each program owns one (split of the queries, KV head, batch)
  and loops over the query heads of its GQA group, so a dQ row is written by one program only: no atomics,
  deterministic.

The prefix tile is sized to P (a power of two >= 16 for tl.dot, at most 64 per step), not to a key block of the
main attention. Rows whose ``lse_c`` is -inf (no visible real key: padding, or causal rows above the diagonal)
get the prefix alone; ``O_c`` is not read there (SDPA kernels leave 0, NaN or garbage in such rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_kernels import _config

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_MAX_BLOCK_P = 64
_SPLIT_ROWS = 512  # query rows per backward program: B*Hkv*ceil(Lq/512) programs, partials stay small
# (BLOCK_M, num_warps) of the GPU launches; the tiles are small (P x D), so no autotuning.
_FWD_BLOCK_M = 64
_BWD_BLOCK_M = 64
# sm_90a, Triton 3.8, D = 128, P = 32, 8 warps (4 spill more; BLOCK_M = 32 loses wgmma): the fp32 dPK/dPV
# accumulators and the dQ read-modify-write tile are live together. Software pipelining (prefetching the next row
# tile's q/dO/O) costs the registers: spills 560 B at num_stages = 3 as first written, 368 B with dQ updated first
# (and dO/O before q), 256 B at 2; at 1: 202 registers, no spill (GQA 4: 32 B). The next tile's loads are then not
# prefetched; which is faster is for a GPU to measure (NOTES.md, prefix attention).
_BWD_WARPS = 8
_BWD_STAGES = 1


def _block_p(P: int) -> int:
    return max(16, min(_MAX_BLOCK_P, triton.next_power_of_2(P)))


@triton.jit
def _tile(base, rows, stride_row, offs_d):
    return base + rows.to(tl.int64)[:, None] * stride_row + offs_d[None, :]


@triton.jit
def _prefix_merge_fwd_kernel(
    Q, PK, PV, OC, LSEC, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_ob, stride_oh, stride_om,
    stride_cb, stride_ch, stride_cm,
    stride_lb, stride_lh,
    Lq, P, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    row_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qm, offs_d),
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    pk_base = PK + off_b * stride_pkb + off_hk * stride_pkh
    pv_base = PV + off_b * stride_pvb + off_hk * stride_pvh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        cols = start + offs_p
        col_ok = cols < P
        tile_mask = col_ok[:, None] & d_ok[None, :]
        pk = tl.load(_tile(pk_base, cols, stride_pkn, offs_d), mask=tile_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(pk), input_precision=PREC) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: prefix key 0 is always in the first tile
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = tl.load(_tile(pv_base, cols, stride_pvn, offs_d), mask=tile_mask, other=0.0).to(q.dtype)
        acc = tl.dot(p.to(q.dtype), pv, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    lse_p = m_i + tl.log2(l_i)
    lse_c = tl.load(LSEC + off_b * stride_cb + off_h * stride_ch + offs_m.to(tl.int64) * stride_cm, mask=row_ok,
                    other=float("-inf")).to(tl.float32) * LOG2E
    mx = tl.maximum(lse_c, lse_p)
    lse = mx + tl.log2(tl.exp2(lse_c - mx) + tl.exp2(lse_p - mx))
    has_c = lse_c > float("-inf")
    o_ptrs = _tile(OC + off_b * stride_ob + off_h * stride_oh, offs_m, stride_om, offs_d)
    o_c = tl.load(o_ptrs, mask=(row_ok & has_c)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    w_c = tl.where(has_c, tl.exp2(lse_c - lse), 0.0)
    out = o_c * w_c[:, None] + acc * tl.exp2(m_i - lse)[:, None]
    tl.store(o_ptrs, out.to(OC.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, lse * LN2, mask=row_ok)


@triton.jit
def _prefix_bwd_kernel(
    Q, PK, PV, O, DO, LSE, DQ, DPK, DPV,
    stride_qb, stride_qh, stride_qm,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dqm,
    stride_ps, stride_pb, stride_ph,
    Lq, P, scale, qk_scale, SPLIT_ROWS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    off_hk = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    lo = pid_s * SPLIT_ROWS
    hi = tl.minimum(lo + SPLIT_ROWS, Lq)
    pk_base = PK + off_b * stride_pkb + off_hk * stride_pkh
    pv_base = PV + off_b * stride_pvb + off_hk * stride_pvh
    part = pid_s.to(tl.int64) * stride_ps + off_b * stride_pb + off_hk * stride_ph
    for start_p in range(0, P, BLOCK_P):
        cols = start_p + offs_p
        col_ok = cols < P
        tile_mask = col_ok[:, None] & d_ok[None, :]
        # Cast once to the activation dtype: the fp32 tiles would hold twice the registers across the loops.
        pk = tl.load(_tile(pk_base, cols, stride_pkn, offs_d), mask=tile_mask, other=0.0).to(Q.dtype.element_ty)
        pv = tl.load(_tile(pv_base, cols, stride_pvn, offs_d), mask=tile_mask, other=0.0).to(Q.dtype.element_ty)
        dpk = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        dpv = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for j in range(GROUP):
            off_h = off_hk * GROUP + j
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + offs_m0
                row_ok = offs_m < hi
                rmask = row_ok[:, None] & d_ok[None, :]
                do = tl.load(_tile(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dom, offs_d),
                             mask=rmask, other=0.0).to(Q.dtype.element_ty)
                o = tl.load(_tile(O + off_b * stride_ob + off_h * stride_oh, offs_m, stride_om, offs_d),
                            mask=rmask, other=0.0)
                delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
                q = tl.load(_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qm, offs_d),
                            mask=rmask, other=0.0)
                lse2 = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, mask=row_ok, other=0.0) * LOG2E
                s = tl.dot(q, tl.trans(pk), input_precision=PREC) * qk_scale
                p = tl.exp2(s - lse2[:, None])
                p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
                dpv = tl.dot(tl.trans(p.to(q.dtype)), do, dpv, input_precision=PREC)
                dp = tl.dot(do, tl.trans(pv), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dq_ptrs = _tile(DQ + off_b * stride_dqb + off_h * stride_dqh, offs_m, stride_dqm, offs_d)
                dq = tl.load(dq_ptrs, mask=rmask, other=0.0).to(tl.float32)
                dq = tl.dot((ds * scale).to(q.dtype), pk, dq, input_precision=PREC)
                tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rmask)
                dpk = tl.dot(tl.trans(ds.to(q.dtype)), q, dpk, input_precision=PREC)
        p_ptrs = _tile(part, cols, HEAD_DIM, offs_d)
        tl.store(DPK + p_ptrs, dpk * scale, mask=tile_mask)
        tl.store(DPV + p_ptrs, dpv, mask=tile_mask)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
def _prefix_strides(t: torch.Tensor):
    # A shared prefix [Hkv, P, D] is read with batch stride 0: every batch reads the same rows, no expand.
    return (0, t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), t.stride(1), t.stride(2))


def _meta(q, k_heads, P):
    D = q.shape[-1]
    return {
        "GROUP": q.shape[1] // k_heads,
        "HEAD_DIM": D,
        "BLOCK_D": max(16, triton.next_power_of_2(D)),
        "PREC": "ieee" if q.dtype == torch.float32 else None,
        "BLOCK_P": _block_p(P),
    }


def _blocks(kernel: str, default: int, interpreted: int = 16) -> int:
    # Small tiles under the interpreter (tests reach the tails and the splits at tiny shapes).
    return _config.interpret_blocks(kernel, interpreted) if _config.SETTINGS.triton_interpret else default


def _unit_last(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def prefix_merge_forward(q, prefix_k, prefix_v, out_c, lse_c, scale: float):
    """Merge the prefix part into ``out_c`` in place; returns the merged lse (fp32 [B, Hq, Lq], natural log).

    q, out_c [B, Hq, Lq, D] (any strides with a unit last stride); prefix_k/v [Hkv, P, D] or [B, Hkv, P, D] in
    any float dtype (cast to q's in registers); lse_c [B, Hq, Lq] (any strides; -inf where no real key is seen).
    """
    B, Hq, Lq, D = q.shape
    Hkv, P = prefix_k.shape[-3], prefix_k.shape[-2]
    prefix_k, prefix_v = _unit_last(prefix_k), _unit_last(prefix_v)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return lse
    block_m = _blocks("prefix_merge_fwd", _FWD_BLOCK_M)
    _prefix_merge_fwd_kernel[(triton.cdiv(Lq, block_m), Hq, B)](
        q, prefix_k, prefix_v, out_c, lse_c, lse,
        q.stride(0), q.stride(1), q.stride(2),
        *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        out_c.stride(0), out_c.stride(1), out_c.stride(2),
        lse_c.stride(0), lse_c.stride(1), lse_c.stride(2),
        lse.stride(0), lse.stride(1),
        Lq, P, float(scale) * 1.4426950408889634,
        BLOCK_M=block_m, num_warps=4, **_meta(q, Hkv, P),
    )  # fmt: skip
    return lse


def prefix_merge_backward(do, q, prefix_k, prefix_v, out, lse, dq, scale: float):
    """Add the prefix part's dQ into ``dq`` in place; returns (dprefix_k, dprefix_v) in fp32, shaped like the
    prefix (summed over the batch for a shared [Hkv, P, D] prefix). ``out``/``lse`` are the merged ones."""
    B, Hq, Lq, D = q.shape
    Hkv, P = prefix_k.shape[-3], prefix_k.shape[-2]
    prefix_k, prefix_v = _unit_last(prefix_k), _unit_last(prefix_v)
    do, out = _unit_last(do), _unit_last(out)
    lse = lse.to(torch.float32).contiguous()
    split = _blocks("prefix_merge_split", _SPLIT_ROWS, interpreted=32)
    n_split = max(1, triton.cdiv(Lq, split))
    dpk = torch.zeros((n_split, B, Hkv, P, D), dtype=torch.float32, device=q.device)
    dpv = torch.zeros_like(dpk)
    if Lq > 0 and B > 0:
        block_m = _blocks("prefix_merge_bwd", _BWD_BLOCK_M)
        _prefix_bwd_kernel[(n_split, Hkv, B)](
            q, prefix_k, prefix_v, out, do, lse, dq, dpk, dpv,
            q.stride(0), q.stride(1), q.stride(2),
            *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
            out.stride(0), out.stride(1), out.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1),
            dq.stride(0), dq.stride(1), dq.stride(2),
            dpk.stride(0), dpk.stride(1), dpk.stride(2),
            Lq, P, float(scale), float(scale) * 1.4426950408889634, split,
            BLOCK_M=block_m, num_warps=_BWD_WARPS, num_stages=_BWD_STAGES, **_meta(q, Hkv, P),
        )  # fmt: skip
    dims = (0, 1) if prefix_k.dim() == 3 else (0,)
    return dpk.sum(dims), dpv.sum(dims)


# --------------------------------------------------------------------------------------------------
# compile-check protocol (peft_kernels/triton/_compile_check.py)
# --------------------------------------------------------------------------------------------------
def compile_variants(quick: bool = False) -> list:
    """Both kernels at the benchmark shape (B=4, L=2048, D=128, P=32; q/O/dO/dQ in the HL layout, a shared fp32
    prefix, lse_c as the aten flash op returns it), MHA and GQA (group 4), bf16 and fp16, the launch config.
    quick (CI): bf16 MHA."""
    from ._compile_check import jit_variant

    B, L, D, P, Hq = 4, 2048, 128, 32, 32
    hl = {"b": L * Hq * D, "h": D, "m": Hq * D}
    out = []
    for dt in ("bf16",) if quick else ("bf16", "fp16"):
        for group in (1,) if quick else (1, 4):
            Hkv = Hq // group
            prefix = {"PK": "*fp32", "PV": "*fp32", "stride_pkb": 0, "stride_pkh": P * D, "stride_pkn": D,
                      "stride_pvb": 0, "stride_pvh": P * D, "stride_pvn": D}
            cx = {"GROUP": group, "HEAD_DIM": D, "BLOCK_D": D, "PREC": None, "BLOCK_P": _block_p(P)}
            fwd = {"Q": f"*{dt}", "OC": f"*{dt}", "LSEC": "*fp32", "LSE": "*fp32", **prefix,
                   **{f"stride_q{k}": v for k, v in hl.items()}, **{f"stride_o{k}": v for k, v in hl.items()},
                   "stride_cb": Hq * L, "stride_ch": L, "stride_cm": 1, "stride_lb": Hq * L, "stride_lh": L,
                   "Lq": L, "P": P, "qk_scale": 0.1}
            out.append(jit_variant(f"prefix_merge.fwd.g{group}.{dt}.{_FWD_BLOCK_M}x{_block_p(P)}",
                                   _prefix_merge_fwd_kernel, fwd, {**cx, "BLOCK_M": _FWD_BLOCK_M}, num_warps=4,
                                   kind="attention", main=True))
            bwd = {"Q": f"*{dt}", "O": f"*{dt}", "DO": f"*{dt}", "LSE": "*fp32", "DQ": f"*{dt}", "DPK": "*fp32",
                   "DPV": "*fp32", **prefix,
                   **{f"stride_{n}{k}": v for n in ("q", "o", "do", "dq") for k, v in hl.items()},
                   "stride_lb": Hq * L, "stride_lh": L, "stride_ps": B * Hkv * P * D, "stride_pb": Hkv * P * D,
                   "stride_ph": P * D, "Lq": L, "P": P, "scale": 0.08, "qk_scale": 0.1, "SPLIT_ROWS": _SPLIT_ROWS}
            out.append(jit_variant(f"prefix_merge.bwd.g{group}.{dt}.{_BWD_BLOCK_M}x{_block_p(P)}",
                                   _prefix_bwd_kernel, bwd, {**cx, "BLOCK_M": _BWD_BLOCK_M}, num_warps=_BWD_WARPS,
                                   num_stages=_BWD_STAGES, kind="attention", main=True))
    return out
