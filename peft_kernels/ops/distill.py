"""Knowledge-distillation loss (DistilBERT / Hinton): soft targets at temperature T plus hard-label CE.

    loss = alpha · T² · D(teacher, student; T) + (1 - alpha) · CE(s, labels)

over rows [N, V] (the vocab or class dim last). D is KL(softmax(t/T) ‖ softmax(s/T)) (``"forward_kl"``, the
DistilBERT/Hinton loss), KL(softmax(s/T) ‖ softmax(t/T)) (``"reverse_kl"``) or the generalised
Jensen-Shannon divergence JSD(beta) = beta·KL(p‖m) + (1-beta)·KL(q‖m), m = beta·p + (1-beta)·q with p the
teacher's and q the student's softmax (``"jsd"``). The KL term is taken over the rows whose label is not
ignore_index (or over the rows of ``kd_mask`` when given: DistilBERT distils every non-padding token but
scores only the masked ones), the CE term over the labelled rows; "mean" divides each term by its own row
count, "sum" sums, "none" returns one loss per row (0 for rows with neither term). Without labels only the
divergence remains (weight 1, alpha unused), over every row (or the kd_mask rows).

The gradient is computed in the forward, in the same pass over the logits that has the softmax statistics at
hand: the op's forward returns it as an auxiliary output, and the backward only scales it by the incoming
gradient (in place on the Triton/CUDA backends, which is free when that is 1, as after ``loss.backward()``).
So the backward cannot run twice over one forward (``retain_graph=True`` twice would scale it twice).
``grad_in_logits=True`` writes the gradient into the student-logits buffer itself (no [N, V] allocation;
the logits' values are lost, so only when nothing else needs them -- e.g. the output of a linear head;
ignored under torch.compile, where a separate buffer is used).

Non-finite logits: NaN or +inf anywhere in a counted row gives a NaN loss, as F.kl_div/F.cross_entropy do;
a -inf teacher entry is a masked vocabulary entry (probability 0, contributes 0 to the KL, unlike F.kl_div
whose 0·(-inf) is NaN). Rows that carry neither term may hold anything: they are never read.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels import _backends, _config
from peft_kernels._op import OpFamily, signature, steady
from peft_kernels.ops import _validate as v

OP = "distillation_loss"

LABEL_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_INT64 = (-(2**63), 2**63 - 1)

# Rows per fp32 temporary of the reference backend: about this many elements (16 MiB).
_CHUNK_ELEMS = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(has_labels: bool, alpha: float) -> tuple[float, float]:
    return (alpha, 1.0 - alpha) if has_labels else (1.0, 0.0)


# --------------------------------------------------------------------------------------------------
# Reference math (the oracle): F.kl_div + F.cross_entropy, differentiable by autograd.
# --------------------------------------------------------------------------------------------------
def _divergence_rows(log_q: Tensor, log_p: Tensor, divergence: str, beta: float) -> Tensor:
    """Per-row D over the last dim from the student's (log_q) and teacher's (log_p) log-probabilities."""
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return (beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
            + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))


def distillation_loss_reference(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5,
                                ignore_index=-100, reduction="mean", upcast=False, *, divergence="forward_kl",
                                beta=0.5, kd_mask=None):
    """Autograd-differentiable reference; ``upcast=True`` computes in float64 (result in the op's dtype)."""
    out_dtype = _compute_dtype(student_logits.dtype)
    dtype = torch.float64 if upcast else out_dtype
    V, T = student_logits.shape[-1], temperature
    s = student_logits.reshape(-1, V).to(dtype)
    t = teacher_logits.detach().reshape(-1, V).to(dtype)
    N = s.shape[0]
    if labels is not None:
        labels = labels.reshape(-1).long()
        ce_rows = labels != ignore_index
    else:
        ce_rows = torch.zeros(N, dtype=torch.bool, device=s.device)
    if kd_mask is not None:
        kd_rows = kd_mask.reshape(-1).bool()
    else:
        kd_rows = ce_rows if labels is not None else torch.ones(N, dtype=torch.bool, device=s.device)
    w_kd, w_ce = _weights(labels is not None, alpha)
    div = _divergence_rows(F.log_softmax(s[kd_rows] / T, -1), F.log_softmax(t[kd_rows] / T, -1), divergence, beta)
    kd = torch.zeros(N, dtype=dtype, device=s.device).masked_scatter(kd_rows, div) * (w_kd * T * T)
    if labels is not None:
        ce = F.cross_entropy(s, torch.where(ce_rows, labels, ignore_index), ignore_index=ignore_index,
                             reduction="none") * w_ce
    else:
        ce = torch.zeros_like(kd)
    if reduction == "none":
        return (kd + ce).to(out_dtype).reshape(student_logits.shape[:-1])
    kd_sum, ce_sum = kd.sum(), ce.sum()
    if reduction == "mean":
        kd_sum = kd_sum / max(int(kd_rows.sum()), 1)
        ce_sum = ce_sum / max(int(ce_rows.sum()), 1)
    return (kd_sum + ce_sum).to(out_dtype)


def check_labels_in_range(labels: Tensor | None, num_classes: int, ignore_index: int, op: str = OP,
                          classes: str = "student_logits.shape[-1]") -> None:
    """Labels other than ignore_index must lie in [0, V): ValueError, not an IndexError or a device assert.

    Data-dependent (one host sync), so it runs inside the op's forward, which also runs eagerly inside
    graphs compiled with torch.compile(fullgraph=True).
    """
    if labels is None or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"{op}: labels must be in [0, {num_classes}) ({classes}) or equal "
            f"ignore_index={ignore_index}; got {first} ({int(bad.sum())} such labels)"
        )


def row_masks(N: int, labels: Tensor | None, kd_mask: Tensor | None, ignore_index: int, device):
    """(kd_rows, ce_rows) bool [N]: which rows carry the divergence and the hard-label term."""
    ce_rows = labels != ignore_index if labels is not None else torch.zeros(N, dtype=torch.bool, device=device)
    if kd_mask is not None:
        kd_rows = kd_mask
    elif labels is not None:
        kd_rows = ce_rows
    else:
        kd_rows = torch.ones(N, dtype=torch.bool, device=device)
    return kd_rows, ce_rows


def row_counts(N: int, labels: Tensor | None, kd_mask: Tensor | None, ignore_index: int, device) -> Tensor:
    """(n_kd, n_ce) fp32 on the device, the divisors of "mean" (no host sync)."""
    kd_rows, ce_rows = row_masks(N, labels, kd_mask, ignore_index, device)
    return torch.stack([kd_rows.sum(), ce_rows.sum()]).to(torch.float32)


# --------------------------------------------------------------------------------------------------
# The family. Forward -> (loss, ds): ds = d(loss)/d(student_logits) for an incoming gradient of 1, [N, V] in
# the student's dtype (or empty when no gradient is needed); the backward scales it.
# --------------------------------------------------------------------------------------------------
class DistillInputs(NamedTuple):
    student_logits: Tensor  # [N, V], unit stride over V
    teacher_logits: Tensor  # [N, V], unit stride over V
    labels: Tensor | None  # [N] int64
    kd_mask: Tensor | None  # [N] bool
    temperature: float
    alpha: float
    ignore_index: int
    reduction: str
    divergence: str
    beta: float
    need_grad: bool
    grad_in_logits: bool


def _fake(inp: DistillInputs):
    s = inp.student_logits
    cdt = _compute_dtype(s.dtype)
    loss = s.new_empty((s.shape[0],) if inp.reduction == "none" else (), dtype=cdt)
    return loss, (s.new_empty(s.shape) if inp.need_grad else s.new_empty(0))


FAMILY = OpFamily(
    OP,
    DistillInputs,
    schema="(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor? kd_mask, float temperature, "
    "float alpha, int ignore_index, str reduction, str divergence, float beta, bool need_grad, "
    "bool grad_in_logits) -> (Tensor, Tensor)",
    backward_schema="(Tensor dloss, Tensor ds)",
    differentiable=("student_logits",),
    save=lambda inp, out: (out[1],),
    fake=_fake,
    backward_fake=lambda dloss, ds, needs: (torch.empty_like(ds),),
    public_outputs=1,
    # CPU tensors: the C++ loop (one call, one autograd node) has the least host time at small sizes and is no
    # slower than the reference's ATen calls at any size measured (benchmarks/NOTES.md, "distillation_loss on CPU").
    preference={"cuda": ("triton", "cuda"), "cpu": ("cpp", "reference")},
    doc="alpha T^2 KL(t/T || s/T) + (1 - alpha) CE(s, labels), gradient computed in the forward",
)


def _row_chunks(N: int, V: int):
    rows = max(1, _CHUNK_ELEMS // max(V, 1))
    for start in range(0, N, rows):
        yield slice(start, min(N, start + rows))


def reference_rows(s, t, labels, kd_mask, counts, temperature, w_kd, w_ce, ignore_index, mean, divergence, beta,
                   grad_out):
    """The row function of the reference backend (the signature of ``triton.distill.distill_forward``): per-row
    losses [N] (for ``mean`` each term divided by its count in ``counts`` = (n_kd, n_ce)), and d(loss)/ds
    written into ``grad_out`` when given (it may be ``s`` itself). Closed-form math in fp32 (fp64 for fp64),
    row chunk by row chunk."""
    N, V = s.shape
    T, cdt = temperature, _compute_dtype(s.dtype)
    kd_rows, ce_rows = row_masks(N, labels, kd_mask, ignore_index, s.device)
    if mean:
        kd_div, ce_div = counts[0].clamp_min(1).to(cdt), counts[1].clamp_min(1).to(cdt)
    else:
        kd_div = ce_div = torch.ones((), dtype=cdt, device=s.device)
    loss_rows = s.new_zeros(N, dtype=cdt)
    # Per-row weights of the two terms (0 where a row does not carry the term).
    kd_w = torch.where(kd_rows, w_kd / kd_div, 0.0).to(cdt)
    ce_w = torch.where(ce_rows, w_ce / ce_div, 0.0).to(cdt)
    inv_t = 1.0 / T
    for rows in _row_chunks(N, V):
        kd_on, ce_on = kd_rows[rows], ce_rows[rows]
        # Rows that do not carry a term may hold garbage (inf/NaN): every result of such a row is selected away
        # with where() (never multiplied by 0), so nothing is masked on the way in.
        sc = s[rows].to(cdt)
        log_q = torch.log_softmax(sc * inv_t, -1)
        log_p = torch.log_softmax(t[rows].to(cdt) * inv_t, -1)
        q, p = log_q.exp(), log_p.exp()
        # masked_fill: 0 · log 0 = 0 for a masked (-inf) entry, while NaN and +inf still propagate.
        if divergence == "forward_kl":
            div = (log_p - log_q).mul_(p).masked_fill_(log_p == -math.inf, 0.0).sum(-1)
            g = (q - p) if grad_out is not None else None
        elif divergence == "reverse_kl":
            diff = log_q - log_p
            div = (diff * q).masked_fill_(log_q == -math.inf, 0.0).sum(-1)
            g = diff.sub_(div.unsqueeze(1)).mul_(q).masked_fill_(q == 0, 0.0) if grad_out is not None else None
        else:
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            kq = (log_q - log_m).mul_(q).masked_fill_(log_q == -math.inf, 0.0).sum(-1)
            kp = (log_p - log_m).mul_(p).masked_fill_(log_p == -math.inf, 0.0).sum(-1)
            div = beta * kp + (1 - beta) * kq
            if grad_out is not None:
                g = (log_q - log_m).sub_(kq.unsqueeze(1)).mul_(q).masked_fill_(q == 0, 0.0).mul_(1 - beta)
        row_loss = torch.where(kd_on, div * (kd_w[rows] * (T * T)), 0.0)
        if labels is not None:
            lab = torch.where(ce_on, labels[rows], 0).unsqueeze(1)
            log_c = log_q if T == 1.0 else torch.log_softmax(sc, -1)
            row_loss = row_loss + torch.where(ce_on, log_c.gather(1, lab).squeeze(1) * -ce_w[rows], 0.0)
        loss_rows[rows] = row_loss
        if grad_out is not None:
            g.mul_((kd_w[rows] * T).unsqueeze(1))
            if kd_mask is not None:  # rows with a label but no KL term: their teacher row may hold garbage
                g = torch.where(kd_on.unsqueeze(1), g, 0.0)
            if labels is not None:
                c = q if T == 1.0 else log_c.exp()
                g.add_(c * ce_w[rows].unsqueeze(1)).scatter_add_(1, lab, -ce_w[rows].unsqueeze(1))
            grad_out[rows] = torch.where((kd_on | ce_on).unsqueeze(1), g, 0.0)
    return loss_rows


def _rows_forward(rows_fn, s, t, labels, kd_mask, temperature, alpha, ignore_index, reduction, divergence, beta,
                  need_grad, grad_in_logits):
    """A forward backend over a row function: the counts, the gradient buffer, the reduction."""
    check_labels_in_range(labels, s.shape[1], ignore_index)
    counts = row_counts(s.shape[0], labels, kd_mask, ignore_index, s.device)
    w_kd, w_ce = _weights(labels is not None, alpha)
    ds = (s if grad_in_logits else torch.empty_like(s)) if need_grad else None
    if ds is not None and not grad_in_logits and _config.poison_outputs():
        ds.fill_(float("nan"))
    rows = rows_fn(s, t, labels, kd_mask, counts, temperature, w_kd, w_ce, ignore_index, reduction == "mean",
                   divergence, beta, ds)
    loss = rows if reduction == "none" else rows.sum()
    return loss, (ds if ds is not None else s.new_empty(0))


@FAMILY.forward("reference")
def _reference_forward(*inputs):
    """Plain PyTorch, row chunk by row chunk in fp32 (fp64 for fp64): the closed-form loss and gradient."""
    return _rows_forward(reference_rows, *inputs)


@FAMILY.backward("reference")
def _reference_backward(dloss, ds, needs):
    if dloss.dim() == 1:
        return (ds * dloss.to(ds.dtype).unsqueeze(1),)
    return (ds * dloss.to(ds.dtype),)


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_rows(*args):
    from peft_kernels.triton import distill as tk

    return tk.distill_forward(*args)


@FAMILY.forward("triton", devices=("cuda",), dtypes=_KERNEL_DTYPES)
def _triton_forward(*inputs):
    """One program per row: online softmax statistics of s/T, t/T and s in one pass over the vocabulary, the
    gradient in a second (from L2), in the logits' dtype (triton/distill.py)."""
    with _backends.on_device(inputs[0].device):
        return _rows_forward(triton_rows, *inputs)


@FAMILY.backward("triton", devices=("cuda",), dtypes=None)
def _triton_backward(dloss, ds, needs):
    """ds *= dloss in place; reads no more than dloss when it is 1."""
    from peft_kernels.triton import distill as tk

    with _backends.on_device(ds.device):
        return (tk.scale_grad_(ds, dloss.to(torch.float32)),)


@FAMILY.why_not("triton")
def _triton_why_not(inp: DistillInputs) -> str | None:
    from peft_kernels.triton import distill as tk

    return tk.why_not(inp.student_logits, inp.teacher_logits)


def cuda_rows(s, t, labels, kd_mask, counts, temperature, w_kd, w_ce, ignore_index, mean, divergence, beta,
              grad_out):
    return torch.ops.peft_kernels.distill_loss_fwd_cuda(
        s, t, labels, kd_mask, counts, grad_out, float(temperature), float(w_kd), float(w_ce), int(ignore_index),
        bool(mean), DIVERGENCES.index(divergence), float(beta))


@FAMILY.forward("cuda", dtypes=_KERNEL_DTYPES)
def _cuda_forward(*inputs):
    """CUDA C++: one block per row, the same passes as the Triton kernel (csrc/cuda/distill.cu)."""
    return _rows_forward(cuda_rows, *inputs)


@FAMILY.backward("cuda", dtypes=None)
def _cuda_backward(dloss, ds, needs):
    torch.ops.peft_kernels.distill_scale_grad_cuda_(ds, dloss.to(torch.float32).contiguous())
    return (ds,)


@FAMILY.why_not("cuda")
def _cuda_why_not(inp: DistillInputs) -> str | None:
    s, t = inp.student_logits, inp.teacher_logits
    if t.dtype != s.dtype:
        return f"teacher_logits has dtype {t.dtype} but student_logits has {s.dtype}; the CUDA kernel takes one dtype"
    if not (s.is_contiguous() and t.is_contiguous()):
        return "student_logits and teacher_logits must be contiguous for the CUDA kernel"
    return None


# --------------------------------------------------------------------------------------------------
# C++ on CPU tensors (csrc/distill.cpp): the reference's closed form as one loop per row, the whole forward in one
# call; its eager path is one C++ autograd node (the backward scales the saved gradient, no Python in it).
# --------------------------------------------------------------------------------------------------
_CPP_FORWARD = _backends.native_function("distill_loss_forward_cpu")
_CPP_NODE = _backends.native_function("distill_loss_autograd")
_REDUCTION_CODE = {"mean": 0, "sum": 1, "none": 2}
_DIVERGENCE_CODE = {name: i for i, name in enumerate(DIVERGENCES)}


def _cpp_eager(s, t, labels, kd_mask, temperature, alpha, ignore_index, reduction, divergence, beta, need_grad,
               grad_in_logits):
    return _CPP_NODE(s, t, labels, kd_mask, temperature, alpha, ignore_index, _REDUCTION_CODE[reduction],
                     _DIVERGENCE_CODE[divergence], beta, need_grad, grad_in_logits)


@FAMILY.forward("cpp", eager=_cpp_eager if _CPP_NODE is not None else None)
def _cpp_forward(s, t, labels, kd_mask, temperature, alpha, ignore_index, reduction, divergence, beta, need_grad,
                 grad_in_logits):
    """C++ loop per row over the vocabulary (csrc/distill.cpp): the label check, the counts, the losses, the
    gradient and the reduction in one call; rows in parallel."""
    return _CPP_FORWARD(s, t, labels, kd_mask, temperature, alpha, ignore_index, _REDUCTION_CODE[reduction],
                        _DIVERGENCE_CODE[divergence], beta, need_grad, grad_in_logits)


FAMILY.backward("cpp", dtypes=None)(_reference_backward)  # ds scaled by the incoming gradient: the same math


def cpp_rows(s, t, labels, kd_mask, counts, temperature, w_kd, w_ce, ignore_index, mean, divergence, beta,
             grad_out):
    """``reference_rows``' contract on CPU tensors over the C++ loop, for a chunk of the rows (the counts are the
    whole batch's). The loop weighs the two terms (alpha, 1 - alpha) and divides by its own rows' counts; here
    its per-row losses ("none") with alpha set to the ratio of the wanted weights w_kd / n_kd and w_ce / n_ce,
    times their sum, give the wanted terms; the gradient is written in place and scaled the same way."""
    kd, ce = (w_kd / max(float(counts[0]), 1.0), w_ce / max(float(counts[1]), 1.0)) if mean else (w_kd, w_ce)
    scale = kd + ce
    alpha = kd / scale if scale > 0.0 else 1.0
    in_place = grad_out is not None and grad_out.data_ptr() == s.data_ptr() and grad_out.is_contiguous() \
        and s.is_contiguous()
    rows, ds = _CPP_FORWARD(s, t, labels, kd_mask, temperature, alpha, ignore_index, _REDUCTION_CODE["none"],
                            _DIVERGENCE_CODE[divergence], beta, grad_out is not None, in_place)
    if grad_out is not None:
        if not in_place:
            grad_out.copy_(ds)
        grad_out.mul_(scale)
    return rows.mul_(scale)


@FAMILY.why_not("cpp")
def _cpp_why_not(inp: DistillInputs) -> str | None:
    if _CPP_FORWARD is None:
        return "the loaded peft_kernels._C was built before csrc/distill.cpp (rebuild: make install)"
    return None


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def check_number(op: str, name: str, value, *, positive: bool = False, lo=None, hi=None, open_lo=False,
                 open_hi=False):
    """Type and value checks written with comparisons only: torch.compile turns a float that changes between
    calls into a SymFloat, which dynamo presents as a float but cannot pass to math.isfinite; comparisons on it
    become guards, so the checks still hold for every value a compiled graph runs with."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # False for NaN too
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    if lo is not None and (value < lo or (open_lo and value == lo)) or \
            hi is not None and (value > hi or (open_hi and value == hi)):
        raise ValueError(f"{op}: {name} must be in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}, "
                         f"got {value}")
    return value if torch.compiler.is_compiling() else float(value)


def check_ignore_index(op: str, ignore_index) -> int:
    if isinstance(ignore_index, torch.SymInt):
        return ignore_index
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"{op}: ignore_index must fit in int64 (labels are int64), got {ignore_index}")
    return ignore_index


def check_choice(op: str, name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{op}: {name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")
    return value


def validate(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, reduction,
             divergence="forward_kl", beta=0.5, kd_mask=None):
    v.check_tensor(OP, "student_logits", student_logits, min_ndim=1)
    v.check_tensor(OP, "teacher_logits", teacher_logits, min_ndim=1)
    if labels is not None:
        v.check_tensor(OP, "labels", labels, dtypes=LABEL_DTYPES)
    if kd_mask is not None:
        v.check_tensor(OP, "kd_mask", kd_mask, dtypes=(torch.bool,))
    v.check_same_device(OP, student_logits=student_logits, teacher_logits=teacher_logits, labels=labels,
                        kd_mask=kd_mask)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"{OP}: teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has "
            f"{tuple(student_logits.shape)}; they must match"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError(f"{OP}: student_logits has an empty class dim (shape {tuple(student_logits.shape)})")
    for name, x in (("labels", labels), ("kd_mask", kd_mask)):
        if x is not None and x.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"{OP}: {name} has shape {tuple(x.shape)}, expected {tuple(student_logits.shape[:-1])} "
                "(student_logits.shape[:-1])"
            )
    temperature = check_number(OP, "temperature", temperature, positive=True)
    alpha = check_number(OP, "alpha", alpha, lo=0.0, hi=1.0)
    ignore_index = check_ignore_index(OP, ignore_index)
    check_choice(OP, "reduction", reduction, REDUCTIONS)
    check_choice(OP, "divergence", divergence, DIVERGENCES)
    beta = check_number(OP, "beta", beta, lo=0.0, hi=1.0, open_lo=True, open_hi=True)
    return temperature, alpha, beta


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None,
                      temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100,
                      reduction: str = "mean", *, divergence: str = "forward_kl", beta: float = 0.5,
                      kd_mask: Tensor | None = None, grad_in_logits: bool = False) -> Tensor:
    """Fused distillation loss ``alpha·T²·D(t, s; T) + (1 - alpha)·CE(s, labels)`` (see the module doc).

    Args:
        student_logits: [..., V] (fp16/bf16/fp32/fp64); the only input that gets a gradient.
        teacher_logits: [..., V], same shape (any float dtype). Treated as detached: its gradient is None
            even when it requires grad.
        labels: [...] int64/int32 class ids (ignore_index marks rows without a hard label), or None for the
            divergence alone (weight 1).
        temperature: T > 0. alpha: weight of the divergence, in [0, 1].
        reduction: "mean" (each term divided by its row count), "sum", or "none" (a loss per row).
        divergence: "forward_kl" (KL(teacher ‖ student)), "reverse_kl" or "jsd" (with ``beta`` in (0, 1)).
        kd_mask: [...] bool, the rows the divergence is taken over (default: the labelled rows, or all rows
            without labels).
        grad_in_logits: write the gradient into student_logits' memory (its values are lost).

    Returns:
        fp32 (fp64 for fp64 student logits): a scalar, or [...] for reduction="none". For the defaults,
        ``alpha · F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True, reduction="sum") / n · T²
        + (1 - alpha) · F.cross_entropy(s, labels, ignore_index=ignore_index)`` with the KL over the n
        labelled rows; 0 when every row is ignored.
    """
    # The steady state (eager, plain scalars in range, a signature seen before) is this block: cheap scalar checks
    # (they run on every call: a temperature schedule changes the float, never the cache key), a cached lookup and
    # the backend's call. Anything else takes the full checks below (which raise on a bad argument).
    if (type(temperature) in _NUMBER and type(alpha) in _NUMBER and type(beta) in _NUMBER
            and 0.0 < temperature < _INF and 0.0 <= alpha <= 1.0 and 0.0 < beta < 1.0 and steady()):
        need_grad = student_logits.requires_grad and torch.is_grad_enabled() if isinstance(student_logits, Tensor) \
            else False
        key = _key(student_logits, teacher_logits, labels, kd_mask, ignore_index, reduction, divergence, need_grad,
                   grad_in_logits)
        hit = FAMILY.cached(key)
        if hit is not None:
            return _call(hit, student_logits, teacher_logits, labels, kd_mask, float(temperature), float(alpha),
                         ignore_index, reduction, divergence, float(beta), need_grad, grad_in_logits)
    return _distillation_loss_checked(student_logits, teacher_logits, labels, temperature, alpha, ignore_index,
                                      reduction, divergence, beta, kd_mask, grad_in_logits)


_NUMBER = (float, int)
_INF = math.inf


def _key(s, t, labels, kd_mask, ignore_index, reduction, divergence, need_grad, grad_in_logits):
    """What validation and dispatch depend on besides the float scalars, or None (not cacheable: the full checks
    run). ``type(ignore_index)`` too: True == 1 as a dict key, but only the int is valid."""
    sig = signature(s, t, labels, kd_mask)
    if sig is None or type(ignore_index) is not int or type(reduction) is not str or type(divergence) is not str:
        return None
    return (sig, ignore_index, reduction, divergence, need_grad, bool(grad_in_logits))


def _rows(student_logits, teacher_logits, labels, kd_mask):
    """The op's [N, V] view of its arguments (copies only where V is not unit-stride)."""
    V = student_logits.shape[-1]
    s = student_logits if student_logits.dim() == 2 else student_logits.reshape(-1, V)
    if s.stride(-1) != 1 and V > 1:
        s = s.contiguous()
    t = teacher_logits.detach() if teacher_logits.requires_grad else teacher_logits
    if t.dim() != 2:
        t = t.reshape(-1, V)
    if t.stride(-1) != 1 and V > 1:
        t = t.contiguous()
    lab = None
    if labels is not None:
        lab = labels if labels.dim() == 1 else labels.reshape(-1)
        if lab.dtype != torch.int64:
            lab = lab.to(torch.int64)
    kdm = None if kd_mask is None else kd_mask if kd_mask.dim() == 1 else kd_mask.reshape(-1)
    return s, t, lab, kdm


def _call(hit, student_logits, teacher_logits, labels, kd_mask, temperature, alpha, ignore_index, reduction,
          divergence, beta, need_grad, grad_in_logits):
    """Run the cached choice `hit` = (fwd, bwd, node) on validated arguments (eager)."""
    fwd, bwd, node = hit
    s, t, lab, kdm = _rows(student_logits, teacher_logits, labels, kd_mask)
    # The logits buffer can take the gradient only when it is the caller's own memory (not a fresh copy).
    in_place = bool(grad_in_logits) and need_grad and s.data_ptr() == student_logits.data_ptr()
    args = (s, t, lab, kdm, temperature, alpha, ignore_index, reduction, divergence, beta, need_grad, in_place)
    loss = node(*args) if node is not None else FAMILY.run_eager(DistillInputs(*args), fwd, bwd)
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" and student_logits.dim() != 2 else loss


def _distillation_loss_checked(student_logits, teacher_logits, labels, temperature, alpha, ignore_index, reduction,
                               divergence, beta, kd_mask, grad_in_logits):
    """Every other call: the full checks, dispatch (then cached for the steady state)."""
    temperature, alpha, beta = validate(student_logits, teacher_logits, labels, temperature, alpha,
                                        ignore_index, reduction, divergence, beta, kd_mask)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    compiling = torch.compiler.is_compiling()
    s, t, lab, kdm = _rows(student_logits, teacher_logits, labels, kd_mask)
    # Not in a compiled graph: a custom op may not mutate an input it does not declare (the graph may reuse it).
    in_place = (bool(grad_in_logits) and need_grad and not compiling
                and s.data_ptr() == student_logits.data_ptr())
    inputs = DistillInputs(s, t, lab, kdm, temperature, alpha, ignore_index, reduction, divergence, beta,
                           need_grad, in_place)
    if compiling:
        loss = FAMILY(inputs)
    else:
        key = _key(student_logits, teacher_logits, labels, kd_mask, ignore_index, reduction, divergence, need_grad,
                   grad_in_logits)
        fwd, bwd, node = FAMILY.remember(key, inputs)
        loss = node(*inputs) if node is not None else FAMILY.run_eager(inputs, fwd, bwd)
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss
