"""The CUDA C++ prefix-attention forward (csrc/cuda/prefix_attention.cu) vs float64 math on the concatenated K/V.

fp16/bf16: the FlashAttention rule (relative error vs the float64 oracle at most 2x eager PyTorch's in the same
dtype); fp32: close to the oracle. Outputs are NaN-poisoned before each call. Every test needs a GPU.
"""

import pytest
import torch

import peft_kernels
from peft_kernels import _backends
from peft_kernels.ops.prefix_attention import (
    _CUDA_KERNEL_STATUS,
    FAMILY,
    PrefixInputs,
    _reference_forward,
    prefix_attention,
    prefix_attention_reference,
)
from tests.helpers import assert_close, assert_within_eager_error
from tests.prefix_attention_cases import eager_attention, make_inputs

pytestmark = pytest.mark.gpu

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DEV = "cuda"


@pytest.fixture(autouse=True)
def _needs_the_kernel():
    assert _backends.availability("native_cuda", "cuda") is None, _backends.availability("native_cuda", "cuda")
    assert _CUDA_KERNEL_STATUS is None, _CUDA_KERNEL_STATUS


def native(q, k, v, pk, pv, causal, mask, scale):
    return torch.ops.peft_kernels.prefix_attention_fwd_cuda(q, k, v, pk, pv, causal, mask, scale)


def poison_allocator(*shapes_dtypes):
    """NaN-fill blocks of these sizes and free them: the caching allocator hands them to the kernel's outputs next,
    so any element the kernel fails to write stays NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dt, device=DEV) for shape, dt in shapes_dtypes]
    del blocks


def make(dtype, B, Hq, Hkv, Lq, Lk, P, D, shared, pad, bshd=False, seed=0):
    # Padded row 0 has a hole in the middle; the other rows are right- and left-padded by different amounts.
    return make_inputs(DEV, dtype, B, Hq, Hkv, Lq, Lk, P, D, shared, pad, bshd=bshd, seed=seed, hole_in_row0=True)


def check(q, k, v, pk, pv, causal, mask, scale, name=""):
    B, Hq, Lq, D = q.shape
    poison_allocator(((B, Hq, Lq, D), q.dtype), ((B, Hq, Lq), F32))
    out, lse = native(q, k, v, pk, pv, causal, mask, scale)
    torch.cuda.synchronize()
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == F32 and lse.shape == q.shape[:3]
    assert torch.isfinite(out).all(), f"{name} out: non-finite values (unwritten poison?)"
    assert torch.isfinite(lse).all(), f"{name} lse: non-finite values (unwritten poison?)"
    oracle = prefix_attention_reference(q, k, v, pk, pv, causal, mask, scale, upcast=True)
    _, lse64 = _reference_forward(*(t.double() for t in (q, k, v, pk, pv)), causal, mask, scale)
    assert_close(lse, lse64.float(), rtol=1e-5, atol=1e-4, name=f"{name} lse")
    if q.dtype == F32:
        assert_close(out, oracle.float(), rtol=2e-4, atol=2e-4, name=f"{name} out")
    else:
        eager_out, _ = eager_attention(q, k, v, pk, pv, causal, mask, scale)
        assert_within_eager_error(out, eager_out, oracle, name=f"{name} out")
    return out, lse


# id: (dtype, B, Hq, Hkv, Lq, Lk, P, D, causal, shared, pad[, bshd]). L in {1, 17, 100, 2048}, P in {1, 5, 32}
# (and 70: two prefix tiles), D in {64, 80, 128} (and 96; 40/72 padded up; 36 on the unvectorised loader path),
# causal or "full", key padding, GQA/MQA/MHA, shared ("sh") or per-batch ("pb") prefix, decoding (Lq = 1 < Lk),
# Lq > Lk, chunked prefill (Lq < Lk), HF-layout strides ("bshd").
CASES = {
    "fp16-mha-L17-P5-D64-full-sh": (F16, 2, 2, 2, 17, 17, 5, 64, False, True, False),
    "bf16-mha-L17-P5-D64-full-sh": (BF16, 2, 2, 2, 17, 17, 5, 64, False, True, False),
    "fp16-gqa-L100-P32-D80-causal-pb-pad": (F16, 2, 4, 2, 100, 100, 32, 80, True, False, True),
    "bf16-gqa-L100-P32-D80-causal-pb-pad": (BF16, 2, 4, 2, 100, 100, 32, 80, True, False, True),
    "fp16-mqa-L1-P1-D128-causal-sh": (F16, 1, 4, 1, 1, 1, 1, 128, True, True, False),
    "bf16-mha-L1-P32-D80-full-pb-pad": (BF16, 2, 2, 2, 1, 1, 32, 80, False, False, True),
    "fp16-gqa-decode-Lq1-Lk100-P5-D64-causal-sh-pad": (F16, 2, 4, 2, 1, 100, 5, 64, True, True, True),
    "bf16-mqa-decode-Lq1-Lk2048-P32-D128-causal-pb": (BF16, 2, 2, 1, 1, 2048, 32, 128, True, False, False),
    "fp16-mha-L2048-P32-D128-causal-sh-pad": (F16, 1, 2, 2, 2048, 2048, 32, 128, True, True, True),
    "bf16-gqa-L2048-P1-D64-full-pb": (BF16, 1, 4, 2, 2048, 2048, 1, 64, False, False, False),
    "fp16-gqa-L2048-P5-D80-causal-pb-bshd": (F16, 1, 4, 2, 2048, 2048, 5, 80, True, False, False, True),
    "bf16-mha-L100-P1-D128-full-sh-pad-bshd": (BF16, 2, 2, 2, 100, 100, 1, 128, False, True, True, True),
    "fp16-mha-L17-P70-D64-causal-pb-pad": (F16, 2, 2, 2, 17, 17, 70, 64, True, False, True),
    "bf16-mqa-Lq20-Lk10-P3-D64-causal-sh-pad": (BF16, 2, 2, 1, 20, 10, 3, 64, True, True, True),
    "fp16-gqa-prefill-Lq37-Lk170-P5-D80-causal-sh-pad": (F16, 2, 4, 2, 37, 170, 5, 80, True, True, True),
    "bf16-mha-L100-P5-D96-causal-sh": (BF16, 1, 2, 2, 100, 100, 5, 96, True, True, False),
    "fp16-mha-L100-P5-D40-causal-sh": (F16, 1, 2, 2, 100, 100, 5, 40, True, True, False),
    "bf16-mha-L17-P5-D72-full-pb-pad": (BF16, 2, 2, 2, 17, 17, 5, 72, False, False, True),
    "fp16-mha-L100-P5-D36-causal-pb-pad": (F16, 2, 2, 2, 100, 100, 5, 36, True, False, True),
    "fp32-mha-L17-P5-D64-full-sh": (F32, 2, 2, 2, 17, 17, 5, 64, False, True, False),
    "fp32-gqa-L100-P32-D80-causal-pb-pad-bshd": (F32, 2, 4, 2, 100, 100, 32, 80, True, False, True, True),
    "fp32-mqa-decode-Lq1-Lk100-P5-D128-causal-sh-pad": (F32, 2, 2, 1, 1, 100, 5, 128, True, True, True),
    "fp32-mha-L2048-P32-D64-causal-sh-pad": (F32, 1, 1, 1, 2048, 2048, 32, 64, True, True, True),
    "fp32-mha-L17-P70-D96-full-pb": (F32, 1, 2, 2, 17, 17, 70, 96, False, False, False),
    "fp32-mha-L1-P1-D36-causal-sh": (F32, 1, 1, 1, 1, 1, 1, 36, True, True, False),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_float64_reference(case):
    dtype, B, Hq, Hkv, Lq, Lk, P, D, causal, shared, pad, *rest = CASES[case]
    q, k, v, pk, pv, mask = make(dtype, B, Hq, Hkv, Lq, Lk, P, D, shared, pad, bshd=bool(rest and rest[0]))
    check(q, k, v, pk, pv, causal, mask, D**-0.5, name=case)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_fully_padded_row_sees_only_the_prefix(dtype):
    q, k, v, pk, pv, _ = make(dtype, 2, 2, 1, 33, 33, 5, 64, True, False)
    mask = torch.ones(2, 33, dtype=torch.bool, device=DEV)
    mask[1] = False
    out, lse = check(q, k, v, pk, pv, True, mask, 0.3)
    only_prefix = eager_attention(
        q[1:].double(), k[1:, :, :0].double(), v[1:, :, :0].double(), pk.double(), pv.double(), False, None, 0.3
    )[0]
    assert_close(out[1:], only_prefix.to(dtype), dtype=dtype)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_odd_strides_and_misaligned_pointers(dtype):
    # q/k/v sliced out of wider buffers at an odd element offset: the rows are not 16-byte aligned, so the kernel
    # takes its element-wise loader; the mask is a strided view; the prefix is a non-contiguous slice.
    B, Hq, Hkv, L, P, D = 2, 4, 2, 70, 5, 64
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)

    q = rnd(B, Hq, L, D + 3)[..., 1 : D + 1]
    k = rnd(B, Hkv, L, D + 3)[..., 1 : D + 1]
    v = rnd(B, Hkv, L, D + 3)[..., 1 : D + 1]
    pk = rnd(Hkv, 2 * P, D)[:, ::2]
    pv = rnd(Hkv, 2 * P, D)[:, ::2]
    wide = torch.rand(B, 2 * L, generator=g).to(DEV) > 0.3
    mask = wide[:, ::2]
    check(q, k, v, pk, pv, True, mask, 0.2, name="misaligned")
    # Through the public op (forced cuda backend), with a non-unit-stride head dim that the wrapper copies.
    qt = rnd(B, Hq, D, L).transpose(-1, -2)
    with peft_kernels.use_backend("cuda", strict=True):
        out = prefix_attention(qt, k, v, pk, pv, causal=True, key_padding_mask=mask, scale=0.2)
    ref = prefix_attention_reference(qt, k, v, pk, pv, True, mask, 0.2, upcast=True)
    assert_within_eager_error(out, eager_attention(qt, k, v, pk, pv, True, mask, 0.2)[0], ref)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_public_op_forward_and_backward_on_cuda_backend(dtype):
    q, k, v, pk, pv, mask = make(dtype, 2, 4, 2, 40, 40, 5, 64, False, True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    with peft_kernels.use_backend("cuda", strict=True):
        assert FAMILY.select(PrefixInputs(q, k, v, pk, pv, True, mask, 0.125)) == ("cuda", "triton")
        out = prefix_attention(*leaves, causal=True, key_padding_mask=mask)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, pk, pv)]
    ref = prefix_attention_reference(*leaves64, True, mask, None, upcast=True)
    grads64 = torch.autograd.grad(ref, leaves64, do.double())
    tol = {F32: (2e-4, 2e-4), F16: (2e-2, 2e-2), BF16: (5e-2, 5e-2)}[dtype]
    assert_close(out, ref.to(dtype), rtol=tol[0], atol=tol[1], name="out")
    for name, g, g64 in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], grads, grads64):
        assert g.dtype == dtype
        assert_close(g, g64.to(dtype), rtol=tol[0], atol=tol[1] * 5, name=name)


def test_opcheck_cuda_backend():
    q, k, v, pk, pv, mask = make(F16, 1, 2, 1, 5, 7, 2, 64, False, True)
    fwd_op = FAMILY.custom_ops[0]
    torch.library.opcheck(fwd_op, (q, k, v, pk, pv, True, mask, 0.35, "cuda", "triton"))
    torch.library.opcheck(
        fwd_op, (q.float(), k.float(), v.float(), pk.float(), pv.float(), False, None, 0.35, "cuda", "triton")
    )


def test_empty_query_and_key_ranges():
    q, k, v, pk, pv, _ = make(F16, 2, 2, 2, 0, 9, 3, 64, True, False)
    out, lse = native(q, k, v, pk, pv, True, None, 0.125)
    assert out.shape == (2, 2, 0, 64) and lse.shape == (2, 2, 0)
    q, k, v, pk, pv, _ = make(BF16, 2, 2, 1, 9, 0, 3, 64, True, False)  # no real keys: the prefix only
    check(q, k, v, pk, pv, True, torch.ones(2, 0, dtype=torch.bool, device=DEV), 0.125, name="Lk=0")


def _cuda_supports(q, k, v, pk, pv, mask):
    why = FAMILY.why_not_reason("cuda", PrefixInputs(q, k, v, pk, pv, False, mask, 0.125))
    return None if why is None else f"prefix_attention[cuda]: {why}"


def test_supports_reports_reasons():
    q, k, v, pk, pv, mask = make(F16, 1, 4, 2, 8, 8, 3, 64, False, True)
    assert _cuda_supports(q, k, v, pk, pv, mask) is None
    assert _cuda_supports(q.float(), k.float(), v.float(), pk.float(), pv.float(), None) is None
    big = torch.randn(1, 4, 8, 160, device=DEV, dtype=F16)
    bigk = torch.randn(1, 2, 8, 160, device=DEV, dtype=F16)
    bigp = torch.randn(2, 3, 160, device=DEV, dtype=F16)
    # Shapes, head counts, P and the mask dtype are the public function's validation (tested on CPU).
    bad = {
        "float16, bfloat16 and float32": (q.double(), k.double(), v.double(), pk.double(), pv.double(), None),
        "head dim": (big, bigk, bigk, bigp, bigp, None),
    }
    for needle, args in bad.items():
        why = _cuda_supports(*args)
        assert why is not None and why.startswith("prefix_attention[cuda]: ") and needle in why, (needle, why)
    # Auto-selection falls back past a backend that refuses; forced strict raises with the reason.
    with peft_kernels.use_backend("cuda", strict=True), pytest.raises(NotImplementedError, match="head dim"):
        prefix_attention(big, bigk, bigk, bigp, bigp)


def test_native_op_refuses_bad_inputs():
    q, k, v, pk, pv, mask = make(F16, 1, 4, 2, 8, 8, 3, 64, False, True)
    bad = {
        "head dim D = 160": (
            torch.randn(1, 4, 8, 160, device=DEV, dtype=F16),
            torch.randn(1, 2, 8, 160, device=DEV, dtype=F16),
            torch.randn(1, 2, 8, 160, device=DEV, dtype=F16),
            torch.randn(2, 3, 160, device=DEV, dtype=F16),
            torch.randn(2, 3, 160, device=DEV, dtype=F16),
            None,
        ),
        "float16, bfloat16 or float32": (q.double(), k.double(), v.double(), pk.double(), pv.double(), None),
        "unit-stride last dim": (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, pk, pv, None),
        "expected q's": (q, k, v, pk.float(), pv.float(), None),
        "must be a multiple of the KV heads": (q[:, :3], k, v, pk, pv, None),
        "key_padding_mask must be bool": (q, k, v, pk, pv, mask.int()),
        "key_padding_mask must be [B, Lk]": (q, k, v, pk, pv, mask[:, :5]),
        "no virtual tokens": (q, k, v, pk[:, :0], pv[:, :0], None),
        "must be a CUDA tensor": (q, k.cpu(), v, pk, pv, None),
    }
    for needle, args in bad.items():
        with pytest.raises(RuntimeError, match="peft_kernels: prefix_attention_fwd_cuda: ") as info:
            native(*args[:5], False, args[5], 0.125)
        assert needle in str(info.value), (needle, str(info.value))


# --- the compositions on PyTorch's SDPA kernels (sdpa: flash + Triton prefix merge; concat) on the GPU -----------
@pytest.mark.parametrize("backend", ["sdpa", "concat"])
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("shape", [(2, 8, 2, 300, 300, 32, 128), (1, 4, 4, 1, 77, 7, 64), (2, 4, 1, 64, 129, 1, 64)])
def test_sdpa_compositions_on_gpu(backend, dtype, shape):
    """bf16/fp16 within 2x eager's error of the float64 oracle, fp32 prefix grads, HF layout kept (no copy)."""
    B, Hq, Hkv, Lq, Lk, P, D = shape
    q, k, v, pk, pv, _, do = make_inputs(DEV, dtype, B, Hq, Hkv, Lq, Lk, P, D, True, False, bshd=True,
                                         prefix_dtype=F32, with_grad_out=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    with peft_kernels.use_backend(backend, strict=True):
        out = prefix_attention(*leaves, causal=True)
    assert out.stride() == q.stride()
    grads = torch.autograd.grad(out, leaves, do)
    assert all(g.stride() == t.stride() for g, t in zip(grads, leaves))
    assert grads[3].dtype == F32
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, pk, pv)]
    ref = prefix_attention_reference(*leaves64, True, None, None, upcast=True)
    grads64 = torch.autograd.grad(ref, leaves64, do.double())
    e_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, pk.to(dtype), pv.to(dtype))]
    e_out, _ = eager_attention(*e_leaves, True, None, D**-0.5)
    e_grads = torch.autograd.grad(e_out, e_leaves, do)
    for name, a, e, r in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), (out, *grads), (e_out, *e_grads),
                             (ref, *grads64)):
        err, err_e = (a.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= 2 * err_e + 1e-3, f"{backend} {name}: err {err:.3g} vs eager {err_e:.3g}"
