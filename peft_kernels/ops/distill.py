"""Knowledge-distillation loss (DistilBERT / Hinton): soft-target KL at temperature T plus hard-label CE.

    loss = alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 - alpha) · CE(s, labels)

over rows [N, V] (the vocab or class dim last). Both terms are summed over the rows whose label is not
ignore_index and, for reduction="mean", divided by their count; rows with an ignored label contribute
nothing and get a zero gradient. Without labels only the KL term remains (weight 1, alpha unused), over
every row. All-ignored batches give loss 0 and a zero gradient, never NaN.

Half-precision logits are upcast to fp32 row-chunk by row-chunk inside the op (no full fp32 copy of the
[N, V] logits); the loss is fp32 (fp64 for fp64 students). Saved for backward: the logits (alive anyway)
and three fp32 per-row log-sum-exps (of s/T, t/T and s), from which the backward rebuilds the softmaxes:
    d/ds = [alpha·T·(softmax(s/T) - softmax(t/T)) + (1 - alpha)·(softmax(s) - onehot(label))] / n_valid.
The teacher is treated as detached: teacher_logits gets no gradient (None) even if it requires grad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels import _backends
from peft_kernels.ops import _validate as v

OP = "distillation_loss"

LABEL_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum")

# Rows per fp32 temporary are chosen so that one temporary holds about this many elements (16 MiB).
_CHUNK_ELEMS = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Reference math (the oracle): F.kl_div + F.cross_entropy, differentiable by autograd.
# --------------------------------------------------------------------------------------------------
def distillation_loss_reference(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5,
                                ignore_index=-100, reduction="mean", upcast=False):
    """Autograd-differentiable reference; ``upcast=True`` computes in float64 (result in the op's dtype)."""
    out_dtype = _compute_dtype(student_logits.dtype)
    dtype = torch.float64 if upcast else out_dtype
    V, T = student_logits.shape[-1], temperature
    s = student_logits.reshape(-1, V).to(dtype)
    t = teacher_logits.detach().reshape(-1, V).to(dtype)
    if labels is None:
        loss = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum")
        loss = loss * T * T
        n = s.shape[0]
    else:
        labels = labels.reshape(-1).long()
        valid = labels != ignore_index
        kl = F.kl_div(F.log_softmax(s[valid] / T, -1), F.log_softmax(t[valid] / T, -1), log_target=True,
                      reduction="sum")
        ce = F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="sum")
        loss = alpha * T * T * kl + (1.0 - alpha) * ce
        n = int(valid.sum())
    if reduction == "mean":
        loss = loss / max(n, 1)
    return loss.to(out_dtype)


def check_labels_in_range(labels: Tensor | None, num_classes: int, ignore_index: int) -> None:
    """Labels other than ignore_index must lie in [0, V): ValueError, not an IndexError or a device assert.

    Data-dependent (one host sync), so it runs inside the custom op's body, which also runs eagerly inside
    graphs compiled with torch.compile(fullgraph=True).
    """
    if labels is None or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"{OP}: labels must be in [0, {num_classes}) (student_logits.shape[-1]) or equal "
            f"ignore_index={ignore_index}; got {first} ({int(bad.sum())} such labels)"
        )


def _row_chunks(N: int, V: int):
    rows = max(1, _CHUNK_ELEMS // max(V, 1))
    for start in range(0, N, rows):
        yield slice(start, min(N, start + rows))


# --------------------------------------------------------------------------------------------------
# Backends: forward (s [N, V], t [N, V], labels [N] int64 or None, ...) -> (loss, stats [2 or 3, N]);
# backward -> ds [N, V] in the student's dtype.
# --------------------------------------------------------------------------------------------------
def _reference_forward(s, t, labels, temperature, alpha, ignore_index, reduction_sum):
    N, V = s.shape
    T, cdt = temperature, _compute_dtype(s.dtype)
    has_labels = labels is not None
    stats = s.new_empty(3 if has_labels else 2, N, dtype=cdt)
    kl_sum = s.new_zeros((), dtype=cdt)
    ce_sum = s.new_zeros((), dtype=cdt)
    for rows in _row_chunks(N, V):
        sc, tc = s[rows].to(cdt), t[rows].to(cdt)
        sT, tT = sc / T, tc / T
        lse_sT, lse_tT = torch.logsumexp(sT, -1), torch.logsumexp(tT, -1)
        log_ps, log_pt = sT - lse_sT.unsqueeze(1), tT - lse_tT.unsqueeze(1)
        pt = log_pt.exp()
        # where(): a vocab entry the teacher masks to -inf (pt = 0) adds 0, not 0·(-inf) = NaN.
        kl_row = torch.where(pt > 0, pt * (log_pt - log_ps), 0.0).sum(-1)
        stats[0, rows], stats[1, rows] = lse_sT, lse_tT
        if has_labels:
            lab = labels[rows]
            valid = lab != ignore_index
            lse = torch.logsumexp(sc, -1)
            target = sc.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1)
            stats[2, rows] = lse
            # where(), not a product with the mask: ignored rows may hold garbage (inf/NaN) logits.
            kl_sum += torch.where(valid, kl_row, 0.0).sum()
            ce_sum += torch.where(valid, lse - target, 0.0).sum()
        else:
            kl_sum += kl_row.sum()
    if has_labels:
        loss = (alpha * T * T) * kl_sum + (1.0 - alpha) * ce_sum
        n = (labels != ignore_index).sum()
    else:
        loss = (T * T) * kl_sum
        n = torch.tensor(N, device=s.device)
    if not reduction_sum:
        loss = loss / n.clamp_min(1).to(cdt)  # n_valid = 0: the sums are 0, so is the loss
    return loss, stats


def _reference_backward(dloss, s, t, labels, stats, temperature, alpha, ignore_index, reduction_sum):
    N, V = s.shape
    T, cdt = temperature, _compute_dtype(s.dtype)
    has_labels = labels is not None
    if has_labels:
        w_kl, w_ce = alpha * T, 1.0 - alpha
        n = (labels != ignore_index).sum()
    else:
        w_kl, w_ce = T, 0.0
        n = torch.tensor(N, device=s.device)
    scale = dloss.to(cdt) if reduction_sum else dloss.to(cdt) / n.clamp_min(1).to(cdt)
    ds = torch.empty_like(s)
    for rows in _row_chunks(N, V):
        sc, tc = s[rows].to(cdt), t[rows].to(cdt)
        g = torch.exp(sc / T - stats[0, rows, None]).sub_(torch.exp(tc / T - stats[1, rows, None])).mul_(w_kl)
        if has_labels:
            lab = labels[rows]
            valid = lab != ignore_index
            g.add_(torch.exp(sc - stats[2, rows, None]), alpha=w_ce)
            g.scatter_add_(1, torch.where(valid, lab, 0).unsqueeze(1), (-w_ce * valid.to(cdt)).unsqueeze(1))
            g = torch.where(valid.unsqueeze(1), g, 0.0)
        ds[rows] = (g * scale).to(s.dtype)
    return ds


_FORWARD = {"reference": _reference_forward}
_BACKWARD = {"reference": _reference_backward}

# Only the reference backend for now; native and Triton kernels register here when they land.
_backends.register_op(OP, {})


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake kernels and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("peft_kernels::distillation_loss", mutates_args=())
def _distillation_loss_op(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, temperature: float, alpha: float,
    ignore_index: int, reduction_sum: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    check_labels_in_range(labels, student_logits.shape[1], ignore_index)
    return _FORWARD[backend](student_logits, teacher_logits, labels, temperature, alpha, ignore_index,
                             reduction_sum)


@_distillation_loss_op.register_fake
def _(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, reduction_sum, backend):
    cdt = _compute_dtype(student_logits.dtype)
    k = 2 if labels is None else 3
    N = student_logits.shape[0]
    return student_logits.new_empty((), dtype=cdt), student_logits.new_empty(k, N, dtype=cdt)


@torch.library.custom_op("peft_kernels::distillation_loss_backward", mutates_args=())
def _distillation_loss_backward_op(
    dloss: Tensor, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, stats: Tensor,
    temperature: float, alpha: float, ignore_index: int, reduction_sum: bool, backend: str,
) -> Tensor:
    return _BACKWARD[backend](dloss, student_logits, teacher_logits, labels, stats, temperature, alpha,
                              ignore_index, reduction_sum)


@_distillation_loss_backward_op.register_fake
def _(dloss, student_logits, teacher_logits, labels, stats, temperature, alpha, ignore_index, reduction_sum,
      backend):
    return torch.empty_like(student_logits)


def _setup_context(ctx, inputs, output):
    s, t, labels, temperature, alpha, ignore_index, reduction_sum, backend = inputs
    ctx.save_for_backward(s, t, labels, output[1])
    ctx.temperature, ctx.alpha, ctx.ignore_index = temperature, alpha, ignore_index
    ctx.reduction_sum, ctx.backend = reduction_sum, backend


def _backward(ctx, dloss, dstats):
    s, t, labels, stats = ctx.saved_tensors
    # Only the student gets a gradient: the teacher is a fixed target (detached by definition).
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    ds = _distillation_loss_backward_op(
        dloss.contiguous(), s, t, labels, stats, ctx.temperature, ctx.alpha, ctx.ignore_index,
        ctx.reduction_sum, ctx.backend,
    )
    return ds, None, None, None, None, None, None, None


_distillation_loss_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def validate(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, reduction):
    v.check_tensor(OP, "student_logits", student_logits, min_ndim=1)
    v.check_tensor(OP, "teacher_logits", teacher_logits, min_ndim=1)
    if labels is not None:
        v.check_tensor(OP, "labels", labels, dtypes=LABEL_DTYPES)
    v.check_same_device(OP, student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"{OP}: teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has "
            f"{tuple(student_logits.shape)}; they must match"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError(f"{OP}: student_logits has an empty class dim (shape {tuple(student_logits.shape)})")
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"{OP}: labels has shape {tuple(labels.shape)}, expected {tuple(student_logits.shape[:-1])} "
            "(student_logits.shape[:-1])"
        )
    temperature = v.check_positive(OP, "temperature", temperature)
    alpha = v.check_finite(OP, "alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{OP}: alpha must be in [0, 1], got {alpha}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(reduction, str):
        raise TypeError(f"{OP}: reduction must be a str, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return temperature, alpha


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None,
                      temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100,
                      reduction: str = "mean") -> Tensor:
    """Fused distillation loss ``alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 - alpha)·CE(s, labels)``.

    Args:
        student_logits: [..., V] (fp16/bf16/fp32/fp64); the only input that gets a gradient.
        teacher_logits: [..., V], same shape (any float dtype). Treated as detached: its gradient is None
            even when it requires grad.
        labels: [...] int64/int32 class ids (ignore_index marks rows to skip), or None for the KL term
            alone (weight 1, over every row).
        temperature: T > 0. alpha: weight of the KL term, in [0, 1].
        reduction: "mean" (divide by the number of non-ignored rows) or "sum".

    Returns:
        A scalar: fp32 (fp64 for fp64 student logits). Matches
        ``alpha · F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True, reduction="sum")
        / n_valid · T² + (1 - alpha) · F.cross_entropy(s, labels, ignore_index=ignore_index)``
        with the KL taken over the non-ignored rows; 0 when every row is ignored.
    """
    temperature, alpha = validate(student_logits, teacher_logits, labels, temperature, alpha, ignore_index,
                                  reduction)
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).contiguous()
    t = teacher_logits.detach().reshape(-1, V).contiguous()
    lab = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    backend = _backends.select(OP, s.device.type, s, t, lab)
    loss, _ = _distillation_loss_op(s, t, lab, temperature, alpha, ignore_index, reduction == "sum", backend)
    return loss
