"""The CUDA C++ prefix-and-merge kernels' own source, run on the CPU.

There is no GPU here, so tests/native/prefix_merge_emulation.cpp compiles csrc/include/peft_kernels/
prefix_merge_kernels.cuh (the code the sm_90a build launches) for the host, one std::thread per CUDA thread and a
std::barrier per block, shared memory NaN-poisoned; the host-side launch logic (checks, params, grid, splits,
partial sums) is the same code too. Checked against the PyTorch oracle (prefix_merge_torch /
prefix_merge_backward_torch): outputs, lse, dq updated in place, fp32 prefix gradients, rows without a real key,
vector and element-wise loads, several forward tiles, backward splits and key chunks, GQA, shared and per-batch
prefixes, determinism. What this cannot check: timing, races that only warp scheduling exposes, fast-math rounding.
"""

import importlib
import pathlib

import pytest
import torch

from tests.helpers import assert_close

pa = importlib.import_module("peft_kernels.ops.prefix_attention")
ROOT = pathlib.Path(__file__).resolve().parents[1]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    return load(
        name="pk_prefix_merge_emulation",
        sources=[str(ROOT / "tests" / "native" / "prefix_merge_emulation.cpp")],
        extra_include_paths=[str(ROOT / "csrc" / "include")],
        extra_cflags=["-O2", "-std=c++20"],
        verbose=False,
    )


def _inputs(dtype, B, Hq, Hkv, Lq, P, D, shared, prefix_dtype, hl, dead, misaligned=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    def act():
        if misaligned:  # rows start 1 element off a 16-byte boundary: the element-wise loads
            return rnd(B, Hq, Lq, D + 1)[..., 1:]
        return rnd(B, Lq, Hq, D).transpose(1, 2) if hl else rnd(B, Hq, Lq, D)

    q, o_c, do, dq = act(), act(), act(), act()
    pshape = (Hkv, P, D) if shared else (B, Hkv, P, D)
    pk, pv = rnd(*pshape, dt=prefix_dtype), rnd(*pshape, dt=prefix_dtype)
    lse_c = rnd(B, Hq, Lq, dt=F32) * 2 + 1.0
    if dead:  # rows that see no real key: lse_c = -inf, O_c garbage (NaN) that must not be read
        lse_c[:, :, : Lq // 3 + 1] = float("-inf")
        o_c[:, :, : Lq // 3 + 1] = float("nan")
    return q, pk, pv, o_c, lse_c, do, dq


# (dtype, B, Hq, Hkv, Lq, P, D, shared, prefix dtype, HF layout, dead rows[, misaligned])
CASES = {
    "fp32-mha-L9-P5-D16-sh": (F32, 2, 2, 2, 9, 5, 16, True, F32, False, True),
    "fp32-gqa4-L300-P70-D24-pb-hl": (F32, 1, 8, 2, 300, 70, 24, False, F32, True, True),  # 3 splits, 3 key chunks
    "fp32-mqa-L130-P1-D36-sh": (F32, 2, 3, 1, 130, 1, 36, True, F32, False, False),  # 2 fwd tiles, D % 8 != 0
    "fp16-mha-L40-P33-D32-sh-fp32prefix-hl": (F16, 2, 2, 2, 40, 33, 32, True, F32, True, True),
    "bf16-gqa-L17-P8-D40-pb-bf16prefix": (BF16, 1, 4, 2, 17, 8, 40, False, BF16, False, False),
    "fp16-mha-L1-P3-D8-sh": (F16, 3, 2, 2, 1, 3, 8, True, F32, False, False),
    "fp32-mha-L600-P4-D8-sh": (F32, 1, 1, 1, 600, 4, 8, True, F32, False, True),  # 2 splits of 512 rows
    "fp16-mha-L21-P6-D16-sh-misaligned": (F16, 1, 2, 1, 21, 6, 16, True, F32, False, True, True),
}


def _copy(t):
    """A copy with t's strides and, for the misaligned views, t's 1-element offset (clone would compact those)."""
    if t.is_contiguous() or t.transpose(1, 2).is_contiguous():
        return t.clone()
    return torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)[..., 1:].copy_(t)


def _tol(dtype):
    return {F32: (2e-5, 2e-5), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}[dtype]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_emulated_kernels_match_the_pytorch_oracle(emu, case):
    dtype, B, Hq, Hkv, Lq, P, D, shared, pdt, hl, dead, *mis = CASES[case]
    q, pk, pv, o_c, lse_c, do, dq = _inputs(dtype, B, Hq, Hkv, Lq, P, D, shared, pdt, hl, dead, bool(mis))
    scale = D**-0.5
    rtol, atol = _tol(dtype)

    out_ref = o_c.clone()
    lse_ref = pa.prefix_merge_torch(q, pk, pv, out_ref, lse_c, scale)
    out = _copy(o_c)
    assert out.stride() == o_c.stride() and out.storage_offset() == o_c.storage_offset()
    lse = emu.fwd(q, pk, pv, out, lse_c, scale)
    assert lse.dtype == F32 and lse.shape == (B, Hq, Lq) and lse.is_contiguous()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert out.stride() == o_c.stride()  # written in place, in the caller's layout
    assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5, name="lse")
    assert_close(out, out_ref, rtol=rtol, atol=atol, name="out")

    dq_ref = dq.clone()
    dpk_ref, dpv_ref = pa.prefix_merge_backward_torch(do, q, pk, pv, out_ref, lse_ref, dq_ref, scale)
    dq_got = _copy(dq)
    dpk, dpv = emu.bwd(do, q, pk, pv, out_ref, lse_ref, dq_got, scale)
    assert dpk.dtype == F32 and dpk.shape == pk.shape and dpv.shape == pv.shape
    assert_close(dq_got, dq_ref, rtol=rtol, atol=atol, name="dq")
    # fp32 accumulation over up to a few thousand rows: relative to the gradient's scale.
    for name, a, r in (("dpk", dpk, dpk_ref), ("dpv", dpv, dpv_ref)):
        assert_close(a, r.float(), rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()), name=name)
    # Deterministic: the same bits on a second run.
    dq2 = _copy(dq)
    dpk2, dpv2 = emu.bwd(do, q, pk, pv, out_ref, lse_ref, dq2, scale)
    assert torch.equal(dq2, dq_got) and torch.equal(dpk2, dpk) and torch.equal(dpv2, dpv)


def test_emulated_host_checks_refuse_bad_inputs(emu):
    q, pk, pv, o_c, lse_c, do, dq = _inputs(F32, 1, 4, 2, 8, 3, 16, True, F32, False, False)
    bad = {
        "head dim D = 264": (torch.randn(1, 4, 8, 264), torch.randn(2, 3, 264), torch.randn(2, 3, 264),
                             torch.randn(1, 4, 8, 264), lse_c),
        "float16, bfloat16 or float32": (q.double(), pk, pv, o_c.double(), lse_c),
        "must have q's shape": (q, pk, pv, o_c[:, :, :5], lse_c),
        "lse_c must be [B, Hq, Lq]": (q, pk, pv, o_c, lse_c[:, :, :5]),
        "multiple of the KV heads": (q[:, :3], pk, pv, o_c[:, :3], lse_c[:, :3]),
        "1 <= P": (q, pk[:, :0], pv[:, :0], o_c, lse_c),
        "unit-stride last dim": (q.transpose(-1, -2).contiguous().transpose(-1, -2), pk, pv, o_c, lse_c),
    }
    for needle, args in bad.items():
        with pytest.raises(RuntimeError, match="peft_kernels: prefix_merge_fwd_emulated: ") as info:
            emu.fwd(*args, 0.125)
        assert needle in str(info.value), (needle, str(info.value))


def test_emulated_backward_of_an_empty_query_range(emu):
    q, pk, pv, o_c, lse_c, do, dq = _inputs(F32, 2, 2, 2, 0, 3, 16, False, F32, False, False)
    assert emu.fwd(q, pk, pv, o_c, lse_c, 0.2).shape == (2, 2, 0)
    dpk, dpv = emu.bwd(do, q, pk, pv, o_c, lse_c, dq, 0.2)
    assert dpk.shape == pk.shape and not dpk.any() and not dpv.any()
