"""Triton distillation-loss kernel (and the public ops on the triton backend) vs F.kl_div + F.cross_entropy in
float64: every divergence, reduction, kd_mask, all-ignored rows, non-finite and ±1e4 logits, vocabularies that
are not a multiple of the block, the gradient written over the logits, the in-place scale kernel, and the
fused-linear variant over the row kernel.

Runs under TRITON_INTERPRET=1 on CPU tensors (fp32/fp16, few rows), or natively when CUDA is present.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close, assert_within_eager_error, triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

import peft_kernels  # noqa: E402
from peft_kernels import _config  # noqa: E402
from peft_kernels.ops.distill import distillation_loss, distillation_loss_reference  # noqa: E402
from peft_kernels.ops.distill_linear import fused_linear_distillation_loss  # noqa: E402
from peft_kernels.triton import distill as tk  # noqa: E402

LOW = [torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def make(N=7, V=37, dtype=torch.float32, n_ignored=2, scale=3.0):
    s = (torch.randn(N, V, device=DEV) * scale).to(dtype).requires_grad_(True)
    t = (torch.randn(N, V, device=DEV) * scale).to(dtype)
    labels = torch.randint(0, V, (N,), device=DEV)
    labels[torch.randperm(N)[:n_ignored]] = -100
    return s, t, labels


def run_triton(*args, **kwargs):
    with peft_kernels.use_backend("triton", strict=True), _config.poison():
        return distillation_loss(*args, **kwargs)


def oracle(s, t, labels, *args, **kwargs):
    s64 = s.detach().double().requires_grad_(True)
    loss = distillation_loss_reference(s64, t.double(), labels, *args, upcast=True, **kwargs)
    return loss, s64


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_fp32_vs_float64(divergence, reduction, with_labels):
    s, t, labels = make()
    labels = labels if with_labels else None
    kw = dict(reduction=reduction, divergence=divergence, beta=0.3)
    loss = run_triton(s, t, labels, 1.7, 0.4, **kw)
    ref, s64 = oracle(s, t, labels, 1.7, 0.4, **kw)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, rtol=2e-5, atol=2e-5, name="loss")
    w = torch.randn(loss.shape, device=DEV, dtype=torch.float64)
    (g,) = torch.autograd.grad((loss * w.float()).sum(), s)
    (g64,) = torch.autograd.grad((ref * w).sum(), s64)
    assert_close(g, g64, rtol=1e-4, atol=2e-6, name="ds")


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_users_formula_and_tails(T):
    """V = 300 with 64-wide blocks under the interpreter: five blocks, the last one partly masked."""
    s, t, labels = make(N=5, V=300)
    with _config.override_interpret_blocks(distill=64):
        loss = run_triton(s, t, labels, T, 0.6)
    valid = labels != -100
    kl = F.kl_div(F.log_softmax(s[valid] / T, -1), F.log_softmax(t[valid] / T, -1), log_target=True,
                  reduction="batchmean") * T * T
    theirs = 0.6 * kl + 0.4 * F.cross_entropy(s, labels)
    assert_close(loss, theirs, rtol=2e-5, name="loss")
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(theirs, s)[0], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("V", [32001, 50257])
def test_large_odd_vocab(V):
    s, t, labels = make(N=2, V=V, n_ignored=0)
    with _config.override_interpret_blocks(distill=8192):
        loss = run_triton(s, t, labels, 2.0, 0.5)
    ref, s64 = oracle(s, t, labels, 2.0, 0.5)
    assert_close(loss, ref, rtol=2e-5, name="loss")
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s64)[0], rtol=1e-4, atol=1e-7)


def test_all_rows_ignored_and_kd_mask():
    s, t, labels = make(N=6, V=19)
    labels.fill_(-100)
    for reduction in ("mean", "sum", "none"):
        loss = run_triton(s, t, labels, reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss))
        (g,) = torch.autograd.grad(loss.sum(), s)
        assert torch.equal(g, torch.zeros_like(g))
    # kd_mask distils rows that have no label; the CE is over none of them
    kd_mask = torch.tensor([True, False, True, True, False, True], device=DEV)
    loss = run_triton(s, t, labels, 2.0, 0.5, kd_mask=kd_mask)
    ref, s64 = oracle(s, t, labels, 2.0, 0.5, kd_mask=kd_mask)
    assert_close(loss, ref, rtol=2e-5)
    assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s64)[0], rtol=1e-4, atol=2e-6)


def test_ignored_rows_are_not_read():
    s, t, labels = make(N=6, V=23, n_ignored=0)
    labels[[1, 4]] = -100
    s_bad, t_bad = s.detach().clone(), t.clone()
    s_bad[1], t_bad[4] = float("nan"), float("inf")
    s_bad.requires_grad_(True)
    loss = run_triton(s_bad, t_bad, labels)
    ref, s64 = oracle(s, t, labels)
    assert_close(loss, ref, rtol=2e-5)
    (g,) = torch.autograd.grad(loss, s_bad)
    assert torch.equal(g[[1, 4]], torch.zeros(2, 23, device=DEV))
    assert_close(g, torch.autograd.grad(ref, s64)[0], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("who", ["teacher", "student"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_nonfinite_gives_nan(who, bad, divergence):
    s, t, labels = make(N=5, V=29, n_ignored=0)
    x = s.detach().clone() if who == "student" else t.clone()
    x[2, 7] = bad
    s2, t2 = (x.requires_grad_(True), t) if who == "student" else (s, x)
    rows = run_triton(s2, t2, labels, reduction="none", divergence=divergence, beta=0.3)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4]]).all()
    assert torch.isnan(run_triton(s2, t2, labels, divergence=divergence, beta=0.3))


def test_masked_teacher_vocab_entries():
    s, t, labels = make(N=4, V=40, n_ignored=0)
    t[:, :20] = float("-inf")  # a whole first block masked: the online max starts at -inf
    labels = labels.clamp_min(20)
    with _config.override_interpret_blocks(distill=16):
        loss = run_triton(s, t, labels, 2.0, 0.5)
    ref = distillation_loss(s, t, labels, 2.0, 0.5)  # the reference backend (0 · log 0 = 0)
    assert torch.isfinite(loss)
    assert_close(loss, ref, rtol=2e-5)
    with peft_kernels.use_backend("reference"):
        (g_ref,) = torch.autograd.grad(distillation_loss(s, t, labels, 2.0, 0.5), s)
    assert_close(torch.autograd.grad(loss, s)[0], g_ref, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_logits(dtype):
    s, t, labels = make(N=4, V=33, scale=1.0, n_ignored=1)
    s = (s.detach().sign() * (1e4 if dtype == torch.float32 else 3e4) + s.detach()).to(dtype).requires_grad_(True)
    t = (t.sign() * 1e4 - t).to(dtype)
    loss = run_triton(s, t, labels, 1.5, 0.5)
    ref, s64 = oracle(s, t, labels, 1.5, 0.5)
    assert torch.isfinite(loss)
    assert_close(loss, ref, dtype=torch.float32, name="loss")
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(g).all()
    assert_close(g, torch.autograd.grad(ref, s64)[0].to(dtype), dtype=dtype, name="ds")


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_within_eager_error(dtype):
    s, t, labels = make(N=9, V=70, dtype=dtype)
    loss = run_triton(s, t, labels, 2.0, 0.5)
    ref, s64 = oracle(s, t, labels, 2.0, 0.5)
    assert_close(loss, ref, dtype=torch.float32, rtol=1e-5, atol=1e-5, name="loss: fp32 math on the half logits")
    (g,) = torch.autograd.grad(loss, s)
    eager = distillation_loss_reference(s, t, labels, 2.0, 0.5)  # F.kl_div + F.cross_entropy on the half logits
    (g_eager,) = torch.autograd.grad(eager, s)
    assert g.dtype == dtype
    assert_within_eager_error(g, g_eager, torch.autograd.grad(ref, s64)[0], name="ds")


def test_grad_into_logits_and_scale_kernel():
    """The gradient written over the student logits (grad_out = s); the scale kernel multiplies in place and
    leaves ds alone for a factor of 1."""
    s, t, labels = make(N=5, V=41)
    ds = torch.full_like(s.detach(), float("nan"))
    counts = torch.tensor([3.0, 3.0], device=DEV)
    rows = tk.distill_forward(s.detach(), t, labels, None, counts, 2.0, 0.5, 0.5, -100, True, "forward_kl", 0.5, ds)
    buf = s.detach().clone()
    rows2 = tk.distill_forward(buf, t, labels, None, counts, 2.0, 0.5, 0.5, -100, True, "forward_kl", 0.5, buf)
    assert torch.equal(rows, rows2) and torch.equal(ds, buf)
    ref, s64 = oracle(s, t, labels, 2.0, 0.5)
    assert_close(ds, torch.autograd.grad(ref, s64)[0], rtol=1e-4, atol=2e-6)
    before = ds.clone()
    tk.scale_grad_(ds, torch.ones((), device=DEV))
    assert torch.equal(ds, before)
    tk.scale_grad_(ds, torch.full((), 2.5, device=DEV))
    assert_close(ds, before * 2.5)
    per_row = torch.arange(5, device=DEV, dtype=torch.float32)
    tk.scale_grad_(ds, per_row)
    assert_close(ds, before * 2.5 * per_row[:, None])


def test_public_grad_in_logits_on_triton():
    h = torch.randn(6, 8, device=DEV, requires_grad=True)
    W = torch.randn(29, 8, device=DEV)
    t, labels = torch.randn(6, 29, device=DEV), torch.randint(0, 29, (6,), device=DEV)
    with peft_kernels.use_backend("triton", strict=True):
        loss = distillation_loss(h @ W.t(), t, labels, grad_in_logits=True) * 3.0
    (dh,) = torch.autograd.grad(loss, h)
    h2 = h.detach().clone().requires_grad_(True)
    (dh_ref,) = torch.autograd.grad(distillation_loss_reference(h2 @ W.t(), t, labels) * 3.0, h2)
    assert_close(dh, dh_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("teacher_logits", [False, True])
def test_fused_linear_on_triton_rows(lora, teacher_logits):
    N, H, Ht, V, r = 11, 16, 12, 45, 4
    h = torch.randn(N, H, device=DEV, requires_grad=True)
    W = (torch.randn(V, H, device=DEV) / 4).requires_grad_(True)
    A = torch.randn(r, H, device=DEV, requires_grad=True) if lora else None
    B = torch.randn(V, r, device=DEV, requires_grad=True) if lora else None
    th, tW = torch.randn(N, Ht, device=DEV), torch.randn(V, Ht, device=DEV) / 4
    labels = torch.randint(0, V, (N,), device=DEV)
    labels[:3] = -100
    t_kw = dict(teacher_logits=th @ tW.t()) if teacher_logits else dict(teacher_hidden=th, teacher_weight=tW)
    leaves = [x for x in (h, W, A, B) if x is not None]
    with peft_kernels.use_backend("triton", strict=True):
        loss = fused_linear_distillation_loss(h, W, labels=labels, lora_A=A, lora_B=B, lora_scaling=0.5,
                                              chunk_size=4, **t_kw) * 2.0
    grads = torch.autograd.grad(loss, leaves)
    logits = h @ W.t() + (0.5 * (h @ A.t()) @ B.t() if lora else 0.0)
    ref = distillation_loss_reference(logits, th @ tW.t(), labels) * 2.0
    ref_grads = torch.autograd.grad(ref, leaves)
    assert_close(loss, ref, rtol=1e-4, name="loss")
    for name, g, gr in zip(["dh", "dW", "dA", "dB"], grads, ref_grads):
        assert_close(g, gr, rtol=2e-4, atol=2e-5, name=name)
