"""Triton kernels for the distillation loss (no autograd here; ops/distill.py wraps them).

One program per row of the [N, V] student logits s and teacher logits t (any of fp16/bf16/fp32, math in fp32):

    pass 1  online (max, sum) over the vocabulary, block by block, of s/T, t/T and s (the hard-label CE at
            T = 1, skipped when T == 1), and the cross terms sum_j p_t,j (t_j - s_j)/T (forward KL) or
            sum_j p_s,j (s_j - t_j)/T (reverse KL), rescaled online like the sums: the row's loss is known
            after one read of the row.
    pass 1b JSD(beta) only: sum_j q log(q/m) and p log(p/m), m = beta p + (1-beta) q (needs both lse).
    pass 2  the gradient d loss / d s of the row, written in the logits' dtype (into the student-logits
            buffer itself when asked): the backward only scales it by the incoming gradient.

Row weights (per row: is the KL term on, is the CE term on) come from the labels (ignore_index) and an
optional KL row mask; the counts that "mean" divides by are read from a device tensor, so no host sync.
With q = softmax(s/T), p = softmax(t/T), c = softmax(s), per row:

    forward KL : loss = w_kd T^2 KL(p||q),   d/ds = w_kd T (q - p)
    reverse KL : loss = w_kd T^2 KL(q||p),   d/ds = w_kd T q (log q - log p - KL(q||p))
    JSD(beta)  : loss = w_kd T^2 [beta KL(p||m) + (1-beta) KL(q||m)],
                 d/ds = w_kd T (1-beta) q (log q - log m - KL(q||m))
    hard CE    : loss += w_ce (lse(s) - s_label),  d/ds += w_ce (c - onehot(label))

Non-finite logits follow the reference: NaN or +inf anywhere in a counted row gives a NaN row loss; a -inf
teacher entry is a masked vocabulary entry (probability 0, contributes 0), a -inf student entry where the
teacher has mass gives +inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _config

__all__ = ["distill_forward", "scale_grad_", "why_not", "MODES"]

MODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NEG_INF = float("-inf")


@triton.jit
def _online(m, z, x):
    """One block of an online log-sum-exp: returns the new max, the rescaled sum, exp(x - max) and the
    factor the old sums were scaled by. A max of -inf (a row masked so far) is shifted to 0, so that
    exp(-inf - -inf) never makes a NaN; a max of +inf (a +inf logit) does make NaN, as it must."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(x - m_safe)
    alpha = tl.exp(m - m_safe)
    return m_new, z * alpha + tl.sum(e, 0), e, alpha


@triton.jit
def _lse(m, z):
    return tl.where(m == float("-inf"), 0.0, m) + tl.log(z)


@triton.jit
def _distill_row_kernel(
    S, T_, LAB, KDM, DS, LOSS, COUNTS,
    V, stride_s, stride_t, stride_ds,
    inv_temp, temp, w_kd, w_ce, beta, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_KD_MASK: tl.constexpr, MEAN: tl.constexpr, MODE: tl.constexpr,
    SAME_T: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T_ + row * stride_t
    ds_row = DS + row * stride_ds
    cols = tl.arange(0, BLOCK_V)

    # Which terms this row carries. Rows with neither are never read (padding may hold garbage).
    if HAS_LABELS:
        label = tl.load(LAB + row).to(tl.int64)
        ce_on = label != ignore_index
    else:
        label = tl.zeros((), tl.int64)
        ce_on = False
    if HAS_KD_MASK:
        kd_on = tl.load(KDM + row) != 0
    elif HAS_LABELS:
        kd_on = ce_on
    else:
        kd_on = True
    any_on = kd_on | ce_on

    if MEAN:
        kd_scale = tl.load(COUNTS + 0)
        ce_scale = tl.load(COUNTS + 1)
        kd_scale = tl.where(kd_scale > 0, 1.0 / kd_scale, 0.0)
        ce_scale = tl.where(ce_scale > 0, 1.0 / ce_scale, 0.0)
    else:
        kd_scale = 1.0
        ce_scale = 1.0

    if any_on:
        zero = tl.zeros((), tl.float32)
        m_s = zero + float("-inf")
        m_t = zero + float("-inf")
        m_c = zero + float("-inf")
        z_s = zero
        z_t = zero
        z_c = zero
        cross = zero  # forward KL: sum e^(tT - m_t) (tT - sT); reverse KL: sum e^(sT - m_s) (sT - tT)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + cols
            mask = idx < V
            s = tl.load(s_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            sT = s * inv_temp
            tT = t * inv_temp
            m_s, z_s, e_s, a_s = _online(m_s, z_s, sT)
            m_t, z_t, e_t, a_t = _online(m_t, z_t, tT)
            if MODE == 0:
                # tT == -inf: a masked vocabulary entry, probability 0 (0 * log 0 = 0, not 0 * inf = NaN).
                term = tl.where(tT == float("-inf"), 0.0, e_t * (tT - sT))
                cross = cross * a_t + tl.sum(term, 0)
            elif MODE == 1:
                term = tl.where(sT == float("-inf"), 0.0, e_s * (sT - tT))
                cross = cross * a_s + tl.sum(term, 0)
            if not SAME_T:
                m_c, z_c, e_c, a_c = _online(m_c, z_c, s)
        lse_s = _lse(m_s, z_s)
        lse_t = _lse(m_t, z_t)
        if SAME_T:
            lse_c = lse_s
        else:
            lse_c = _lse(m_c, z_c)

        kq = zero  # JSD: KL(q || m), the part the gradient needs
        if MODE == 0:
            div = cross / z_t - lse_t + lse_s
        elif MODE == 1:
            div = cross / z_s - lse_s + lse_t
        else:
            kp = zero
            log_b = tl.log(beta)
            log_1b = tl.log(1.0 - beta)
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + cols
                mask = idx < V
                s = tl.load(s_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
                t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
                log_q = s * inv_temp - lse_s
                log_p = t * inv_temp - lse_t
                a = log_b + log_p
                b = log_1b + log_q
                hi = tl.maximum(a, b)
                hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
                log_m = hi_safe + tl.log(tl.exp(a - hi_safe) + tl.exp(b - hi_safe))
                kq += tl.sum(tl.where(log_q == float("-inf"), 0.0, tl.exp(log_q) * (log_q - log_m)), 0)
                kp += tl.sum(tl.where(log_p == float("-inf"), 0.0, tl.exp(log_p) * (log_p - log_m)), 0)
            div = beta * kp + (1.0 - beta) * kq

        # Stored already divided by the counts for "mean": the loss is then the plain sum of the rows.
        loss = zero
        if kd_on:
            loss += (w_kd * temp * temp * kd_scale) * div
        if ce_on:
            target = tl.load(s_row + label).to(tl.float32)
            loss += (w_ce * ce_scale) * (lse_c - target)
        tl.store(LOSS + row, loss)

        if WRITE_GRAD:
            g_kd = tl.where(kd_on, w_kd * temp * kd_scale, 0.0)
            g_ce = tl.where(ce_on, w_ce * ce_scale, 0.0)
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + cols
                mask = idx < V
                s = tl.load(s_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
                t = tl.load(t_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
                log_q = s * inv_temp - lse_s
                q = tl.exp(log_q)
                if MODE == 0:
                    d = g_kd * (q - tl.exp(t * inv_temp - lse_t))
                elif MODE == 1:
                    log_p = t * inv_temp - lse_t
                    d = tl.where(q == 0.0, 0.0, g_kd * q * (log_q - log_p - div))
                else:
                    log_p = t * inv_temp - lse_t
                    a = log_b + log_p
                    b = log_1b + log_q
                    hi = tl.maximum(a, b)
                    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
                    log_m = hi_safe + tl.log(tl.exp(a - hi_safe) + tl.exp(b - hi_safe))
                    d = tl.where(q == 0.0, 0.0, g_kd * (1.0 - beta) * q * (log_q - log_m - kq))
                if SAME_T:
                    c = q
                else:
                    c = tl.exp(s - lse_c)
                d += g_ce * (c - tl.where(idx == label, 1.0, 0.0))
                tl.store(ds_row + idx, d.to(DS.dtype.element_ty), mask=mask)
    else:
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + cols
                tl.store(ds_row + idx, tl.zeros((BLOCK_V,), DS.dtype.element_ty), mask=idx < V)


@triton.jit
def _scale_kernel(DS, DL, V, stride_ds, PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr):
    """ds[row] *= dloss (a scalar, or dloss[row] for reduction="none"); a factor of exactly 1 (the usual
    loss.backward()) is read by every program and costs no traffic over ds."""
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        g = tl.load(DL + row).to(tl.float32)
    else:
        g = tl.load(DL).to(tl.float32)
    if g != 1.0:
        idx = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = idx < V
        p = DS + row * stride_ds + idx
        x = tl.load(p, mask=mask).to(tl.float32)
        tl.store(p, (x * g).to(DS.dtype.element_ty), mask=mask)


def why_not(s: torch.Tensor, t: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot serve these logits (memory safety and dtypes only), or None."""
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        if x.dtype not in _DTYPES:
            return f"{name} has dtype {x.dtype}; the Triton kernel takes fp16, bf16 and fp32"
        if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
            return f"{name} must be 2-D with a unit stride over the vocabulary"
    return None


def _block_v(V: int, dtype: torch.dtype) -> int:
    if _config.SETTINGS.triton_interpret:
        return _config.interpret_blocks("distill", min(triton.next_power_of_2(V), 256))
    # 4096 columns x 8 warps: 16 elements of each operand per thread, ~100 registers (the compile check: 8192
    # took 157-169 in bf16, one program per SM), so two programs per SM keep 32 KB or more of loads in flight
    # (bandwidth x latency / SMs is ~25 KB) and ~260 rows resident for the gradient pass's re-read from L2.
    cap = 4096
    return min(triton.next_power_of_2(V), cap)


def distill_forward(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, kd_mask: torch.Tensor | None,
    counts: torch.Tensor, temperature: float, w_kd: float, w_ce: float, ignore_index: int,
    mean: bool, mode: str, beta: float, grad_out: torch.Tensor | None,
) -> torch.Tensor:
    """Launch the row kernel. Returns the per-row losses [N] fp32 (0 for rows with neither term; for "mean"
    each term already divided by its count in ``counts`` = (n_kd, n_ce), fp32 on the device, so the loss is
    their sum). When ``grad_out`` (an [N, V] tensor; it may be ``s`` itself) is given, d(loss)/ds is written
    into it."""
    N, V = s.shape
    loss_rows = torch.empty(N, device=s.device, dtype=torch.float32)
    if N == 0:
        return loss_rows
    write = grad_out is not None
    ds = grad_out if write else s
    block = _block_v(V, s.dtype)
    lab = labels if labels is not None else loss_rows
    kdm = kd_mask.view(torch.uint8) if kd_mask is not None else loss_rows
    temperature = float(temperature)
    _distill_row_kernel[(N,)](
        s, t, lab, kdm, ds, loss_rows, counts,
        V, s.stride(0), t.stride(0), ds.stride(0),
        1.0 / temperature, temperature, float(w_kd), float(w_ce), float(beta), int(ignore_index),
        HAS_LABELS=labels is not None, HAS_KD_MASK=kd_mask is not None, MEAN=bool(mean),
        MODE=MODES[mode], SAME_T=temperature == 1.0, WRITE_GRAD=write, BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return loss_rows


def scale_grad_(ds: torch.Tensor, dloss: torch.Tensor) -> torch.Tensor:
    """ds *= dloss in place (dloss: a scalar, or one value per row); returns ds."""
    N, V = ds.shape
    if N == 0 or V == 0:
        return ds
    per_row = dloss.dim() == 1
    block = min(triton.next_power_of_2(V), 4096)
    if _config.SETTINGS.triton_interpret:
        block = min(triton.next_power_of_2(V), 256)
    _scale_kernel[(N, triton.cdiv(V, block))](ds, dloss.contiguous(), V, ds.stride(0), PER_ROW=per_row,
                                              BLOCK_V=block, num_warps=4)
    return ds


def compile_variants(quick: bool = False) -> list:
    """Every variant the launchers can launch at the benchmark shape (8192 x 32000), for the sm_90a compile
    check (peft_kernels/triton/_compile_check.py): memory-bound "stream" kernels."""
    from ._compile_check import jit_variant

    V = 32000  # N = 8192 rows: the grid only
    out = []
    dtypes = {"bf16": torch.bfloat16} if quick else {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                      "fp32": torch.float32}
    flag_sets = [(True, False, False)] if quick else [(True, False, False), (True, True, False), (False, False, False),
                                                       (True, False, True)]
    for dt, dtype in dtypes.items():
        block = _block_v(V, dtype)
        for mode_name, mode in MODES.items():
            if quick and mode != 0:
                continue
            for has_labels, has_kd_mask, same_t in flag_sets:
                for write in (True, False) if not quick else (True,):
                    args = dict(S=f"*{dt}", T_=f"*{dt}", LAB="*i64" if has_labels else "*fp32",
                                KDM="*u8" if has_kd_mask else "*fp32", DS=f"*{dt}", LOSS="*fp32", COUNTS="*fp32",
                                V=V, stride_s=V, stride_t=V, stride_ds=V, inv_temp=0.5, temp=2.0, w_kd=0.5,
                                w_ce=0.5, beta=0.5, ignore_index=-100)
                    cx = dict(HAS_LABELS=has_labels, HAS_KD_MASK=has_kd_mask, MEAN=True, MODE=mode, SAME_T=same_t,
                              WRITE_GRAD=write, BLOCK_V=block)
                    flags = "".join(f for f, on in (("L", has_labels), ("K", has_kd_mask), ("T1", same_t),
                                                    ("G", write)) if on) or "plain"
                    out.append(jit_variant(f"distill.row.{mode_name}.{flags}.{dt}.b{block}", _distill_row_kernel,
                                           args, cx, num_warps=8 if block >= 2048 else 4, num_stages=3))
        for per_row in (False, True):
            out.append(jit_variant(f"distill.scale.{'row' if per_row else 'scalar'}.{dt}", _scale_kernel,
                                   dict(DS=f"*{dt}", DL="*fp32", V=V, stride_ds=V),
                                   dict(PER_ROW=per_row, BLOCK_V=4096), num_warps=4, num_stages=3))
    return out
