"""The CPU `cpp` backends of distillation_loss (csrc/distill.cpp) and soft_prompt_embed (csrc/prompt.cpp), their
C++ autograd nodes, the CPU dispatch rule that prefers them, and the public functions' steady-state paths (a
cached lookup per validated signature: scalars still checked on every call, a new signature re-validated)."""

from __future__ import annotations

import itertools

import pytest
import torch

import peft_kernels
from peft_kernels.ops import distill as distill_mod
from peft_kernels.ops import prompt as prompt_mod
from peft_kernels.ops.distill import DistillInputs, distillation_loss
from peft_kernels.ops.prompt import PromptInputs, prompt_maps, soft_prompt_embed
from tests.helpers import assert_close

needs_native = pytest.mark.skipif(distill_mod._CPP_NODE is None or prompt_mod._CPP_NODE is None,
                                  reason="peft_kernels._C without the CPU distill/prompt kernels")
pytestmark = needs_native

KD = "distillation_loss"
SP = "soft_prompt_embed"


def _kd_inputs(N=13, V=17, dtype=torch.float32, tdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = (torch.randn(N, V, generator=g) * 3).to(tdtype or dtype)
    t[:, V - 2:] = float("-inf")  # a masked vocabulary slice: 0 log 0 = 0
    labels = torch.randint(0, V - 2, (N,), generator=g)
    labels[[2, 5]] = -100
    kd_mask = torch.rand(N, generator=g) > 0.3
    return s, t, labels, kd_mask


def _forced(backend, fn, *args, **kwargs):
    with peft_kernels.use_backend(backend, strict=True):
        return fn(*args, **kwargs)


def _loss_and_grad(backend, s, *args, **kwargs):
    s = s.detach().clone().requires_grad_(True)
    loss = _forced(backend, distillation_loss, s, *args, **kwargs)
    w = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=loss.dtype) if loss.dim() else 1.0
    (g,) = torch.autograd.grad((loss * w).sum(), s)
    return loss.detach(), g


# --------------------------------------------------------------------------------------------------
# distillation_loss: the cpp backend against the reference backend
# --------------------------------------------------------------------------------------------------
def test_cpu_dispatch_prefers_cpp():
    s, t, labels, _ = _kd_inputs()
    s.requires_grad_(True)
    inputs = DistillInputs(s, t, labels, None, 2.0, 0.5, -100, "mean", "forward_kl", 0.5, True, False)
    assert distill_mod.FAMILY.select(inputs) == ("cpp", "cpp")
    ids, weight, prompt = torch.randint(0, 9, (2, 3)), torch.randn(9, 4), torch.randn(2, 4, requires_grad=True)
    assert prompt_mod.FAMILY.select(PromptInputs(ids, weight, prompt, None, None)) == ("cpp", "cpp")
    # The steady-state path then ends in the C++ autograd node.
    loss = distillation_loss(s, t, labels)
    assert type(loss.grad_fn).__name__ != "_EagerFunctionBackward"
    assert type(soft_prompt_embed(ids, weight, prompt).grad_fn).__name__ != "_EagerFunctionBackward"


CASES = list(itertools.product(
    [torch.float32, torch.float64, torch.bfloat16], ["forward_kl", "reverse_kl", "jsd"], ["mean", "sum", "none"],
    [1.0, 2.0], [True, False], [False, True]))


@pytest.mark.parametrize("dtype, divergence, reduction, T, with_labels, with_mask", CASES)
def test_cpp_matches_reference(dtype, divergence, reduction, T, with_labels, with_mask):
    s, t, labels, kd_mask = _kd_inputs(dtype=dtype, seed=len(divergence) + int(T))
    labels = labels if with_labels else None
    kd_mask = kd_mask if with_mask else None
    if divergence == "reverse_kl":  # KL(q || p) is +inf where the teacher masks an entry the student gives mass
        t[:, -2:] = 0.5
    # Rows that carry no term may hold garbage: they are never read and get a zero gradient.
    if labels is not None and kd_mask is None:
        s[2], t[5] = float("nan"), float("inf")
    if kd_mask is not None:
        t[~kd_mask] = float("nan")
    kw = dict(temperature=T, alpha=0.3, reduction=reduction, divergence=divergence, beta=0.4, kd_mask=kd_mask)
    loss, g = _loss_and_grad("cpp", s, t, labels, **kw)
    loss_ref, g_ref = _loss_and_grad("reference", s, t, labels, **kw)
    assert loss.dtype == loss_ref.dtype and g.dtype == g_ref.dtype == dtype and loss.shape == loss_ref.shape
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    assert_close(loss, loss_ref, **tol, name="loss")
    assert_close(g, g_ref, **tol, name="grad")
    if labels is not None and kd_mask is None:
        assert torch.equal(g[[2, 5]], torch.zeros(2, s.shape[1], dtype=dtype))


@pytest.mark.parametrize("divergence, T", [("forward_kl", 2.0), ("forward_kl", 1.0), ("forward_kl", 1.3),
                                           ("reverse_kl", 2.0), ("jsd", 0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_matches_reference_over_several_row_chunks(divergence, T, dtype):
    """N x V above the kernel's chunk (2^18 elements; here 2 chunks) and above its vectorized-exp threshold."""
    s, t, labels, _ = _kd_inputs(N=70, V=4000, dtype=dtype, seed=11)
    if divergence == "reverse_kl":
        t[:, -2:] = 0.5
    s[2], t[5] = float("nan"), float("inf")  # ignored rows
    kw = dict(temperature=T, alpha=0.6, divergence=divergence, beta=0.3)
    loss, g = _loss_and_grad("cpp", s, t, labels, **kw)
    loss_ref, g_ref = _loss_and_grad("reference", s, t, labels, **kw)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    assert_close(loss, loss_ref, **tol, name="loss")
    assert_close(g, g_ref, **tol, name="grad")
    assert torch.equal(g[[2, 5]], torch.zeros(2, 4000, dtype=dtype))


def test_cpp_teacher_of_another_dtype_and_int32_labels():
    s, t, labels, _ = _kd_inputs(dtype=torch.bfloat16, tdtype=torch.float32)
    for backend in ("cpp", "reference"):
        loss, g = _loss_and_grad(backend, s, t, labels.to(torch.int32))
        if backend == "cpp":
            out = (loss, g)
    assert_close(out[0], loss, rtol=2e-2, atol=2e-2)
    assert_close(out[1], g, rtol=2e-2, atol=2e-2)


def test_cpp_strided_rows_in_place_and_backward_twice():
    s, t, labels, _ = _kd_inputs(N=9, V=11)
    wide = torch.randn(9, 20)
    wide[:, :11] = s
    view = wide[:, :11]  # rows 20 apart: read in place, no copy
    loss, g = _loss_and_grad("cpp", view, t, labels)
    loss_c, g_c = _loss_and_grad("cpp", s, t, labels)
    assert torch.equal(loss, loss_c) and torch.equal(g, g_c)
    # grad_in_logits: the gradient lands in the caller's buffer; the same values as a separate buffer.
    buf = s.clone().requires_grad_(True)
    loss_ip = distillation_loss(buf, t, labels, grad_in_logits=True)
    (g_ip,) = torch.autograd.grad(loss_ip, buf)
    assert torch.equal(g_ip, g_c) and torch.equal(buf.detach(), g_c)
    # The node's backward is a pure function of the saved gradient: a second backward gives the same.
    x = s.clone().requires_grad_(True)
    out = distillation_loss(x, t, labels)
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out * 1.0, x)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpp_gradcheck(divergence, reduction):
    s, t, labels, kd_mask = _kd_inputs(N=7, V=6, dtype=torch.float64)
    if divergence == "reverse_kl":
        t[:, -2:] = 0.5  # finite: KL(q || p) is +inf at a masked teacher entry
    s.requires_grad_(True)
    with peft_kernels.use_backend("cpp", strict=True):
        assert torch.autograd.gradcheck(lambda x: distillation_loss(
            x, t, labels, 1.7, 0.4, reduction=reduction, divergence=divergence, beta=0.3, kd_mask=kd_mask), (s,))


def test_cpp_label_range_error():
    s, t, labels, _ = _kd_inputs()
    labels[4] = 17
    with pytest.raises(ValueError, match=rf"{KD}: labels must be in \[0, 17\).*ignore_index=-100; got 17 \(1 such"):
        _forced("cpp", distillation_loss, s, t, labels)


def test_reference_row_chunks_agree_when_forced(monkeypatch):
    """The reference backend's row chunking (the CPU default is now the C++ loop, which has no chunks)."""
    s, t, labels, _ = _kd_inputs(N=123, V=40, dtype=torch.bfloat16)
    loss, g = _loss_and_grad("reference", s, t, labels)
    monkeypatch.setattr(distill_mod, "_CHUNK_ELEMS", 40 * 7)
    loss_c, g_c = _loss_and_grad("reference", s, t, labels)
    assert_close(loss_c, loss, dtype=torch.float32)
    assert torch.equal(g_c, g)


# --------------------------------------------------------------------------------------------------
# distillation_loss: the steady-state path
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, exc, match", [
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-2.0), ValueError, "temperature must be > 0"),
    (dict(temperature="2"), TypeError, "temperature must be a number"),
    (dict(alpha=1.5), ValueError, r"alpha must be in \[0.0, 1.0\]"),
    (dict(alpha=float("nan")), ValueError, "alpha must be finite"),
    (dict(beta=1.0), ValueError, r"beta must be in \(0.0, 1.0\)"),
    (dict(ignore_index=True), TypeError, "ignore_index must be an int"),
    (dict(ignore_index=2**70), ValueError, "ignore_index must fit in int64"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
])
def test_steady_state_still_checks_scalars(kw, exc, match):
    s, t, labels, _ = _kd_inputs()
    s.requires_grad_(True)
    base = dict(temperature=2.0, alpha=0.5, ignore_index=-100, reduction="mean", divergence="forward_kl", beta=0.5)
    distillation_loss(s, t, labels, **base)  # cached
    distillation_loss(s, t, labels, **base)  # steady state
    with pytest.raises(exc, match=f"{KD}: {match}"):
        distillation_loss(s, t, labels, **{**base, **kw})


def test_steady_state_revalidates_a_new_signature():
    s, t, labels, _ = _kd_inputs(N=6, V=5)
    labels.clamp_(0, 4)
    distillation_loss(s, t, labels)
    distillation_loss(s, t, labels)
    with pytest.raises(ValueError, match=f"{KD}: labels has shape"):
        distillation_loss(s, t, labels[:5])
    with pytest.raises(ValueError, match=f"{KD}: teacher_logits has shape"):
        distillation_loss(s, t[:, :4], labels)
    with pytest.raises(TypeError, match=f"{KD}: labels must have dtype"):
        distillation_loss(s, t, labels.float())
    bad = labels.clone()
    bad[0] = 5  # the same signature: the data-dependent range check runs in the kernel on every call
    with pytest.raises(ValueError, match=f"{KD}: labels must be in"):
        distillation_loss(s, t, bad)


def test_temperature_schedule_uses_one_cache_entry():
    s, t, labels, _ = _kd_inputs()
    t[:, -2:] = 0.5  # finite: the F.kl_div oracle gives NaN at a masked teacher entry
    s.requires_grad_(True)
    distillation_loss(s, t, labels, temperature=1.5)
    entries = len(distill_mod.FAMILY._calls)
    for T in (1.0, 1.25, 2.0, 3.75, 4):  # an int temperature too
        loss = distillation_loss(s, t, labels, temperature=T, alpha=0.25)
        ref = distill_mod.distillation_loss_reference(s, t, labels, temperature=T, alpha=0.25)
        assert_close(loss, ref)
    assert len(distill_mod.FAMILY._calls) == entries


def test_no_grad_and_grad_modes_are_separate_entries():
    s, t, labels, _ = _kd_inputs()
    s.requires_grad_(True)
    with torch.no_grad():
        a = distillation_loss(s, t, labels)
    assert not a.requires_grad
    b = distillation_loss(s, t, labels)
    assert b.requires_grad and torch.equal(a, b.detach())


# --------------------------------------------------------------------------------------------------
# soft_prompt_embed: the cpp backend against the reference backend, and the steady-state path
# --------------------------------------------------------------------------------------------------
def _sp_inputs(B=3, S=7, V=20, H=6, P=4, batched=False, dtype=torch.float32, pdtype=None, train_weight=False):
    g = torch.Generator().manual_seed(B * S + P)
    ids = torch.randint(0, V, (B, S), generator=g)
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_(train_weight)
    prompt = torch.randn(*((B,) if batched else ()), P, H, generator=g).to(pdtype or dtype).requires_grad_(True)
    return ids, weight, prompt


def _sp_run(backend, ids, weight, prompt, **kw):
    w, p = weight.detach().clone().requires_grad_(weight.requires_grad), prompt.detach().clone().requires_grad_(True)
    out = _forced(backend, soft_prompt_embed, ids, w, p, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    wanted = [x for x in (w, p) if x.requires_grad]
    return out, torch.autograd.grad(out, wanted, dout)


@pytest.mark.parametrize("dtype, pdtype", [(torch.float32, None), (torch.float64, None),
                                           (torch.bfloat16, torch.float32), (torch.float16, None)])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("template", [None, "shared", "per_example"])
@pytest.mark.parametrize("train_weight", [False, True])
def test_prompt_cpp_matches_reference(dtype, pdtype, batched, template, train_weight):
    ids, weight, prompt = _sp_inputs(batched=batched, dtype=dtype, pdtype=pdtype, train_weight=train_weight)
    kw = {}
    if template == "shared":
        kw["positions"] = [0, 2, 2, 7]
    elif template == "per_example":
        kw["maps"] = prompt_maps(torch.tensor([[0, 1, 5, 7], [3, 3, 3, 3], [0, 0, 6, 6]]), 7, 4)
    out, grads = _sp_run("cpp", ids, weight, prompt, **kw)
    out_ref, grads_ref = _sp_run("reference", ids, weight, prompt, **kw)
    assert out.dtype == dtype and torch.equal(out, out_ref)  # row copies: exact
    for a, e in zip(grads, grads_ref):
        assert a.dtype == e.dtype
        # fp32 sums in another order: exact up to one rounding to a 16-bit dtype.
        tight = a.dtype in (torch.float32, torch.float64)
        assert_close(a, e, rtol=1e-6 if tight else None, atol=1e-6 if tight else None)


def test_prompt_cpp_strided_weight_and_int32_ids():
    ids, weight, prompt = _sp_inputs(H=6)
    wt = weight.detach().t().contiguous().t()  # [V, H] with column-major strides
    a = _forced("cpp", soft_prompt_embed, ids.to(torch.int32), wt, prompt)
    assert torch.equal(a, prompt_mod.soft_prompt_embed_reference(ids, weight, prompt))


def test_prompt_cpp_gradcheck():
    ids, weight, prompt = _sp_inputs(B=2, S=3, V=7, H=3, P=2, dtype=torch.float64, train_weight=True)
    with peft_kernels.use_backend("cpp", strict=True):
        assert torch.autograd.gradcheck(lambda w, p: soft_prompt_embed(ids, w, p, positions=[1, 3]), (weight, prompt))
        assert torch.autograd.gradcheck(lambda w, p: soft_prompt_embed(ids, w, p), (weight, prompt))


def test_prompt_steady_state_checks_ids_and_revalidates():
    ids, weight, prompt = _sp_inputs()
    soft_prompt_embed(ids, weight, prompt)
    soft_prompt_embed(ids, weight, prompt)  # steady state
    bad = ids.clone()
    bad[1, 2] = 20  # the same signature: the range check runs in the kernel
    with pytest.raises(ValueError, match=rf"{SP}: input_ids must be in \[0, 20\).*got values in \[\d+, 20\]"):
        soft_prompt_embed(bad, weight, prompt)
    ids2 = ids.clone()
    soft_prompt_embed(ids2, weight, prompt)
    ids2[0, 0] = -1  # modified in place after a checked call
    with pytest.raises(ValueError, match=f"{SP}: input_ids must be in"):
        soft_prompt_embed(ids2, weight, prompt)
    with pytest.raises(ValueError, match=f"{SP}: prompt_embeds of shape"):
        soft_prompt_embed(ids, weight, torch.randn(4, 5, requires_grad=True))
    with pytest.raises(TypeError, match=f"{SP}: input_ids must have dtype"):
        soft_prompt_embed(ids.float(), weight, prompt)
    with pytest.raises(ValueError, match=f"{SP}: positions must be insertion indices"):
        soft_prompt_embed(ids, weight, prompt, positions=[0, 1, 2, 99])


def test_prompt_steady_state_matches_reference_and_trains():
    ids, weight, prompt = _sp_inputs(batched=True)
    for _ in range(3):
        out = soft_prompt_embed(ids, weight, prompt)
        assert torch.equal(out, prompt_mod.soft_prompt_embed_reference(ids, weight, prompt))
    (g,) = torch.autograd.grad(out.sum(), prompt)
    assert torch.equal(g, torch.ones_like(prompt))
