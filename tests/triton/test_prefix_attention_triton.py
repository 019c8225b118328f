"""Triton prefix-attention kernels vs float64 math on the concatenated K/V with an explicit bool mask.

Runs under TRITON_INTERPRET=1 on CPU tensors (small odd shapes), or natively when CUDA is present.
"""

import pytest
import torch

from tests.helpers import triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

from peft_kernels.triton import prefix_attention as pa  # noqa: E402
from tests.prefix_attention_cases import eager_attention, make_inputs  # noqa: E402


def _grads(fn, inputs, do):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return out.detach(), lse.detach(), grads


def _run(
    dtype, B, Hq, Hkv, Lq, Lk, P, D, causal, shared, pad, bshd=False,
    prefix_dtype=None, seed=0,
):  # fmt: skip
    q, k, v, pk, pv, mask, do = make_inputs(
        DEV, dtype, B, Hq, Hkv, Lq, Lk, P, D, shared, pad,
        bshd=bshd, prefix_dtype=prefix_dtype, seed=seed, with_grad_out=True,
    )  # fmt: skip
    scale = D**-0.5
    out, lse = pa.prefix_attention_forward(q, k, v, pk, pv, causal, mask, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    grads = pa.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, causal, mask, scale)
    for g, t in zip(grads, (q, k, v, pk, pv)):
        assert g.dtype == t.dtype and g.shape == t.shape

    def ref(*t):
        return eager_attention(*t, causal, mask, scale)

    ref_out, ref_lse, ref_grads = _grads(ref, [t.double() for t in (q, k, v, pk, pv)], do.double())
    names = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")
    got = (out, lse, *grads)
    want = (ref_out, ref_lse, *ref_grads)
    for name, a in zip(names, got):
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten poison?)"
    if dtype == torch.float32 and prefix_dtype in (None, torch.float32):
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"{n}: {m}")
        return
    # fp16: within ~2x of eager PyTorch's own error in the same dtype vs the float64 truth.
    eager_out, eager_lse, eager_grads = _grads(ref, [q, k, v, pk, pv], do)
    eager = (eager_out, eager_lse, *eager_grads)
    for name, a, e, b in zip(names, got, eager, want):
        err = (a.double() - b).abs().max().item()
        err_eager = (e.double() - b).abs().max().item()
        msg = f"{name}: triton err {err:.3g} vs eager {dtype} err {err_eager:.3g}"
        assert err <= 2 * err_eager + 1e-4, msg


F32, F16 = torch.float32, torch.float16
# id: (dtype, B, Hq, Hkv, Lq, Lk, P, D, causal, shared, pad[, bshd]) -- a representative subset of
# L in {1, 17, 100} (+ decoding Lq=1 < Lk), P in {1, 5, 32}, D in {64, 80}, causal or not, padding,
# GQA/MQA/MHA, shared ("sh") or per-batch ("pb") prefix, "full" = non-causal; "bshd" cases pass
# HF-layout (non-contiguous) q/k/v.
CASES = {
    "fp32-mha-L17-P5-D64-full-sh": (F32, 2, 2, 2, 17, 17, 5, 64, False, True, False),
    "fp32-gqa-L100-P32-D80-causal-pb-pad-bshd": (F32, 2, 4, 2, 100, 100, 32, 80, True, False, True, True),
    "fp32-mqa-L17-P1-D80-full-pb-pad": (F32, 2, 2, 1, 17, 17, 1, 80, False, False, True),
    "fp32-mha-L1-P1-D64-causal-sh": (F32, 1, 2, 2, 1, 1, 1, 64, True, True, False),
    "fp32-gqa-L1-P32-D80-full-pb-pad": (F32, 2, 4, 2, 1, 1, 32, 80, False, False, True),
    "fp32-gqa-decode-Lq1-Lk100-P5-D80-causal-sh-pad": (F32, 2, 4, 2, 1, 100, 5, 80, True, True, True),
    "fp32-mha-decode-Lq1-Lk17-P1-D64-causal-pb": (F32, 2, 1, 1, 1, 17, 1, 64, True, False, False),
    "fp32-mha-L100-P1-D64-full-sh-pad": (F32, 2, 1, 1, 100, 100, 1, 64, False, True, True),
    "fp32-gqa-L17-P32-D64-causal-sh": (F32, 1, 4, 2, 17, 17, 32, 64, True, True, False),
    "fp32-mha-L100-P5-D80-causal-pb": (F32, 1, 2, 2, 100, 100, 5, 80, True, False, False),
    "fp16-gqa-L100-P5-D64-causal-sh-pad-bshd": (F16, 2, 4, 2, 100, 100, 5, 64, True, True, True, True),
    "fp16-mha-L17-P32-D80-full-pb": (F16, 1, 2, 2, 17, 17, 32, 80, False, False, False),
    "fp16-mqa-decode-Lq1-Lk100-P32-D64-causal-pb-pad": (F16, 2, 2, 1, 1, 100, 32, 64, True, False, True),
    "fp16-mha-L100-P1-D80-full-sh-pad": (F16, 2, 2, 2, 100, 100, 1, 80, False, True, True),
    "fp32-mqa-Lq20-Lk10-P3-D64-causal-sh-pad": (F32, 2, 2, 1, 20, 10, 3, 64, True, True, True),  # Lq > Lk
    "fp32-mha-L17-P5-D96-causal-sh": (F32, 1, 2, 2, 17, 17, 5, 96, True, True, False),
    "fp32-gqa-L17-P5-D128-full-pb-pad": (F32, 2, 2, 1, 17, 17, 5, 128, False, False, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_float64_reference(case):
    _run(*CASES[case])


def test_long_causal_L2048():
    _run(F32, 1, 1, 1, 2048, 2048, 32, 64, True, True, True)


def test_chunked_prefill_uneven_blocks(monkeypatch):
    # Lq < Lk with causal (bottom-right) and BLOCK_M != BLOCK_N in every kernel: exercises the
    # full/diagonal/skipped split of both the query-block and the key-block loops.
    if pa._INTERPRET:
        monkeypatch.setitem(pa._INTERPRET_BLOCKS, "fwd", (16, 32))
        monkeypatch.setitem(pa._INTERPRET_BLOCKS, "dq", (32, 16))
        monkeypatch.setitem(pa._INTERPRET_BLOCKS, "dkdv", (16, 32))
    _run(torch.float32, 1, 2, 1, 37, 70, 5, 64, True, True, True)


def test_fp32_prefix_with_fp16_activations():
    _run(torch.float16, 1, 2, 2, 17, 17, 5, 64, True, True, False, prefix_dtype=torch.float32)


def test_supports_reports_reasons():
    q = torch.randn(1, 4, 8, 64, device=DEV)
    k = torch.randn(1, 2, 8, 64, device=DEV)
    pk = torch.randn(2, 3, 64, device=DEV)
    assert pa.supports(q, k, k, pk, pk, None) == (True, "")
    mask = torch.ones(1, 8, dtype=torch.bool, device=DEV)
    assert pa.supports(q, k, k, pk, pk, mask)[0]

    k3 = torch.randn(1, 3, 8, 64, device=DEV)
    bad = {
        "kv heads": (q, k3, k3, pk, pk, None),
        "key_padding_mask": (q, k, k, pk, pk, mask.int()),
        "P >= 1": (q, k, k, pk[:, :0], pk[:, :0], None),
        "prefix_k": (q, k, k, torch.randn(2, 3, 32, device=DEV), torch.randn(2, 3, 32, device=DEV), None),
        "dtypes": (q, k.half(), k.half(), pk, pk, None),
    }
    if pa._INTERPRET:
        bad["bf16"] = (q.bfloat16(), k.bfloat16(), k.bfloat16(), pk, pk, None)
    for needle, args in bad.items():
        ok, why = pa.supports(*args)
        assert not ok and why.startswith("prefix_attention[triton]") and needle in why, (needle, why)
    with pytest.raises(ValueError, match="key_padding_mask"):
        pa.prefix_attention_forward(q, k, k, pk, pk, False, mask.int(), 0.125)
