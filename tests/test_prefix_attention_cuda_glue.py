"""The CUDA glue of prefix attention's LSE-merge and concat backends, on the CPU.

The CUDA ops themselves (the aten flash / memory-efficient SDPA ops, csrc/cuda/prefix_merge.cu) cannot run here;
what can is tested: the bias and LSE layouts built for the memory-efficient op against the mask semantics
(``_allowed_keys``), the whole CUDA branch of the glue with that op emulated in float64 (checking the layout contract
it has: bias alignment, padded lse, the [B, L, H, D] storage of `out`, equal heads), the same branch on meta tensors
through torch's own meta kernels of the aten ops (argument order and shapes), the `cuda` backend's declaration and
why_not reasons, and its composition with the PyTorch merge standing in for the CUDA C++ kernels.
"""

import importlib
import math

import pytest
import torch

from peft_kernels.ops.prefix_attention import FAMILY, PrefixInputs, prefix_attention_reference
from tests.helpers import assert_close
from tests.prefix_attention_cases import make_inputs

pa = importlib.import_module("peft_kernels.ops.prefix_attention")  # the module (the package exports the function)

F64 = torch.float64

# (B, H, Lq, Lk, n_always, causal, pad): Lq == Lk, Lq < Lk (chunked prefill), Lq > Lk (rows above the diagonal),
# Lq = 1 (decoding), Lk not a multiple of 16, the concat backend's always-visible prefix keys.
MASK_CASES = [
    (2, 3, 9, 9, 0, True, True),
    (2, 3, 9, 9, 0, False, True),
    (3, 2, 5, 21, 0, True, True),
    (2, 2, 12, 7, 0, True, True),
    (2, 2, 12, 7, 0, True, False),
    (1, 2, 1, 33, 0, True, True),
    (2, 3, 9, 9 + 4, 4, True, True),
    (2, 3, 9, 9 + 4, 4, True, False),
    (2, 1, 17, 3 + 32, 3, False, True),
    (2, 2, 16, 16, 0, True, False),
]


def _padding(B, Lk, n_always, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, Lk - n_always, generator=g) > 0.3
    keep[:, -1] = True
    return keep


@pytest.mark.parametrize("case", MASK_CASES, ids=[str(c) for c in MASK_CASES])
def test_efficient_bias_with_top_left_causal_is_the_mask(case):
    """The additive bias (in its expanded, 16-aligned layout) plus the op's top-left is_causal allow exactly the
    keys ``_allowed_keys`` allows: the P prefix keys always, the rest bottom-right causal and padded."""
    B, H, Lq, Lk, n_always, causal, pad = case
    q = torch.randn(B, H, Lq, 8, dtype=torch.bfloat16)
    kpm = _padding(B, Lk, n_always) if pad else None
    mask, is_causal = pa._additive_mask(q, B, Lq, Lk, n_always, causal, kpm)
    bias = pa._efficient_bias(mask, B, H, Lq)
    allowed = pa._allowed_keys(B, Lq, Lk, n_always, causal, kpm, "cpu").expand(B, H, Lq, Lk)
    got = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if bias is not None:
        assert bias.shape == (B, H, Lq, Lk) and bias.dtype == q.dtype
        assert bias.stride(-1) == 1
        assert all(bias.stride(d) % pa._BIAS_ALIGN == 0 for d in range(3)), bias.stride()
        assert set(bias.unique().tolist()) <= {0.0, -math.inf}
        got &= bias == 0
    if is_causal:  # the memory-efficient op aligns is_causal top-left
        got &= torch.ones(Lq, Lk, dtype=torch.bool).tril()
    assert torch.equal(got, allowed)
    # Nothing to mask: no bias at all (the flash op, or the memory-efficient op without one).
    if not pad and (not causal or (Lq == Lk and n_always == 0) or Lq == 1):
        assert bias is None


def test_efficient_bias_pads_the_storage_and_keeps_the_values():
    mask = torch.randn(2, 1, 5, 21)
    bias = pa._efficient_bias(mask, 2, 3, 5)
    assert bias.shape == (2, 3, 5, 21) and bias.stride() == (5 * 32, 0, 32, 1)
    assert torch.equal(bias, mask.expand(2, 3, 5, 21))
    aligned = torch.randn(1, 1, 1, 32)
    b2 = pa._efficient_bias(aligned, 4, 2, 7)
    assert b2.data_ptr() == aligned.data_ptr() and b2.shape == (4, 2, 7, 32)
    assert pa._efficient_bias(None, 1, 1, 1) is None


def test_lse_trim_and_pad_round_trip():
    lse = torch.randn(2, 3, 37)
    padded = pa._pad_lse(lse)
    assert padded.shape == (2, 3, 64) and padded.is_contiguous()
    assert torch.equal(padded[..., :37], lse) and torch.isposinf(padded[..., 37:]).all()
    assert torch.equal(pa._trim_lse(padded, 37), lse)
    exact = torch.randn(2, 3, 64)
    assert pa._pad_lse(exact) is exact
    assert torch.equal(pa._pad_lse(exact.transpose(0, 1).contiguous().transpose(0, 1)), exact)


def test_blhd_storage_and_kv_head_expansion():
    hf = torch.randn(2, 5, 3, 8).transpose(1, 2)  # transformers' layout: kept as is
    assert pa._blhd(hf) is hf
    bhld = torch.randn(2, 3, 5, 8)
    t = pa._blhd(bhld)
    assert torch.equal(t, bhld) and t.stride() == (5 * 3 * 8, 8, 3 * 8, 1)
    k = torch.randn(2, 2, 5, 8, dtype=F64)
    kx = pa._expand_kv_heads(k, 6)
    assert kx.shape == (2, 6, 5, 8) and torch.equal(kx[:, 4], k[:, 1])
    assert pa._expand_kv_heads(k, 2) is k
    g = torch.randn(2, 6, 5, 8, dtype=F64)
    (auto,) = torch.autograd.grad(pa._expand_kv_heads(k.requires_grad_(True), 6), k, g)
    assert_close(pa._fold_kv_heads(g, 2), auto)


def test_flash_serves_only_what_it_computes_exactly():
    q16, q32 = torch.empty(1, 2, 9, 8, dtype=torch.bfloat16), torch.empty(1, 2, 9, 8)
    kpm = torch.ones(1, 9, dtype=torch.bool)
    assert pa._flash_serves(q16, 9, 0, True, None)
    assert not pa._flash_serves(q16, 9, 0, True, kpm)  # a mask: the memory-efficient op
    assert not pa._flash_serves(q32, 9, 0, True, None)  # fp32: the memory-efficient op
    assert pa._flash_serves(q16, 4 + 9, 4, True, None)  # concat, Lq <= Lk + 1: bottom-right keeps the prefix
    assert not pa._flash_serves(q16, 4 + 7, 4, True, None)  # concat, Lq > Lk + 1: it would hide prefix keys
    assert pa._flash_serves(q16, 4 + 7, 4, False, None)


# --- the CUDA branch with the memory-efficient op emulated in float64 ---------------------------------------------
def _emulated_efficient(q, k, v, bias, compute_lse, dropout_p, is_causal, *, scale):
    """What aten._scaled_dot_product_efficient_attention computes, with the layout contract it has."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    assert k.shape[1] == H and v.shape[1] == H, "the memory-efficient op has no GQA"
    assert compute_lse and dropout_p == 0.0
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        assert bias.shape == (B, H, Lq, Lk) and bias.stride(-1) == 1 and bias.dtype == q.dtype
        assert all(bias.stride(d) % 16 == 0 for d in range(3))
        s = s + bias
    if is_causal:
        s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool).tril(), -math.inf)
    lse = torch.logsumexp(s, -1)
    out = torch.exp(s - lse[..., None]).nan_to_num(0.0) @ v  # fully masked rows: 0 (their lse is -inf)
    lse_pad = torch.full((B, H, -(-Lq // 32) * 32), math.inf, dtype=torch.float32)
    lse_pad[..., :Lq] = lse
    out_bmhk = torch.empty(B, Lq, H, D, dtype=q.dtype).transpose(1, 2).copy_(out)
    seed = torch.empty((), dtype=torch.int64)
    return out_bmhk, lse_pad, seed, seed


def _emulated_efficient_backward(do, q, k, v, bias, out, lse, seed, offset, dropout_p, mask, is_causal, *, scale):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    assert k.shape[1] == H and list(mask) == [True, True, True, False]
    assert out.transpose(1, 2).is_contiguous(), "its backward implies the row stride of out: H * D"
    assert lse.shape == (B, H, -(-Lq // 32) * 32) and lse.is_contiguous()
    assert torch.isposinf(lse[..., Lq:]).all(), "the padding rows are read without bound checks"
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        assert bias.shape == (B, H, Lq, Lk) and all(bias.stride(d) % 16 == 0 for d in range(3))
        s = s + bias
    if is_causal:
        s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool).tril(), -math.inf)
    p = torch.exp(s - lse[..., :Lq, None].to(q.dtype))
    delta = (do * out).sum(-1, keepdim=True)
    ds = p * (do @ v.transpose(-1, -2) - delta)
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ do, None


@pytest.fixture
def cuda_branch_emulated(monkeypatch):
    """The CUDA branch of the glue on CPU float64 tensors, the memory-efficient op emulated (the flash op refused:
    every case here has a mask or must not reach it)."""
    monkeypatch.setattr(pa, "_on_cuda", lambda t: True)
    monkeypatch.setattr(pa, "_FLASH_CUDA_DTYPES", ())  # float64 stands in for the 16-bit types: no flash here
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", _emulated_efficient)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention_backward",
                        _emulated_efficient_backward)


# (B, Hq, Hkv, Lq, Lk, P, causal, pad, shared, bshd)
GLUE_CASES = [
    (2, 4, 2, 9, 9, 7, True, True, True, True),
    (2, 2, 2, 12, 7, 1, True, True, False, False),
    (2, 4, 1, 5, 21, 32, True, True, True, False),
    (2, 2, 2, 1, 13, 3, True, True, True, True),
    (2, 4, 2, 13, 13, 7, False, True, False, True),
    (1, 2, 2, 40, 40, 5, True, False, True, False),
]


@pytest.mark.parametrize("backend", ["sdpa", "concat"])
@pytest.mark.parametrize("case", GLUE_CASES, ids=[str(c) for c in GLUE_CASES])
def test_cuda_branch_with_emulated_efficient_op_matches_float64_reference(cuda_branch_emulated, backend, case):
    """Forward and every gradient of the sdpa / concat compositions through their CUDA branch (bias, lse trimming
    and padding, GQA expansion and folding, the out layout the backward needs), the PyTorch merge for the prefix."""
    B, Hq, Hkv, Lq, Lk, P, causal, pad, shared, bshd = case
    *inputs, mask, do = make_inputs("cpu", F64, B, Hq, Hkv, Lq, Lk, P, 16, shared, pad, bshd=bshd, seed=3,
                                    with_grad_out=True)
    scale = 0.3
    fwd = pa._sdpa_forward_backend if backend == "sdpa" else pa._concat_forward_backend
    bwd = pa._sdpa_backward_backend if backend == "sdpa" else pa._concat_backward_backend
    out, lse = fwd(*inputs, causal, mask, scale)
    grads = bwd(do, *inputs, out, lse, causal, mask, scale, [True] * 5)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    ref = prefix_attention_reference(*leaves, causal, mask, scale, upcast=True)
    ref_grads = torch.autograd.grad(ref, leaves, do)
    tol = {"rtol": 1e-5, "atol": 1e-6}  # the op's lse is fp32, as the real one's is
    assert_close(out, ref, name="out", **tol)
    assert out.stride() == inputs[0].stride()
    for name, g, r, t in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, ref_grads, inputs):
        assert g.shape == t.shape, name
        assert_close(g, r, name=name, **tol)


def test_cuda_backend_glue_with_the_pytorch_merge_standing_in(monkeypatch):
    """The `cuda` backend is the sdpa composition with the CUDA C++ merge kernels swapped in: with the PyTorch merge
    in their place (same contract: out in place, merged lse; dq in place, fp32 prefix gradients) it is exact."""
    monkeypatch.setattr(pa, "_prefix_merge_cuda", pa.prefix_merge_torch)
    monkeypatch.setattr(pa, "_prefix_merge_backward_cuda", pa.prefix_merge_backward_torch)
    *inputs, mask, do = make_inputs("cpu", torch.float32, 2, 4, 2, 11, 11, 5, 16, True, True, bshd=True,
                                    with_grad_out=True)
    out, lse = pa._cuda_forward(*inputs, True, mask, 0.25)
    grads = pa._cuda_backward(do, *inputs, out, lse, True, mask, 0.25, [True] * 5)
    leaves = [t.double().requires_grad_(True) for t in inputs]
    ref = prefix_attention_reference(*leaves, True, mask, 0.25)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    assert_close(out, ref.float(), rtol=1e-4, atol=1e-5, name="out")
    for name, g, r in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, ref_grads):
        assert_close(g, r.float(), rtol=1e-4, atol=1e-4, name=name)


# --- the CUDA branch on meta tensors: torch's own meta kernels of the aten ops check argument order and shapes -----
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_branch_on_meta_tensors(monkeypatch, pad, dtype):
    monkeypatch.setattr(pa, "_on_cuda", lambda t: True)
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 37, 37, 64
    q = torch.empty(B, Lq, Hq, D, device="meta", dtype=dtype).transpose(1, 2)
    k = torch.empty(B, Lk, Hkv, D, device="meta", dtype=dtype).transpose(1, 2)
    kpm = torch.ones(B, Lk, dtype=torch.bool, device="meta") if pad else None
    flash = pa._flash_serves(q, Lk, 0, True, kpm)
    assert flash == (dtype == torch.bfloat16 and not pad)
    if not flash:  # the memory-efficient op has no GQA: its inputs are expanded
        k = torch.empty(B, Lk, Hq, D, device="meta", dtype=dtype).transpose(1, 2)
    out, lse = pa._aten_attention(q, k, k, 0, True, kpm, 0.125)
    assert out.shape == q.shape and lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    dq, dk, dv = pa._aten_attention_backward(torch.empty_like(q), q, k, k, out, lse, 0, True, kpm, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


# --- the `cuda` backend's declaration and why_not ----------------------------------------------------------------
def test_cuda_backend_declares_its_own_backward():
    assert FAMILY.forward_backends["cuda"].backward_by is None
    assert FAMILY.backward_backends["cuda"].run is pa._cuda_backward
    assert FAMILY.forward_backends["cuda"].requires == "native_cuda"
    assert not hasattr(torch.ops.peft_kernels, "prefix_attention_fwd_cuda")  # the WMMA forward is gone
    q, k, v, pk, pv, mask = make_inputs("cpu", torch.bfloat16, 1, 2, 2, 4, 4, 3, 16, True, True)
    why = FAMILY.why_not_reason("cuda", PrefixInputs(q, k, v, pk, pv, True, mask, 0.25), "backward")
    assert why is not None and "CUDA tensors" in why


def test_cuda_why_not_reasons():
    assert pa._aten_cuda_limits(torch.bfloat16, 128) is None
    assert pa._aten_cuda_limits(torch.float32, 64) is None  # the memory-efficient op runs fp32
    assert "dtype" in pa._aten_cuda_limits(torch.float64, 64)
    assert "head dim" in pa._aten_cuda_limits(torch.float16, 60)
    assert "head dim" in pa._aten_cuda_limits(torch.float16, 264)
    assert pa._cuda_merge_limits(32, 128) is None and pa._cuda_merge_limits(128, 256) is None
    assert "shared memory" in pa._cuda_merge_limits(256, 256)
    # The formulas of csrc/cuda/prefix_merge.cu (fwd_smem_bytes, bwd_smem_bytes).
    assert pa._cuda_merge_smem(32, 128) == (4 * 32 * (128 + 128), 4 * (4 * 32 * 128 + 2 * 32 * 132 + 2 * 32 * 32 + 128))
    assert pa._cuda_merge_smem(5, 36)[0] == 4 * 5 * (40 + 128)
