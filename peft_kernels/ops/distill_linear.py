"""Fused-linear distillation loss: the student's (and teacher's) output heads inside the loss, chunked over
tokens, so neither model's [N, V] logits ever exist in full.

    logits_s = h_s Wᵀ + b + scaling · (h_s Aᵀ) Bᵀ          the student's head, LoRA adapters on it optional
    logits_t = h_t W_tᵀ + b_t   (or the teacher's logits, given)
    loss     = distillation_loss(logits_s, logits_t, labels, ...)   (ops/distill.py: same options)

Per chunk of C tokens: the two heads' GEMMs into [C, V] buffers, the distillation row kernel writes
d(loss)/d(logits_s) over the student's buffer, and the chunk's gradients follow from it at once:
dh = g W + scaling (g B) A, dW += gᵀ h, db += Σ g, dB += scaling gᵀ (h Aᵀ), dA += scaling (g B)ᵀ h.
They are returned by the forward as auxiliary outputs; the backward scales them by the incoming gradient
(so the backward cannot run twice over one forward). Liger-Kernel's fused losses do the same without the
adapters: a LoRA-adapted head there gets no adapter gradient.

Accumulators: dW in the weight's dtype (the GEMMs accumulate in fp32 within a chunk), db/dA/dB in fp32 and
returned in the parameters' own dtypes. Reductions: "mean" and "sum" ("none" would need the per-row
incoming gradient before the weight gradients are summed).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from peft_kernels import _backends
from peft_kernels._op import OpFamily
from peft_kernels.ops import _validate as v
from peft_kernels.ops import distill as d

OP = "fused_linear_distillation_loss"
GRADS = ("student_hidden", "student_weight", "student_bias", "lora_A", "lora_B")


class LinearDistillInputs(NamedTuple):
    student_hidden: Tensor  # [N, H]
    student_weight: Tensor  # [V, H]
    student_bias: Tensor | None  # [V]
    lora_A: Tensor | None  # [r, H]
    lora_B: Tensor | None  # [V, r]
    teacher_hidden: Tensor | None  # [N, H_t]
    teacher_weight: Tensor | None  # [V, H_t]
    teacher_bias: Tensor | None  # [V]
    teacher_logits: Tensor | None  # [N, V] (instead of the teacher's hidden states and head)
    labels: Tensor | None  # [N] int64
    kd_mask: Tensor | None  # [N] bool
    lora_scaling: float
    temperature: float
    alpha: float
    ignore_index: int
    reduction: str
    divergence: str
    beta: float
    chunk_size: int
    grad_bits: int  # bit i: the gradient of GRADS[i] is wanted


def _needs(bits: int) -> list[bool]:
    return [bool(bits >> i & 1) for i in range(len(GRADS))]


def _grad_metas(inp: LinearDistillInputs):
    h, W, b, A, B = inp[:5]
    return [(h.shape, h.dtype), (W.shape, W.dtype), ((W.shape[0],), b.dtype if b is not None else h.dtype),
            (A.shape if A is not None else (0,), A.dtype if A is not None else h.dtype),
            (B.shape if B is not None else (0,), B.dtype if B is not None else h.dtype)]


def _fake(inp: LinearDistillInputs):
    h = inp.student_hidden
    loss = h.new_empty((), dtype=d._compute_dtype(h.dtype))
    grads = [h.new_empty(shape if need else (0,), dtype=dtype)
             for (shape, dtype), need in zip(_grad_metas(inp), _needs(inp.grad_bits))]
    return (loss, *grads)


def _backward_fake(dloss, dh, dW, db, dA, dB, needs):
    return tuple(torch.empty_like(g) if n else None for g, n in zip((dh, dW, db, dA, dB), needs))


FAMILY = OpFamily(
    OP,
    LinearDistillInputs,
    schema="(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor? lora_A, Tensor? lora_B, "
    "Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits, Tensor? labels, "
    "Tensor? kd_mask, float lora_scaling, float temperature, float alpha, int ignore_index, str reduction, "
    "str divergence, float beta, int chunk_size, int grad_bits) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    backward_schema="(Tensor dloss, Tensor dh, Tensor dW, Tensor db, Tensor dA, Tensor dB)",
    differentiable=GRADS,
    save=lambda inp, out: tuple(out[1:]),
    fake=_fake,
    backward_fake=_backward_fake,
    public_outputs=1,
    # CPU: the C++ row loop (the reference's row math in Python is most of a CPU step at small sizes).
    preference={"cuda": ("triton",), "cpu": ("cpp", "reference")},
    doc="distillation loss over chunks of tokens with the heads (and a LoRA head) inside; no full logits",
)


_CPU_CHUNK_LOGITS = 1 << 21  # logits per chunk on CPU tensors (8 MB in fp32)


def auto_chunk_size(N: int, H: int, V: int, device_type: str = "cuda") -> int:
    """Liger's rule: about as many chunks as V / H, so one chunk's logits are about the size of the hidden states.
    On CPU tensors each chunk costs its ATen calls' host time, which that rule multiplies (16 chunks at 256 tokens,
    V = 1000, H = 64: 1.6x the eager formula, measured): chunks of up to 2^21 logits there, still bounded."""
    if device_type == "cpu":
        return max(1, min(N, _CPU_CHUNK_LOGITS // max(V, 1)))
    chunks = max(1, -(-V // max(H, 1)))
    return max(1, 1 << max(0, (-(-N // chunks) - 1).bit_length()))


def _chunked_forward(rows_fn, h, W, b, A, B, th, tW, tb, t_logits, labels, kd_mask, scaling, temperature, alpha,
                     ignore_index, reduction, divergence, beta, chunk_size, grad_bits):
    """The algorithm shared by every backend: chunked GEMMs (cuBLAS/MKL) around one distillation row function."""
    d.check_labels_in_range(labels, W.shape[0], ignore_index, OP, "the head's out_features")
    need_dh, need_dW, need_db, need_dA, need_dB = needs = _needs(grad_bits)
    N, V = h.shape[0], W.shape[0]
    cdt = d._compute_dtype(h.dtype)
    counts = d.row_counts(N, labels, kd_mask, ignore_index, h.device)
    w_kd, w_ce = d._weights(labels is not None, alpha)
    mean = reduction == "mean"
    lora = A is not None
    A_c, B_c = (A.to(h.dtype), B.to(h.dtype)) if lora else (None, None)
    b_c = b.to(h.dtype) if b is not None else None
    dh = torch.empty_like(h) if need_dh else None
    dW = torch.zeros_like(W) if need_dW else None
    db = torch.zeros(V, dtype=cdt, device=h.device) if need_db else None
    dA = torch.zeros(A.shape, dtype=cdt, device=h.device) if need_dA else None
    dB = torch.zeros(B.shape, dtype=cdt, device=h.device) if need_dB else None
    loss = torch.zeros((), dtype=cdt, device=h.device)
    want_grad = any(needs)
    for start in range(0, N, chunk_size):
        rows = slice(start, min(N, start + chunk_size))
        hc = h[rows]
        logits = torch.addmm(b_c, hc, W.t()) if b_c is not None else hc @ W.t()
        S = hc @ A_c.t() if lora else None
        if lora:
            logits.addmm_(S, B_c.t(), alpha=scaling)
        if t_logits is not None:
            tc = t_logits[rows]
        else:
            tc = torch.addmm(tb.to(th.dtype), th[rows], tW.t()) if tb is not None else th[rows] @ tW.t()
        lab = labels[rows] if labels is not None else None
        kdm = kd_mask[rows] if kd_mask is not None else None
        # The gradient overwrites the chunk's student logits (they are not needed any more).
        loss += rows_fn(logits, tc, lab, kdm, counts, temperature, w_kd, w_ce, ignore_index, mean, divergence,
                        beta, logits if want_grad else None).sum()
        if not want_grad:
            continue
        g = logits
        G = g @ B_c if lora and (need_dh or need_dA) else None
        if need_dh:
            torch.mm(g, W, out=dh[rows])
            if lora:
                dh[rows].addmm_(G, A_c, alpha=scaling)
        if need_dW:
            dW.addmm_(g.t(), hc.to(W.dtype))
        if need_db:
            db += g.sum(0, dtype=cdt)
        if need_dA:
            dA += (G.t() @ hc).to(cdt).mul_(scaling)
        if need_dB:
            dB += (g.t() @ S).to(cdt).mul_(scaling)
    grads = [dh, dW, db.to(b.dtype) if db is not None else None, dA.to(A.dtype) if dA is not None else None,
             dB.to(B.dtype) if dB is not None else None]
    return (loss, *(g if g is not None else h.new_empty(0) for g in grads))  # one empty each: outputs never alias


@FAMILY.forward("reference")
def _reference_forward(*inputs):
    """Chunked PyTorch GEMMs around the reference row math (ops/distill.py)."""
    return _chunked_forward(d.reference_rows, *inputs)


@FAMILY.forward("triton", devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                backward_by="reference")
def _triton_forward(*inputs):
    """Chunked cuBLAS GEMMs around the Triton row kernel (triton/distill.py), which writes each chunk's logits
    gradient over the chunk's logits."""
    with _backends.on_device(inputs[0].device):
        return _chunked_forward(d.triton_rows, *inputs)


@FAMILY.forward("cpp", backward_by="reference")
def _cpp_forward(*inputs):
    """Chunked MKL GEMMs around the C++ row loop (csrc/distill.cpp), which writes each chunk's logits gradient over
    the chunk's logits."""
    return _chunked_forward(d.cpp_rows, *inputs)


@FAMILY.why_not("cpp")
def _cpp_why_not(inp: LinearDistillInputs) -> str | None:
    if d._CPP_FORWARD is None:
        return "the loaded peft_kernels._C was built before csrc/distill.cpp (rebuild: make install)"
    return None


@FAMILY.why_not("triton")
def _triton_why_not(inp: LinearDistillInputs) -> str | None:
    for name in ("teacher_hidden", "teacher_logits"):
        x = getattr(inp, name)
        if x is not None and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"{name} has dtype {x.dtype}; the Triton row kernel takes fp16, bf16 and fp32"
    return None


@FAMILY.backward("reference", dtypes=None)
def _scale_backward(dloss, dh, dW, db, dA, dB, needs):
    """The gradients were computed in the forward: scale them by the incoming gradient (in place: the buffers
    belong to this op)."""
    return tuple(g.mul_(dloss.to(g.dtype)) if n else None for g, n in zip((dh, dW, db, dA, dB), needs))


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def fused_linear_distillation_loss(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None, labels: Tensor | None = None, *, teacher_logits: Tensor | None = None,
    student_bias: Tensor | None = None, teacher_bias: Tensor | None = None, lora_A: Tensor | None = None,
    lora_B: Tensor | None = None, lora_scaling: float = 1.0, temperature: float = 2.0, alpha: float = 0.5,
    ignore_index: int = -100, reduction: str = "mean", divergence: str = "forward_kl", beta: float = 0.5,
    kd_mask: Tensor | None = None, chunk_size: int | None = None,
) -> Tensor:
    """``distillation_loss(student_hidden @ W.T + b + s·(h Aᵀ)Bᵀ, teacher logits, labels, ...)`` without the logits.

    Args:
        student_hidden: [..., H] the student's last hidden states (after any head transform).
        student_weight: [V, H] the student's output head, ``student_bias`` [V] optional; gradients for the
            hidden states, and for the head/bias where they require grad.
        teacher_hidden, teacher_weight (, teacher_bias): [..., H_t] and [V, H_t], the teacher's; or
        teacher_logits: [..., V] the teacher's logits instead. The teacher gets no gradient.
        lora_A, lora_B: [r, H] and [V, r], LoRA adapters on the student's head (both or neither), scaled by
            ``lora_scaling``; they get their gradients.
        labels, kd_mask, temperature, alpha, ignore_index, divergence, beta: as for ``distillation_loss``.
        reduction: "mean" or "sum".
        chunk_size: tokens per chunk (default: about N·H/V, Liger's rule; on CPU tensors up to 2^21 logits).
    """
    op = OP
    v.check_tensor(op, "student_hidden", student_hidden, min_ndim=1)
    v.check_tensor(op, "student_weight", student_weight, ndim=2)
    H, V = student_hidden.shape[-1], student_weight.shape[0]
    v.check_size(op, "student_weight", student_weight, 1, H, "hidden size = student_hidden.shape[-1]")
    v.check_same_dtype(op, "student_hidden", student_hidden, student_weight=student_weight)
    lead = student_hidden.shape[:-1]
    if (lora_A is None) != (lora_B is None):
        raise ValueError(f"{op}: lora_A and lora_B go together (got only {'lora_A' if lora_B is None else 'lora_B'})")
    if lora_A is not None:
        v.check_tensor(op, "lora_A", lora_A, ndim=2)
        v.check_tensor(op, "lora_B", lora_B, ndim=2)
        v.check_size(op, "lora_A", lora_A, 1, H, "hidden size = student_hidden.shape[-1]")
        v.check_size(op, "lora_B", lora_B, 0, V, "vocab size = student_weight.shape[0]")
        v.check_size(op, "lora_B", lora_B, 1, lora_A.shape[0], "rank = lora_A.shape[0]")
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None:
            v.check_tensor(op, name, bias, ndim=1)
            v.check_size(op, name, bias, 0, V, "vocab size = student_weight.shape[0]")
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError(f"{op}: pass teacher_logits or teacher_hidden + teacher_weight, not both")
        v.check_tensor(op, "teacher_logits", teacher_logits, min_ndim=1)
        if teacher_logits.shape != (*lead, V):
            raise ValueError(f"{op}: teacher_logits has shape {tuple(teacher_logits.shape)}, expected "
                             f"{(*lead, V)} (student_hidden.shape[:-1] + (vocab size,))")
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(f"{op}: pass teacher_hidden and teacher_weight (or teacher_logits)")
        v.check_tensor(op, "teacher_hidden", teacher_hidden, min_ndim=1)
        v.check_tensor(op, "teacher_weight", teacher_weight, ndim=2)
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"{op}: teacher_hidden has shape {tuple(teacher_hidden.shape)}; its leading dims must "
                             f"match student_hidden's {tuple(lead)}")
        v.check_size(op, "teacher_weight", teacher_weight, 0, V, "vocab size = student_weight.shape[0]")
        v.check_size(op, "teacher_weight", teacher_weight, 1, teacher_hidden.shape[-1],
                     "teacher hidden size = teacher_hidden.shape[-1]")
        v.check_same_dtype(op, "teacher_hidden", teacher_hidden, teacher_weight=teacher_weight)
    if labels is not None:
        v.check_tensor(op, "labels", labels, dtypes=d.LABEL_DTYPES)
        if labels.shape != lead:
            raise ValueError(f"{op}: labels has shape {tuple(labels.shape)}, expected {tuple(lead)} "
                             "(student_hidden.shape[:-1])")
    if kd_mask is not None:
        v.check_tensor(op, "kd_mask", kd_mask, dtypes=(torch.bool,))
        if kd_mask.shape != lead:
            raise ValueError(f"{op}: kd_mask has shape {tuple(kd_mask.shape)}, expected {tuple(lead)}")
    v.check_same_device(op, student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                        lora_A=lora_A, lora_B=lora_B, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                        teacher_bias=teacher_bias, teacher_logits=teacher_logits, labels=labels, kd_mask=kd_mask)
    scaling = d.check_number(op, "lora_scaling", lora_scaling)
    temperature = d.check_number(op, "temperature", temperature, positive=True)
    alpha = d.check_number(op, "alpha", alpha, lo=0.0, hi=1.0)
    ignore_index = d.check_ignore_index(op, ignore_index)
    d.check_choice(op, "reduction", reduction, ("mean", "sum"))
    d.check_choice(op, "divergence", divergence, d.DIVERGENCES)
    beta = d.check_number(op, "beta", beta, lo=0.0, hi=1.0, open_lo=True, open_hi=True)
    N = lead.numel()
    if chunk_size is None:
        chunk_size = auto_chunk_size(N, H, V, student_hidden.device.type)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")

    h = student_hidden.reshape(-1, H).contiguous()
    th = teacher_hidden.detach().reshape(N, -1).contiguous() if teacher_hidden is not None else None
    tl = teacher_logits.detach().reshape(N, V).contiguous() if teacher_logits is not None else None
    tW = teacher_weight.detach() if teacher_weight is not None else None
    tb = teacher_bias.detach() if teacher_bias is not None else None
    lab = labels.reshape(-1).to(torch.int64) if labels is not None else None
    kdm = kd_mask.reshape(-1) if kd_mask is not None else None
    grad_on = torch.is_grad_enabled()
    bits = sum(1 << i for i, x in enumerate((student_hidden, student_weight, student_bias, lora_A, lora_B))
               if grad_on and x is not None and x.requires_grad)
    return FAMILY(LinearDistillInputs(h, student_weight, student_bias, lora_A, lora_B, th, tW, tb, tl, lab, kdm,
                                      scaling, temperature, alpha, ignore_index, reduction, divergence, beta,
                                      int(chunk_size), bits))
