"""distillation_loss: reference backend vs float64 math, vs F.kl_div + F.cross_entropy, autograd, gradcheck,
opcheck, torch.compile, non-finite logits, divergences, input validation (the Triton kernel:
tests/triton/test_distill_triton.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_kernels.ops import distill as distill_mod
from peft_kernels.ops import distillation_loss, distillation_loss_reference
from peft_kernels.ops.distill import FAMILY, DistillInputs
from peft_kernels.ops.distill_linear import FAMILY as FAMILY_LINEAR
from peft_kernels.ops.distill_linear import LinearDistillInputs, fused_linear_distillation_loss
from tests.helpers import assert_close, assert_within_eager_error, rel_err

OP = "distillation_loss"


def make_inputs(lead=(4, 9), V=37, dtype=torch.float32, n_ignored=5, scale=3.0, label_dtype=torch.int64):
    s = (torch.randn(*lead, V) * scale).to(dtype).requires_grad_(True)
    t = (torch.randn(*lead, V) * scale).to(dtype)
    labels = torch.randint(0, V, lead, dtype=label_dtype)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignored]] = -100
    return s, t, labels


def kd_math64(s, t, labels, T, alpha, ignore_index=-100, reduction="mean"):
    """The loss written out in float64 with logsumexp (no torch.nn.functional)."""
    V = s.shape[-1]
    s, t = s.detach().double().reshape(-1, V), t.detach().double().reshape(-1, V)
    log_ps = s / T - torch.logsumexp(s / T, -1, keepdim=True)
    log_pt = t / T - torch.logsumexp(t / T, -1, keepdim=True)
    kl_row = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if labels is None:
        total, n = T * T * kl_row.sum(), s.shape[0]
    else:
        labels = labels.reshape(-1).long()
        valid = labels != ignore_index
        ce_row = torch.logsumexp(s, -1) - s.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
        total = alpha * T * T * kl_row[valid].sum() + (1 - alpha) * ce_row[valid].sum()
        n = int(valid.sum())
    return total / max(n, 1) if reduction == "mean" else total


def users_formula(s, t, labels, T, alpha, ignore_index=-100):
    """What users write (DistilBERT / HF recipes): F.kl_div on the kept rows + F.cross_entropy."""
    V = s.shape[-1]
    s2, t2 = s.reshape(-1, V), t.reshape(-1, V)
    if labels is None:
        return F.kl_div(F.log_softmax(s2 / T, -1), F.log_softmax(t2 / T, -1), log_target=True,
                        reduction="sum") / s2.shape[0] * T * T
    lab = labels.reshape(-1)
    valid = lab != ignore_index
    kl = F.kl_div(F.log_softmax(s2[valid] / T, -1), F.log_softmax(t2[valid] / T, -1), log_target=True,
                  reduction="sum") / valid.sum() * T * T
    return alpha * kl + (1 - alpha) * F.cross_entropy(s2, lab, ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------------
# Forward and backward vs float64 math, the users' formula and autograd of the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("T, alpha", [(2.0, 0.5), (1.0, 0.0), (4.0, 1.0), (0.7, 0.3)])
def test_fp32_matches_float64_and_users_formula(with_labels, T, alpha):
    s, t, labels = make_inputs()
    labels = labels if with_labels else None
    loss = distillation_loss(s, t, labels, temperature=T, alpha=alpha)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, kd_math64(s, t, labels, T, alpha), name="loss vs float64")
    theirs = users_formula(s, t, labels, T, alpha)
    assert_close(loss, theirs, name="loss vs F.kl_div + F.cross_entropy")

    (g,) = torch.autograd.grad(loss, s)
    (g_users,) = torch.autograd.grad(theirs, s)
    (g_ref,) = torch.autograd.grad(distillation_loss_reference(s, t, labels, T, alpha), s)
    s64 = s.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(distillation_loss_reference(s64, t.double(), labels, T, alpha), s64)
    assert g.dtype == torch.float32
    assert_close(g, g_ref, name="ds vs reference autograd")
    assert_close(g, g_users, name="ds vs users' formula autograd")
    assert_close(g, g64, name="ds vs float64")


@pytest.mark.parametrize("with_labels", [True, False])
def test_sum_reduction(with_labels):
    s, t, labels = make_inputs(dtype=torch.float64)
    labels = labels if with_labels else None
    loss = distillation_loss(s, t, labels, temperature=1.5, alpha=0.25, reduction="sum")
    assert_close(loss, kd_math64(s, t, labels, 1.5, 0.25, reduction="sum"))
    ref = distillation_loss_reference(s, t, labels, 1.5, 0.25, reduction="sum")
    assert_close(loss, ref)
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s)[0])


def test_fp64_returns_fp64():
    s, t, labels = make_inputs(dtype=torch.float64)
    loss = distillation_loss(s, t, labels)
    assert loss.dtype == torch.float64
    assert_close(loss, kd_math64(s, t, labels, 2.0, 0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_labels", [True, False])
def test_half_precision_logits(dtype, with_labels):
    """The loss is fp32 math on the half logits (fp32 tolerance vs float64); the gradient comes back in the
    logits' dtype within ~2x eager PyTorch's error in that dtype (FlashAttention rule)."""
    s, t, labels = make_inputs(lead=(123,), V=40, dtype=dtype)
    labels = labels if with_labels else None
    loss = distillation_loss(s, t, labels, temperature=2.0, alpha=0.5)
    assert loss.dtype == torch.float32
    assert_close(loss, kd_math64(s, t, labels, 2.0, 0.5), dtype=torch.float32, name="loss")

    (g,) = torch.autograd.grad(loss, s)
    (g_eager,) = torch.autograd.grad(users_formula(s, t, labels, 2.0, 0.5), s)
    s64 = s.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(distillation_loss_reference(s64, t.double(), labels, 2.0, 0.5), s64)
    assert g.dtype == dtype
    assert_within_eager_error(g, g_eager, g64, name="ds")
    assert rel_err(g, g64) < 1e-2


def test_labels_none_ignores_alpha():
    s, t, _ = make_inputs()
    a = distillation_loss(s, t, None, alpha=0.1)
    b = distillation_loss(s, t, None, alpha=0.9)
    assert torch.equal(a, b)


def test_int32_labels_and_leading_dims():
    s, t, labels = make_inputs(lead=(3, 41), V=37, label_dtype=torch.int32)
    loss = distillation_loss(s, t, labels, temperature=3.0, alpha=0.4)
    assert_close(loss, kd_math64(s, t, labels, 3.0, 0.4))
    s2 = s.detach().reshape(123, 37).requires_grad_(True)
    loss2 = distillation_loss(s2, t.reshape(123, 37), labels.reshape(123).long(), temperature=3.0, alpha=0.4)
    assert torch.equal(loss, loss2)
    g, g2 = torch.autograd.grad(loss, s)[0], torch.autograd.grad(loss2, s2)[0]
    assert torch.equal(g.reshape(123, 37), g2)


def test_teacher_dtype_may_differ():
    """A bf16 teacher with an fp32 student: the teacher is upcast, loss and gradient follow the student."""
    s, t, labels = make_inputs()
    t = t.to(torch.bfloat16)
    loss = distillation_loss(s, t, labels)
    assert loss.dtype == torch.float32
    assert_close(loss, kd_math64(s, t, labels, 2.0, 0.5))
    (g,) = torch.autograd.grad(loss, s)
    assert g.dtype == torch.float32
    assert_close(g, torch.autograd.grad(distillation_loss_reference(s, t, labels), s)[0])


def test_custom_ignore_index():
    s, t, labels = make_inputs(dtype=torch.float64)
    labels[labels == -100] = 5
    loss = distillation_loss(s, t, labels, ignore_index=5)
    assert_close(loss, kd_math64(s, t, labels, 2.0, 0.5, ignore_index=5))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_is_zero_not_nan(reduction):
    s, t, labels = make_inputs()
    labels.fill_(-100)
    loss = distillation_loss(s, t, labels, reduction=reduction)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, s)
    assert torch.equal(g, torch.zeros_like(g))


def test_empty_batch():
    s = torch.randn(0, 7, requires_grad=True)
    loss = distillation_loss(s, torch.randn(0, 7), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    assert torch.autograd.grad(loss, s)[0].shape == (0, 7)


def test_ignored_rows_may_hold_garbage():
    """Padding rows (ignored labels) with inf/NaN logits change neither the loss nor the other gradients."""
    s, t, labels = make_inputs(lead=(20,), V=11, n_ignored=0)
    labels[[3, 7]] = -100
    s_bad, t_bad = s.detach().clone(), t.clone()
    s_bad[3], t_bad[3] = float("nan"), float("inf")
    s_bad[7, 2], t_bad[7] = float("-inf"), float("nan")
    s_bad.requires_grad_(True)
    loss = distillation_loss(s_bad, t_bad, labels)
    assert_close(loss, distillation_loss(s, t, labels))
    (g,) = torch.autograd.grad(loss, s_bad)
    (g_clean,) = torch.autograd.grad(distillation_loss(s, t, labels), s)
    assert torch.equal(g[[3, 7]], torch.zeros(2, 11))
    assert_close(g, g_clean)


def test_teacher_masked_vocab_entries():
    """-inf teacher logits (a masked or padded vocab) give finite loss and gradient: 0·log 0 = 0."""
    s, t, labels = make_inputs(lead=(6,), V=10, n_ignored=1, dtype=torch.float64)
    t[:, 8:] = float("-inf")
    labels[labels >= 8] = 0
    loss = distillation_loss(s, t, labels, temperature=2.0, alpha=0.6)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # Oracle: the KL over the 8 live entries (p_t = 0 elsewhere) with the student's full softmax.
    T = 2.0
    valid = labels != -100
    log_ps = torch.log_softmax(s.detach() / T, -1)
    log_pt = torch.log_softmax(t / T, -1)
    kl = (log_pt[:, :8].exp() * (log_pt[:, :8] - log_ps[:, :8])).sum(-1)
    ce = F.cross_entropy(s.detach(), labels, reduction="none")
    expected = (0.6 * T * T * kl[valid].sum() + 0.4 * ce[valid].sum()) / valid.sum()
    assert_close(loss, expected)
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, t, labels, 2.0, 0.6), (s,))


def test_row_chunks_agree(monkeypatch):
    """The reference backend upcasts row chunk by row chunk: many chunks give the same loss and gradient."""
    s, t, labels = make_inputs(lead=(123,), V=40, dtype=torch.bfloat16)
    loss = distillation_loss(s, t, labels)
    (g,) = torch.autograd.grad(loss, s)
    monkeypatch.setattr(distill_mod, "_CHUNK_ELEMS", 40 * 7)  # 18 chunks of 7 rows (the last: 4)
    loss_c = distillation_loss(s, t, labels)
    (g_c,) = torch.autograd.grad(loss_c, s)
    assert_close(loss_c, loss, dtype=torch.float32)
    assert_close(g_c, g, rtol=0, atol=0)


def test_teacher_gets_no_gradient():
    """The teacher is a fixed target: even when teacher_logits requires grad, its gradient is None."""
    s, t, labels = make_inputs()
    t.requires_grad_(True)
    loss = distillation_loss(s, t, labels)
    loss.backward()
    assert t.grad is None
    ref = distillation_loss_reference(s, t, labels)
    assert_close(s.grad, torch.autograd.grad(ref, s)[0])
    # Only the teacher requires grad: the loss is a constant.
    assert not distillation_loss(s.detach(), t, labels).requires_grad


# --------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_gradcheck(with_labels, reduction, alpha):
    s, t, labels = make_inputs(lead=(2, 3), V=5, dtype=torch.float64, n_ignored=2, scale=1.0)
    labels = labels if with_labels else None
    assert torch.autograd.gradcheck(
        lambda x: distillation_loss(x, t, labels, temperature=1.7, alpha=alpha, reduction=reduction), (s,)
    )


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck_forward(with_labels, reduction):
    s, t, labels = make_inputs(lead=(6,), V=9, n_ignored=2)
    labels = labels if with_labels else None
    fwd, _ = FAMILY.custom_ops
    torch.library.opcheck(fwd, (*DistillInputs(s, t, labels, None, 2.0, 0.5, -100, reduction, "forward_kl", 0.5,
                                               True, False), "reference", "reference"))


def test_opcheck_backward():
    ds = torch.randn(6, 9)
    _, bwd = FAMILY.custom_ops
    torch.library.opcheck(bwd, (torch.tensor(1.3), ds, [True], "reference"))
    torch.library.opcheck(bwd, (torch.randn(6), ds, [True], "reference"))


@pytest.mark.parametrize("with_labels", [True, False])
def test_torch_compile_fullgraph(with_labels):
    s, t, labels = make_inputs(lead=(3, 5), V=16)
    labels = labels if with_labels else None

    def f(s, t, labels):
        return distillation_loss(s, t, labels, temperature=2.0, alpha=0.3) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, loss_c = f(s, t, labels), compiled(s, t, labels)
    assert torch.equal(loss, loss_c)
    assert torch.equal(torch.autograd.grad(loss, s)[0], torch.autograd.grad(loss_c, s)[0])
    if with_labels:
        # The label range check lives in the op's body, so it holds inside the compiled graph too.
        bad = labels.clone()
        bad[0, 0] = 16
        with pytest.raises(ValueError, match=f"{OP}: labels must be in"):
            compiled(s, t, bad)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def _good(**over):
    s, t, labels = make_inputs(lead=(2, 3), V=5, n_ignored=1)
    args = dict(student_logits=s, teacher_logits=t, labels=labels)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(student_logits=torch.randn(())), ValueError, "student_logits must have at least 1 dims"),
    (dict(teacher_logits=torch.randn(2, 3, 6)), ValueError, r"teacher_logits has shape \(2, 3, 6\)"),
    (dict(teacher_logits=torch.randn(6, 5)), ValueError, "teacher_logits has shape"),
    (dict(labels=torch.zeros(6, dtype=torch.long)), ValueError,
     r"labels has shape \(6,\), expected \(2, 3\)"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels has shape"),
    (dict(student_logits=torch.randn(2, 3, 0), teacher_logits=torch.randn(2, 3, 0)), ValueError,
     "student_logits has an empty class dim"),
    (dict(student_logits=torch.randint(0, 3, (2, 3, 5))), TypeError, "student_logits must have dtype"),
    (dict(teacher_logits=torch.randint(0, 3, (2, 3, 5))), TypeError, "teacher_logits must have dtype"),
    (dict(labels=torch.zeros(2, 3)), TypeError, "labels must have dtype in"),
    (dict(labels=torch.zeros(2, 3, dtype=torch.uint8)), TypeError, "labels must have dtype"),
    (dict(student_logits=[[1.0]]), TypeError, "student_logits must be a torch.Tensor"),
    (dict(teacher_logits=None), TypeError, "teacher_logits must be a torch.Tensor"),
    (dict(labels=[0, 1]), TypeError, "labels must be a torch.Tensor"),
])
def test_validation_tensors(over, exc, match):
    with pytest.raises(exc, match=f"{OP}: {match}"):
        distillation_loss(**_good(**over))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature="2"), TypeError, "temperature must be a number"),
    (dict(alpha=-0.1), ValueError, r"alpha must be in \[0.0, 1.0\]"),
    (dict(alpha=1.5), ValueError, r"alpha must be in \[0.0, 1.0\]"),
    (dict(alpha=float("nan")), ValueError, "alpha must be finite"),
    (dict(alpha=None), TypeError, "alpha must be a number"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\)"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(beta=0.0), ValueError, r"beta must be in \(0.0, 1.0\)"),
    (dict(beta=1.0), ValueError, r"beta must be in \(0.0, 1.0\)"),
    (dict(ignore_index=2**70), ValueError, "ignore_index must fit in int64"),
    (dict(ignore_index=-(2**64)), ValueError, "ignore_index must fit in int64"),
    (dict(kd_mask=torch.ones(2, 3)), TypeError, "kd_mask must have dtype"),
    (dict(kd_mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, r"kd_mask has shape \(3, 2\)"),
    (dict(reduction=None), TypeError, "reduction must be a str"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    (dict(ignore_index=True), TypeError, "ignore_index must be an int"),
])
def test_validation_scalars(kw, exc, match):
    with pytest.raises(exc, match=f"{OP}: {match}"):
        distillation_loss(**_good(), **kw)


@pytest.mark.parametrize("value", [5, -1, 99])
def test_validation_labels_out_of_range(value):
    labels = torch.randint(0, 5, (2, 3))
    labels[1, 2] = value
    match = rf"{OP}: labels must be in \[0, 5\).*ignore_index=-100; got {value}"
    with pytest.raises(ValueError, match=match):
        distillation_loss(**_good(labels=labels))


# --------------------------------------------------------------------------------------------------
# Non-finite and extreme logits, vocabularies, divergences, row masks, reduction="none"
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("who", ["teacher", "student"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_nonfinite_logits_give_nan_loss(who, bad, divergence):
    """NaN or +inf in a counted row gives a NaN loss, as F.kl_div + F.cross_entropy do (the op used to return
    a finite loss with a NaN gradient row)."""
    s, t, labels = make_inputs(lead=(8,), V=19, n_ignored=0)
    x = s.detach().clone() if who == "student" else t.clone()
    x[3, 5] = bad
    s2 = x.requires_grad_(True) if who == "student" else s
    t2 = x if who == "teacher" else t
    loss = distillation_loss(s2, t2, labels, divergence=divergence, beta=0.3)
    ref = distillation_loss_reference(s2, t2, labels, divergence=divergence, beta=0.3)
    assert torch.isnan(ref), "the oracle itself must be NaN here"
    assert torch.isnan(loss)
    per_row = distillation_loss(s2, t2, labels, reduction="none", divergence=divergence, beta=0.3)
    assert torch.isnan(per_row[3]) and torch.isfinite(per_row[[0, 1, 2, 4, 5, 6, 7]]).all()


def test_student_minus_inf_where_teacher_has_mass_is_inf():
    s, t, labels = make_inputs(lead=(4,), V=11, n_ignored=0, dtype=torch.float64)
    s = s.detach().clone()
    s[1, 4] = float("-inf")
    labels[1] = 0
    loss = distillation_loss(s, t, labels, reduction="none")
    ref = distillation_loss_reference(s, t, labels, reduction="none")
    assert loss[1] == float("inf") and ref[1] == float("inf")
    assert_close(loss[[0, 2, 3]], ref[[0, 2, 3]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_do_not_overflow(dtype):
    """Logits of ±1e4 (exp overflows without the max shift) give the float64 answer."""
    s, t, labels = make_inputs(lead=(6,), V=23, n_ignored=1, scale=1.0, dtype=torch.float32)
    s = s.detach().sign() * 1e4 + s.detach()
    t = t.sign() * 1e4 - t
    s, t = s.to(dtype).requires_grad_(True), t.to(dtype)
    loss = distillation_loss(s, t, labels, temperature=1.5)
    assert torch.isfinite(loss)
    assert_close(loss, kd_math64(s, t, labels, 1.5, 0.5), dtype=torch.float32, name="loss")
    (g,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(distillation_loss_reference(s64, t.double(), labels, 1.5), s64)
    assert torch.isfinite(g).all()
    assert_close(g, g64, dtype=dtype, name="ds")


@pytest.mark.parametrize("V", [32001, 50257])
def test_large_odd_vocab(V):
    s, t, labels = make_inputs(lead=(3,), V=V, n_ignored=1)
    loss = distillation_loss(s, t, labels, temperature=2.0, alpha=0.7)
    theirs = users_formula(s, t, labels, 2.0, 0.7)
    assert_close(loss, theirs, name="loss vs F.kl_div + F.cross_entropy")
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(theirs, s)[0], name="ds")


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_other_divergences_vs_float64(divergence, with_labels):
    s, t, labels = make_inputs(lead=(5, 3), V=29)
    labels = labels if with_labels else None
    loss = distillation_loss(s, t, labels, 1.8, 0.4, divergence=divergence, beta=0.3)
    s64 = s.detach().double().requires_grad_(True)
    ref = distillation_loss_reference(s64, t.double(), labels, 1.8, 0.4, divergence=divergence, beta=0.3)
    assert_close(loss, ref, dtype=torch.float32, name="loss")
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s64)[0], dtype=torch.float32, name="ds")


def test_divergences_from_their_definitions():
    """reverse KL = F.kl_div with the roles swapped; JSD(beta) = beta KL(p||m) + (1-beta) KL(q||m), written out."""
    s, t, _ = make_inputs(lead=(7,), V=13, dtype=torch.float64)
    T, beta = 2.0, 0.25
    q, p = torch.softmax(s.detach() / T, -1), torch.softmax(t / T, -1)
    m = beta * p + (1 - beta) * q
    rkl = (q * (q / p).log()).sum() / 7 * T * T
    jsd = (beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()) / 7 * T * T
    assert_close(distillation_loss(s, t, None, T, divergence="reverse_kl"), rkl)
    assert_close(distillation_loss(s, t, None, T, divergence="jsd", beta=beta), jsd)
    # gradcheck: the closed-form gradients of both
    for div in ("reverse_kl", "jsd"):
        x = s[:3, :5].detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, d=div: distillation_loss(x, t[:3, :5], None, T, divergence=d,
                                                                           beta=beta), (x,))


def test_kd_mask_distils_rows_without_labels():
    """DistilBERT: the KL over every non-padding token, the MLM CE over the masked ones, each its own mean."""
    s, t, labels = make_inputs(lead=(4, 6), V=17, n_ignored=18, dtype=torch.float64)
    kd_mask = torch.ones(4, 6, dtype=torch.bool)
    kd_mask[3, 4:] = False  # padding
    T = 2.0
    loss = distillation_loss(s, t, labels, T, alpha=0.6, kd_mask=kd_mask)
    s2, t2 = s.reshape(-1, 17), t.reshape(-1, 17)
    km = kd_mask.reshape(-1)
    kl = F.kl_div(F.log_softmax(s2[km] / T, -1), F.log_softmax(t2[km] / T, -1), log_target=True,
                  reduction="batchmean") * T * T
    ce = F.cross_entropy(s2, labels.reshape(-1))
    expected = 0.6 * kl + 0.4 * ce
    assert_close(loss, expected)
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(expected, s)[0])
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, t[:2], labels[:2], T, 0.6, kd_mask=kd_mask[:2]),
                                    (s[:2].detach().clone().requires_grad_(True),))


@pytest.mark.parametrize("with_labels", [True, False])
def test_reduction_none_per_row(with_labels):
    s, t, labels = make_inputs(lead=(3, 5), V=21)
    labels = labels if with_labels else None
    rows = distillation_loss(s, t, labels, 2.0, 0.3, reduction="none")
    assert rows.shape == (3, 5) and rows.dtype == torch.float32
    T, V = 2.0, 21
    kl = F.kl_div(F.log_softmax(s.reshape(-1, V) / T, -1), F.log_softmax(t.reshape(-1, V) / T, -1),
                  log_target=True, reduction="none").sum(-1) * T * T
    if with_labels:
        lab = labels.reshape(-1)
        ce = F.cross_entropy(s.reshape(-1, V), lab, reduction="none")
        expected = torch.where(lab != -100, 0.3 * kl + 0.7 * ce, 0.0).reshape(3, 5)
    else:
        expected = kl.reshape(3, 5)
    assert_close(rows, expected)
    w = torch.randn(3, 5)
    assert_close(torch.autograd.grad((rows * w).sum(), s)[0], torch.autograd.grad((expected * w).sum(), s)[0])


def test_incoming_gradient_scales():
    """The gradient is computed in the forward; the backward multiplies it by dloss (here 3, then 1)."""
    s, t, labels = make_inputs()
    (g3,) = torch.autograd.grad(distillation_loss(s, t, labels) * 3.0, s)
    (g1,) = torch.autograd.grad(distillation_loss(s, t, labels), s)
    assert_close(g3, 3.0 * g1)
    (g_ref,) = torch.autograd.grad(users_formula(s, t, labels, 2.0, 0.5) * 3.0, s)
    assert_close(g3, g_ref)


def test_grad_in_logits_reuses_the_buffer():
    """grad_in_logits=True: the gradient lands in the student logits' memory (no [N, V] allocation)."""
    h = torch.randn(12, 8, requires_grad=True)
    W = torch.randn(31, 8)
    t, labels = torch.randn(12, 31), torch.randint(0, 31, (12,))
    logits = h @ W.t()
    ptr = logits.data_ptr()
    loss = distillation_loss(logits, t, labels, grad_in_logits=True)
    (dh,) = torch.autograd.grad(loss, h)
    h2 = h.detach().clone().requires_grad_(True)
    (dh_ref,) = torch.autograd.grad(users_formula(h2 @ W.t(), t, labels, 2.0, 0.5), h2)
    assert_close(dh, dh_ref)
    # the logits now hold the (unscaled) gradient
    logits_ref = (h.detach() @ W.t()).requires_grad_(True)
    (g,) = torch.autograd.grad(users_formula(logits_ref, t, labels, 2.0, 0.5), logits_ref)
    assert logits.data_ptr() == ptr
    assert_close(logits.detach(), g)


def test_no_grad_path_computes_no_gradient():
    s, t, labels = make_inputs()
    with torch.no_grad():
        loss = distillation_loss(s, t, labels)
    assert not loss.requires_grad
    assert_close(loss, kd_math64(s, t, labels, 2.0, 0.5))


def test_torch_compile_temperature_changes_between_calls():
    """A float argument that changes between calls becomes a SymFloat in the 2nd trace: validation must only
    check its type then (math.isfinite on a SymFloat is unsupported by dynamo)."""
    s, t, labels = make_inputs(lead=(4, 3), V=16)

    def f(s, t, labels, T):
        return distillation_loss(s, t, labels, temperature=T, alpha=0.3)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for T in (2.0, 3.0, 1.5):
        loss_c = compiled(s, t, labels, T)
        assert_close(loss_c, f(s, t, labels, T), name=f"loss at T={T}")
        assert_close(torch.autograd.grad(loss_c, s)[0], torch.autograd.grad(f(s, t, labels, T), s)[0])
    with pytest.raises(TypeError, match=f"{OP}: temperature must be a number"):
        f(s, t, labels, "2")


# --------------------------------------------------------------------------------------------------
# fused_linear_distillation_loss: the heads inside the chunked loss == the unfused loss on full logits
# --------------------------------------------------------------------------------------------------
def _linear_inputs(N=29, H=12, Ht=20, V=41, r=3, dtype=torch.float64, bias=True, lora=True):
    h = torch.randn(N, H, dtype=dtype, requires_grad=True)
    W = (torch.randn(V, H, dtype=dtype) / 3).requires_grad_(True)
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    A = torch.randn(r, H, dtype=dtype, requires_grad=True) if lora else None
    B = torch.randn(V, r, dtype=dtype, requires_grad=True) if lora else None
    th, tW, tb = torch.randn(N, Ht, dtype=dtype), torch.randn(V, Ht, dtype=dtype) / 3, torch.randn(V, dtype=dtype)
    labels = torch.randint(0, V, (N,))
    labels[torch.randperm(N)[:6]] = -100
    return h, W, b, A, B, th, tW, tb, labels


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fused_linear_equals_unfused(lora, bias, chunk):
    h, W, b, A, B, th, tW, tb, labels = _linear_inputs(bias=bias, lora=lora)
    leaves = [x for x in (h, W, b, A, B) if x is not None]
    loss = fused_linear_distillation_loss(h, W, th, tW, labels, student_bias=b, teacher_bias=tb, lora_A=A, lora_B=B,
                                          lora_scaling=0.7, temperature=1.5, alpha=0.4, chunk_size=chunk) * 1.7
    logits = h @ W.t() + (b if bias else 0.0) + (0.7 * (h @ A.t()) @ B.t() if lora else 0.0)
    ref = distillation_loss(logits, th @ tW.t() + tb, labels, 1.5, 0.4) * 1.7
    theirs = users_formula(logits, th @ tW.t() + tb, labels, 1.5, 0.4) * 1.7
    assert_close(loss, ref, name="loss vs unfused")
    assert_close(loss, theirs, name="loss vs F.kl_div + F.cross_entropy")
    names = [n for n, x in zip(["dh", "dW", "db", "dA", "dB"], (h, W, b, A, B)) if x is not None]
    for name, g, g_ref in zip(names, torch.autograd.grad(loss, leaves), torch.autograd.grad(theirs, leaves)):
        assert_close(g, g_ref, name=name)


@pytest.mark.parametrize("kw", [dict(divergence="reverse_kl"), dict(divergence="jsd", beta=0.2),
                                dict(reduction="sum"), dict(kd_mask=True), dict(labels=None)])
def test_fused_linear_options_and_teacher_logits(kw):
    h, W, b, A, B, th, tW, tb, labels = _linear_inputs(bias=False)
    kw = dict(kw)
    if kw.pop("kd_mask", False):
        kw["kd_mask"] = torch.rand(h.shape[0]) < 0.6
    labels = kw.pop("labels", labels)
    t_logits = th @ tW.t()
    loss = fused_linear_distillation_loss(h, W, labels=labels, teacher_logits=t_logits, lora_A=A, lora_B=B,
                                          chunk_size=5, **kw)
    ref = distillation_loss(h @ W.t() + (h @ A.t()) @ B.t(), t_logits, labels, **kw)
    assert_close(loss, ref)
    for g, g_ref in zip(torch.autograd.grad(loss, (h, W, A, B)), torch.autograd.grad(ref, (h, W, A, B))):
        assert_close(g, g_ref)


def test_fused_linear_frozen_head_gets_no_gradient():
    """A frozen head (the LoRA case): only the hidden states and the adapters get gradients, none computed for W."""
    h, W, _, A, B, th, tW, _, labels = _linear_inputs(bias=False)
    W.requires_grad_(False)
    loss = fused_linear_distillation_loss(h, W, th, tW, labels, lora_A=A, lora_B=B, chunk_size=8)
    loss.backward()
    assert W.grad is None and h.grad is not None and A.grad is not None and B.grad is not None
    ref = distillation_loss(h @ W.t() + (h @ A.t()) @ B.t(), th @ tW.t(), labels)
    for x, g_ref in zip((h, A, B), torch.autograd.grad(ref, (h, A, B))):
        assert_close(x.grad, g_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_linear_low_precision(dtype):
    """bf16/fp16 hidden states and heads, fp32 LoRA masters: within ~2x eager PyTorch's error vs float64."""
    h, W, _, A, B, th, tW, _, labels = _linear_inputs(N=64, H=32, Ht=32, V=97, bias=False, dtype=torch.float32)
    A32, B32 = A.detach().requires_grad_(True), B.detach().requires_grad_(True)
    low = [x.detach().to(dtype).requires_grad_(x.requires_grad) for x in (h, W, th, tW)]
    hl, Wl, thl, tWl = low
    loss = fused_linear_distillation_loss(hl, Wl, thl, tWl, labels, lora_A=A32, lora_B=B32, chunk_size=16)
    g = torch.autograd.grad(loss, (hl, Wl, A32, B32))
    assert g[0].dtype == dtype and g[2].dtype == torch.float32
    hl2, Wl2 = hl.detach().requires_grad_(True), Wl.detach().requires_grad_(True)
    A2, B2 = A32.detach().requires_grad_(True), B32.detach().requires_grad_(True)
    eager = users_formula(hl2 @ Wl2.t() + (hl2 @ A2.to(dtype).t()) @ B2.to(dtype).t(), thl @ tWl.t(), labels, 2.0, 0.5)
    g_eager = torch.autograd.grad(eager, (hl2, Wl2, A2, B2))
    x64 = [x.detach().double().requires_grad_(True) for x in (hl, Wl, A32, B32)]
    oracle = users_formula(x64[0] @ x64[1].t() + (x64[0] @ x64[2].t()) @ x64[3].t(),
                           thl.double() @ tWl.double().t(), labels, 2.0, 0.5)
    g64 = torch.autograd.grad(oracle, x64)
    assert_close(loss, oracle, dtype=torch.bfloat16, name="loss")
    for name, ours, theirs, ref in zip(["dh", "dW", "dA", "dB"], g, g_eager, g64):
        assert_within_eager_error(ours, theirs, ref, name=name)


@pytest.mark.parametrize("over, exc, match", [
    (dict(student_weight=torch.randn(41, 13, dtype=torch.float64)), ValueError, "student_weight of shape"),
    (dict(lora_B=None), ValueError, "lora_A and lora_B go together"),
    (dict(teacher_hidden=None), ValueError, "pass teacher_hidden and teacher_weight"),
    (dict(teacher_logits=torch.randn(29, 41, dtype=torch.float64)), ValueError, "pass teacher_logits or"),
    (dict(labels=torch.zeros(28, dtype=torch.long)), ValueError, r"labels has shape \(28,\)"),
    (dict(reduction="none"), ValueError, r"reduction must be one of \('mean', 'sum'\)"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(ignore_index=2**70), ValueError, "ignore_index must fit in int64"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
])
def test_fused_linear_validation(over, exc, match):
    h, W, _, A, B, th, tW, _, labels = _linear_inputs(bias=False)
    args = dict(student_hidden=h, student_weight=W, teacher_hidden=th, teacher_weight=tW, labels=labels, lora_A=A,
                lora_B=B)
    args.update(over)
    with pytest.raises(exc, match=f"fused_linear_distillation_loss: {match}"):
        fused_linear_distillation_loss(**args)


def test_fused_linear_opcheck_and_compile():
    h, W, b, A, B, th, tW, tb, labels = _linear_inputs(N=9, H=6, Ht=5, V=11, r=2, dtype=torch.float32)
    fwd, bwd = FAMILY_LINEAR.custom_ops
    record = LinearDistillInputs(h, W, b, A, B, th, tW, tb, None, labels, None, 0.5, 2.0, 0.5, -100, "mean",
                                 "forward_kl", 0.5, 4, 0b11111)
    torch.library.opcheck(fwd, (*record, "reference", "reference"))

    def f(h, W, b, A, B, th, tW, tb, labels, T):
        return fused_linear_distillation_loss(h, W, th, tW, labels, student_bias=b, teacher_bias=tb, lora_A=A,
                                              lora_B=B, lora_scaling=0.5, temperature=T, chunk_size=4)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for T in (2.0, 3.0):
        args = (h, W, b, A, B, th, tW, tb, labels, T)
        loss_c, loss = compiled(*args), f(*args)
        assert_close(loss_c, loss)
        for g_c, g in zip(torch.autograd.grad(loss_c, (h, W, b, A, B)), torch.autograd.grad(loss, (h, W, b, A, B))):
            assert_close(g_c, g)


# --------------------------------------------------------------------------------------------------
# GPU: the CUDA C++ and Triton backends against the reference, peak memory (skipped without CUDA)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_backend_matches_reference(backend, dtype, divergence, reduction):
    import peft_kernels

    N, V = 67, 32001
    s = (torch.randn(N, V, device="cuda") * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(N, V, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[::7] = -100
    kw = dict(reduction=reduction, divergence=divergence, beta=0.3)
    with peft_kernels.use_backend(backend, strict=True):
        loss = distillation_loss(s, t, labels, 1.7, 0.4, **kw)
    s64 = s.detach().double().requires_grad_(True)
    ref = distillation_loss_reference(s64, t.double(), labels, 1.7, 0.4, **kw)
    assert_close(loss, ref, dtype=torch.float32, rtol=1e-4, atol=1e-4, name="loss")
    w = torch.randn(loss.shape, device="cuda")
    (g,) = torch.autograd.grad((loss * w).sum(), s)
    (g64,) = torch.autograd.grad((ref * w.double()).sum(), s64)
    eager = distillation_loss_reference(s, t, labels, 1.7, 0.4, **kw)
    (g_eager,) = torch.autograd.grad((eager * w).sum(), s)
    if dtype == torch.float32:
        assert_close(g, g64, rtol=1e-4, atol=1e-6, name="ds")
    else:
        assert_within_eager_error(g, g_eager, g64, name="ds")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_nonfinite_and_grad_in_logits(backend):
    import peft_kernels

    s = torch.randn(8, 1000, device="cuda", requires_grad=True)
    t = torch.randn(8, 1000, device="cuda")
    labels = torch.randint(0, 1000, (8,), device="cuda")
    t_bad = t.clone()
    t_bad[2, 5] = float("nan")
    with peft_kernels.use_backend(backend, strict=True):
        rows = distillation_loss(s, t_bad, labels, reduction="none")
        assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5, 6, 7]]).all()
        h = torch.randn(8, 16, device="cuda", requires_grad=True)
        W = torch.randn(1000, 16, device="cuda")
        (dh,) = torch.autograd.grad(distillation_loss(h @ W.t(), t, labels, grad_in_logits=True) * 2.0, h)
    (dh_ref,) = torch.autograd.grad(distillation_loss_reference(h @ W.t(), t, labels) * 2.0, h)
    assert_close(dh, dh_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_peak_memory_is_the_gradient_buffer(backend):
    """Forward + backward hold one [N, V] gradient buffer beyond the inputs (target: peak <= 1.2x the logits)."""
    import peft_kernels

    N, V = 4096, 32000
    s = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    with peft_kernels.use_backend(backend, strict=True):
        distillation_loss(s, t, labels).backward()  # warm-up (compiles, caches)
        s.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        distillation_loss(s, t, labels).backward()
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= 1.2 * s.numel() * s.element_size(), f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_gpu_fused_linear_memory_and_match():
    N, H, V = 2048, 512, 32000
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / H**0.5).requires_grad_(True)
    th = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    tW = torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    labels = torch.randint(0, V, (N,), device="cuda")
    fused_linear_distillation_loss(h, W, th, tW, labels).backward()
    h.grad = W.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fused_linear_distillation_loss(h, W, th, tW, labels)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    logits_bytes = N * V * 2
    assert peak < logits_bytes, f"peak {peak / 2**20:.0f} MiB: the fused loss must not hold the full logits"
    x64 = [x.detach().double().requires_grad_(True) for x in (h, W)]
    ref = distillation_loss_reference(x64[0] @ x64[1].t(), th.double() @ tW.double().t(), labels, upcast=True)
    assert_close(loss, ref, dtype=torch.bfloat16, name="loss")
    g64 = torch.autograd.grad(ref, x64)
    for name, g, gr in zip(["dh", "dW"], (h.grad, W.grad), g64):
        assert rel_err(g, gr) < 2e-2, name


def test_grad_in_logits_is_ignored_under_compile():
    s, t, labels = make_inputs(lead=(6,), V=13)
    logits = s.detach().clone().requires_grad_(True)
    kept = logits.detach().clone()

    def f(x):
        return distillation_loss(x, t, labels, grad_in_logits=True)

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(logits)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.equal(logits.detach(), kept), "a compiled graph must not overwrite its input"
    assert_close(g, torch.autograd.grad(users_formula(s, t, labels, 2.0, 0.5), s)[0])


def test_fused_linear_label_range_error_names_itself_and_the_head():
    h, W = torch.randn(4, 8), torch.randn(13, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 13, -100])
    with pytest.raises(ValueError, match=r"fused_linear_distillation_loss: labels must be in \[0, 13\) \(the head's "
                                         r"out_features\).*got 13"):
        fused_linear_distillation_loss(h, W, labels=labels, teacher_logits=torch.randn(4, 13))
