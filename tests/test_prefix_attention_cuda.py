"""Prefix attention on the GPU: the CUDA C++ prefix-and-merge kernels (csrc/cuda/prefix_merge.cu) against their
PyTorch oracle (prefix_merge_torch / prefix_merge_backward_torch), and the `cuda`, `sdpa` and `concat` compositions
on PyTorch's fused SDPA ops (flash; memory-efficient where a key padding mask or fp32 needs its bias) against the
float64 reference. Outputs are NaN-poisoned where the kernels must write them. Every test needs a GPU.
"""

import importlib

import pytest
import torch

import peft_kernels
from peft_kernels import _backends
from peft_kernels.ops.prefix_attention import FAMILY, PrefixInputs, prefix_attention, prefix_attention_reference
from tests.helpers import assert_close
from tests.prefix_attention_cases import eager_attention, make_inputs

pa = importlib.import_module("peft_kernels.ops.prefix_attention")
pytestmark = pytest.mark.gpu

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DEV = "cuda"


@pytest.fixture(autouse=True)
def _needs_the_kernels():
    assert _backends.availability("native_cuda", "cuda") is None, _backends.availability("native_cuda", "cuda")
    assert pa._CUDA_KERNEL_STATUS is None, pa._CUDA_KERNEL_STATUS


def _merge_inputs(dtype, B, Hq, Hkv, Lq, P, D, shared, prefix_dtype, hl, dead_rows, seed=0):
    """q, prefix, O_c (NaN in rows that see no real key, as SDPA may leave them), lse_c (-inf there), dO, dq."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=DEV, dtype=dt)

    def act():
        return rnd(B, Lq, Hq, D).transpose(1, 2) if hl else rnd(B, Hq, Lq, D)

    q, o_c, do, dq = act(), act(), act(), act()
    pshape = (Hkv, P, D) if shared else (B, Hkv, P, D)
    pk, pv = rnd(*pshape, dt=prefix_dtype), rnd(*pshape, dt=prefix_dtype)
    lse_c = rnd(B, Hq, Lq, dt=F32) + 2.0
    if dead_rows:
        lse_c[:, :, : Lq // 3] = float("-inf")
        o_c[:, :, : Lq // 3] = float("nan")
    return q, pk, pv, o_c, lse_c, do, dq


# (dtype, B, Hq, Hkv, Lq, P, D, shared, prefix dtype, HF layout, dead rows). D = 36 and 100 take the element-wise
# loads; P = 70 and 128 span several backward key chunks; Lq = 1100 several backward splits and tiles.
MERGE_CASES = {
    "bf16-mha-L17-P5-D64-sh-fp32prefix-hl": (BF16, 2, 2, 2, 17, 5, 64, True, F32, True, True),
    "fp16-gqa-L300-P32-D128-pb": (F16, 2, 8, 2, 300, 32, 128, False, F16, False, True),
    "bf16-mqa-L1-P1-D128-sh": (BF16, 3, 4, 1, 1, 1, 128, True, F32, True, False),
    "fp32-gqa-L1100-P70-D80-sh": (F32, 1, 4, 2, 1100, 70, 80, True, F32, False, True),
    "fp16-mha-L33-P128-D256-pb-hl": (F16, 1, 2, 2, 33, 128, 256, False, F32, True, False),
    "bf16-mha-L77-P7-D36-sh": (BF16, 2, 2, 2, 77, 7, 36, True, BF16, False, True),
    "fp32-gqa-L129-P3-D100-pb-hl": (F32, 2, 6, 3, 129, 3, 100, False, F32, True, False),
}


def _tol(dtype):
    return {F32: (1e-4, 1e-4), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}[dtype]


@pytest.mark.parametrize("case", list(MERGE_CASES), ids=list(MERGE_CASES))
def test_native_merge_kernels_match_the_pytorch_oracle(case):
    dtype, B, Hq, Hkv, Lq, P, D, shared, pdt, hl, dead = MERGE_CASES[case]
    q, pk, pv, o_c, lse_c, do, dq = _merge_inputs(dtype, B, Hq, Hkv, Lq, P, D, shared, pdt, hl, dead)
    scale = D**-0.5
    out_ref = o_c.clone()
    lse_ref = pa.prefix_merge_torch(q, pk, pv, out_ref, lse_c, scale)
    out = o_c.clone()
    lse = torch.ops.peft_kernels.prefix_merge_fwd_cuda(q, pk, pv, out, lse_c, scale)
    torch.cuda.synchronize()
    assert lse.dtype == F32 and lse.shape == (B, Hq, Lq) and torch.isfinite(lse).all()
    assert torch.isfinite(out).all(), "rows without a real key must not read O_c"
    rtol, atol = _tol(dtype)
    assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5, name="lse")
    assert_close(out, out_ref, rtol=rtol, atol=atol, name="out")
    # Backward with the merged (out, lse): dq += the prefix part's, fp32 prefix gradients.
    dq_ref = dq.clone()
    dpk_ref, dpv_ref = pa.prefix_merge_backward_torch(do, q, pk, pv, out_ref, lse_ref, dq_ref, scale)
    dq_got = dq.clone()
    dpk, dpv = torch.ops.peft_kernels.prefix_merge_bwd_cuda(do, q, pk, pv, out_ref, lse_ref, dq_got, scale)
    assert dpk.dtype == F32 and dpk.shape == pk.shape and dpv.shape == pv.shape
    assert_close(dq_got, dq_ref, rtol=rtol, atol=atol, name="dq")
    assert_close(dpk, dpk_ref.float(), rtol=1e-3, atol=1e-3 * max(1.0, dpk_ref.abs().max().item()), name="dpk")
    assert_close(dpv, dpv_ref.float(), rtol=1e-3, atol=1e-3 * max(1.0, dpv_ref.abs().max().item()), name="dpv")
    # Deterministic: fixed-order sums, no atomics.
    dq2 = dq.clone()
    dpk2, dpv2 = torch.ops.peft_kernels.prefix_merge_bwd_cuda(do, q, pk, pv, out_ref, lse_ref, dq2, scale)
    assert torch.equal(dq2, dq_got) and torch.equal(dpk2, dpk) and torch.equal(dpv2, dpv)


def test_opcheck_native_merge_ops():
    q, pk, pv, o_c, lse_c, do, dq = _merge_inputs(BF16, 2, 4, 2, 9, 3, 64, True, F32, True, False)
    torch.library.opcheck(torch.ops.peft_kernels.prefix_merge_fwd_cuda.default, (q, pk, pv, o_c, lse_c, 0.3))
    out = o_c.clone()
    lse = torch.ops.peft_kernels.prefix_merge_fwd_cuda(q, pk, pv, out, lse_c, 0.3)
    torch.library.opcheck(torch.ops.peft_kernels.prefix_merge_bwd_cuda.default, (do, q, pk, pv, out, lse, dq, 0.3))


def test_native_merge_ops_refuse_bad_inputs():
    q, pk, pv, o_c, lse_c, do, dq = _merge_inputs(F16, 1, 4, 2, 8, 3, 64, True, F32, False, False)
    bad = {
        "head dim D = 264": (torch.randn(1, 4, 8, 264, device=DEV, dtype=F16), torch.randn(2, 3, 264, device=DEV),
                             torch.randn(2, 3, 264, device=DEV), torch.randn(1, 4, 8, 264, device=DEV, dtype=F16),
                             lse_c),
        "float16, bfloat16 or float32": (q.double(), pk, pv, o_c.double(), lse_c),
        "must have q's shape": (q, pk, pv, o_c[:, :, :5], lse_c),
        "lse_c must be [B, Hq, Lq]": (q, pk, pv, o_c, lse_c[:, :, :5]),
        "multiple of the KV heads": (q[:, :3], pk, pv, o_c[:, :3], lse_c[:, :3]),
        "1 <= P": (q, pk[:, :0], pv[:, :0], o_c, lse_c),
    }
    for needle, args in bad.items():
        with pytest.raises(RuntimeError, match="peft_kernels: prefix_merge_fwd_cuda: ") as info:
            torch.ops.peft_kernels.prefix_merge_fwd_cuda(*args, 0.125)
        assert needle in str(info.value), (needle, str(info.value))


@pytest.mark.parametrize("backend", ["cuda", "sdpa", "concat"])
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("pad", [False, True])
def test_public_op_on_the_compositions(backend, dtype, pad):
    """Forward and every gradient through the public op with the backend forced: GQA, HF layout, a shared fp32
    prefix, padding (the memory-efficient op) or not (flash for bf16; memory-efficient for fp32)."""
    B, Hq, Hkv, L, P, D = 2, 8, 2, 130, 7, 64
    q, k, v, pk, pv, mask, do = make_inputs(DEV, dtype, B, Hq, Hkv, L, L, P, D, True, pad, bshd=True,
                                            prefix_dtype=F32, with_grad_out=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    with peft_kernels.use_backend(backend, strict=True):
        assert FAMILY.select(PrefixInputs(q, k, v, pk, pv, True, mask, D**-0.5)) == (backend, backend)
        out = prefix_attention(*leaves, causal=True, key_padding_mask=mask)
    assert out.stride() == q.stride()
    grads = torch.autograd.grad(out, leaves, do)
    assert grads[3].dtype == F32
    _assert_within_twice_eager(backend, out, grads, (q, k, v, pk, pv), do, mask, floor=1e-4)


def _assert_within_twice_eager(label, out, grads, inputs, do, mask, floor):
    """Output and the five gradients within 2x (+ floor) the error eager attention in the activation dtype makes
    against the float64 oracle (causal), on the same inputs (q, k, v, fp32 prefix)."""
    q, k, v, pk, pv = inputs
    leaves64 = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = prefix_attention_reference(*leaves64, True, mask, None, upcast=True)
    grads64 = torch.autograd.grad(ref, leaves64, do.double())
    e_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, pk.to(q.dtype), pv.to(q.dtype))]
    e_out, _ = eager_attention(*e_leaves, True, mask, q.shape[-1] ** -0.5)
    e_grads = torch.autograd.grad(e_out, e_leaves, do)
    for name, a, e, r in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), (out, *grads), (e_out, *e_grads),
                             (ref, *grads64)):
        err, err_e = (a.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= 2 * err_e + floor, f"{label} {name}: err {err:.3g} vs eager {err_e:.3g}"


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
    _assert_within_twice_eager(backend, out, grads, (q, k, v, pk, pv), do, None, floor=1e-3)


# --- k/v computed into prefix_kv_buffers: concat over the buffer itself (no copy of k/v/dk/dv) --------------------
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("shape", [(2, 8, 2, 300, 32, 128), (1, 4, 4, 77, 7, 64)])
def test_concat_over_reserved_rows_on_gpu(dtype, shape):
    """The flash op over [prefix; k] in the buffer: within 2x eager's error of the float64 oracle, dk/dv views of
    dK'/dV' (the buffer's strides), k's version unchanged."""
    from peft_kernels import prefix_kv_buffer

    B, Hq, Hkv, L, P, D = shape
    q, k, v, pk, pv, _, do = make_inputs(DEV, dtype, B, Hq, Hkv, L, L, P, D, True, False, bshd=True,
                                         prefix_dtype=F32, with_grad_out=True)
    kb, vb = (prefix_kv_buffer(B, L, Hkv, D, P, dtype=dtype, device=DEV) for _ in range(2))
    with torch.no_grad():
        kb.copy_(k)
        vb.copy_(v)
    kb.requires_grad_(True)
    vb.requires_grad_(True)
    qq, ppk, ppv = (t.clone().requires_grad_(True) for t in (q, pk, pv))
    version = kb._version
    with peft_kernels.use_backend("concat", strict=True):
        out = prefix_attention(qq, kb, vb, ppk, ppv, causal=True)
    seen = {}
    kb.register_hook(lambda g: seen.setdefault("dk", g))
    grads = torch.autograd.grad(out, (qq, kb, vb, ppk, ppv), do)
    assert kb._version == version and seen["dk"].stride() == kb.stride()
    _assert_within_twice_eager("reserved", out, grads, (q, k, v, pk, pv), do, None, floor=1e-3)
