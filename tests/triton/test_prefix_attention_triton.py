"""Triton prefix-attention kernels vs float64 math on the concatenated K/V with an explicit bool mask.

Runs under TRITON_INTERPRET=1 on CPU tensors (small odd shapes), or natively when CUDA is present.
"""

import pytest
import torch

from tests.helpers import triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

from peft_kernels import _config  # noqa: E402
from peft_kernels.triton import prefix_attention as pa  # noqa: E402
from peft_kernels.triton import prefix_merge as pm  # noqa: E402
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
    assert out.dtype == q.dtype and out.shape == q.shape and out.stride() == q.stride()  # no layout copy
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    grads = pa.prefix_attention_backward(do, q, k, v, pk, pv, out, lse, causal, mask, scale)
    for g, t in zip(grads, (q, k, v, pk, pv)):
        assert g.dtype == t.dtype and g.shape == t.shape and g.stride() == t.stride()

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


def test_chunked_prefill_uneven_blocks():
    # Lq < Lk with causal (bottom-right) and BLOCK_M != BLOCK_N in every kernel: exercises the
    # full/diagonal/skipped split of both the query-block and the key-block loops.
    with _config.override_interpret_blocks(prefix_fwd=(16, 32), prefix_dq=(32, 16), prefix_dkdv=(16, 32)):
        _run(torch.float32, 1, 2, 1, 37, 70, 5, 64, True, True, True)


def test_fp32_prefix_with_fp16_activations():
    _run(torch.float16, 1, 2, 2, 17, 17, 5, 64, True, True, False, prefix_dtype=torch.float32)


def test_supports_reports_reasons():
    q = torch.randn(1, 4, 8, 64, device=DEV)
    k = torch.randn(1, 2, 8, 64, device=DEV)
    pk = torch.randn(2, 3, 64, device=DEV)
    assert pa.why_not(q, k, k, pk, pk, None) is None
    mask = torch.ones(1, 8, dtype=torch.bool, device=DEV)
    assert pa.why_not(q, k, k, pk, pk, mask) is None

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
        why = pa.why_not(*args)
        assert why is not None and why.startswith("prefix_attention[triton]") and needle in why, (needle, why)
    with pytest.raises(ValueError, match="key_padding_mask"):
        pa.prefix_attention_forward(q, k, k, pk, pk, False, mask.int(), 0.125)


# --- the prefix part + merge of the sdpa backend (peft_kernels/triton/prefix_merge.py) ----------------------------
def _split_attention(q, k, v, mask, causal, scale):
    """Attention over the real keys alone in float64: (O_c with NaN rows where no key is visible, lse_c)."""
    import importlib

    ops = importlib.import_module("peft_kernels.ops.prefix_attention")
    B, Hq, Lq, _ = q.shape
    g = Hq // k.shape[1]
    allowed = ops._allowed_keys(B, Lq, k.shape[2], 0, causal, mask, q.device)
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v.double().repeat_interleave(g, 1), torch.logsumexp(s, -1), ops


# (dtype, B, Hq, Hkv, Lq, P, D, shared, pad, causal): P over one and several prefix tiles (<= 64 per step), odd D,
# query splits of the backward (32 rows under the interpreter) crossed.
MERGE_CASES = {
    "fp32-gqa-L13-P7-D24-sh-pad-causal": (F32, 2, 4, 2, 13, 7, 24, True, True, True),
    "fp32-mha-L40-P70-D16-pb": (F32, 2, 2, 2, 40, 70, 16, False, False, False),
    "fp32-mqa-L5-P1-D32-sh-causal": (F32, 1, 4, 1, 5, 1, 32, True, False, True),
    "fp16-gqa-L33-P32-D16-sh-pad-causal": (F16, 2, 4, 2, 33, 32, 16, True, True, True),
}


@pytest.mark.parametrize("case", list(MERGE_CASES), ids=list(MERGE_CASES))
def test_prefix_merge_kernels_match_float64(case):
    dtype, B, Hq, Hkv, Lq, P, D, shared, pad, causal = MERGE_CASES[case]
    q, k, v, pk, pv, mask, do = make_inputs(DEV, dtype, B, Hq, Hkv, Lq, Lq, P, D, shared, pad, bshd=True,
                                            prefix_dtype=torch.float32, with_grad_out=True, seed=5)
    scale = D**-0.5
    o_c64, lse_c64, ops = _split_attention(q, k, v, mask, causal, scale)
    out = o_c64.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # HL layout, NaN rows kept (poison)
    lse = pm.prefix_merge_forward(q, pk, pv, out, lse_c64.float(), scale)
    ref_out, ref_lse = eager_attention(*(t.double() for t in (q, k, v, pk, pv)), causal, mask, scale)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == F32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)
    # Backward: the prefix part's dQ added into a given dQ, and dPK/dPV, against the PyTorch part in float64.
    dq0 = torch.randn(q.shape, dtype=torch.float32).to(DEV, dtype)
    dq = dq0.clone()
    dpk, dpv = pm.prefix_merge_backward(do, q, pk, pv, out, lse, dq, scale)
    dq64 = dq0.double()
    r_dpk, r_dpv = ops.prefix_merge_backward_torch(do.double(), q.double(), pk.double(), pv.double(), out.double(),
                                                   lse.double(), dq64, scale)
    assert dpk.dtype == torch.float32 and dpk.shape == pk.shape
    for name, a, b in (("dq", dq, dq64), ("dprefix_k", dpk, r_dpk), ("dprefix_v", dpv, r_dpv)):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_sdpa_composition_with_the_triton_merge(monkeypatch):
    """The `sdpa` backend as it runs on CUDA, on the CPU: the fused SDPA op (CPU flash) + the Triton merge kernels
    in place of the PyTorch half; outputs and all gradients against float64, HF layout kept."""
    import importlib

    import peft_kernels

    ops = importlib.import_module("peft_kernels.ops.prefix_attention")
    monkeypatch.setattr(ops, "_prefix_merge", lambda *a: pm.prefix_merge_forward(*a))
    monkeypatch.setattr(ops, "_prefix_merge_backward", lambda *a: pm.prefix_merge_backward(*a))
    q, k, v, pk, pv, mask, do = make_inputs(DEV, F32, 2, 4, 2, 21, 21, 7, 16, True, True, bshd=True,
                                            prefix_dtype=torch.float32, with_grad_out=True, seed=9)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    with peft_kernels.use_backend("sdpa", strict=True):
        out = ops.prefix_attention(*leaves, causal=True, key_padding_mask=mask, scale=0.3)
    assert out.stride() == q.stride()
    grads = torch.autograd.grad(out, leaves, do)
    ref_out, _, ref_grads = _grads(lambda *t: eager_attention(*t, True, mask, 0.3),
                                   [t.double() for t in (q, k, v, pk, pv)], do.double())
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), (out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_dkdv_without_gqa_is_refused_where_triton_serializes_it(monkeypatch):
    """Triton < 3.7 serializes the dK/dV kernel's wgmma without GQA (sm_90a compile check): dispatch is told so."""
    q = torch.randn(1, 4, 8, 64, device=DEV)
    monkeypatch.setattr(pa, "_INTERPRET", False)
    monkeypatch.setattr(pa, "_DKDV_MHA_PIPELINED", False)
    assert "C7515" in pa.backward_why_not(q, torch.randn(1, 4, 8, 64, device=DEV))
    assert pa.backward_why_not(q, torch.randn(1, 2, 8, 64, device=DEV)) is None  # GQA: pipelined
    monkeypatch.setattr(pa, "_DKDV_MHA_PIPELINED", True)
    assert pa.backward_why_not(q, torch.randn(1, 4, 8, 64, device=DEV)) is None
