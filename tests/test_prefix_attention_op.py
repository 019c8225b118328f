"""prefix_attention: every CPU backend (reference, sdpa = LSE merge on the CPU flash op, concat) against float64
attention over the concatenated K/V with an explicit mask (outputs and all gradients), the PyTorch prefix part
against its own float64 math, no layout copies for transformers' [B, L, H, D] views, fp32 prefix gradients,
opcheck, gradcheck, torch.compile, validation. (The Triton kernels run under the interpreter in tests/triton.)"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import peft_kernels
from peft_kernels.ops.prefix_attention import prefix_attention, prefix_attention_mask, prefix_attention_reference
from tests.helpers import assert_close
from tests.prefix_attention_cases import concat_kv, eager_attention, make_inputs

pa = importlib.import_module("peft_kernels.ops.prefix_attention")
FAMILY = pa.FAMILY
CPU_BACKENDS = ("reference", "sdpa", "concat")


def make(B=2, Hq=4, Hkv=2, Lq=17, Lk=17, D=16, P=5, shared=True, dtype=torch.float32):
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    pshape = (Hkv, P, D) if shared else (B, Hkv, P, D)
    return q, k, v, torch.randn(pshape, dtype=dtype), torch.randn(pshape, dtype=dtype)


def sdpa_oracle(q, k, v, pk, pv, causal, kpm, scale=None):
    B, _, Lq, _ = q.shape
    Lk, P = k.shape[2], pk.shape[-2]
    K, V = (t.double() for t in concat_kv(q, k, v, pk, pv))
    mask = prefix_attention_mask(B, Lq, Lk, P, causal, kpm, q.device)
    return F.scaled_dot_product_attention(q.double(), K, V, attn_mask=mask, scale=scale)


def _fwd_bwd(backend, inputs, do, causal, mask, scale):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with peft_kernels.use_backend(backend, strict=True):
        out = prefix_attention(*leaves, causal=causal, key_padding_mask=mask, scale=scale)
    grads = torch.autograd.grad(out, leaves, do)
    return out.detach(), grads


def _oracle(inputs, do, causal, mask, scale):
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out, _ = eager_attention(*leaves, causal, mask, scale)
    return out.detach(), torch.autograd.grad(out, leaves, do.double())


# (B, Hq, Hkv, Lq, Lk, P, D): P = 1 / 7 / 32, L = 1 / 13 / decoding / chunked prefill / Lq > Lk, GQA, MQA, MHA
SHAPES = {
    "gqa_L13_P7": (2, 4, 2, 13, 13, 7, 16),
    "mha_L13_P1": (2, 2, 2, 13, 13, 1, 24),
    "mqa_L1_P32": (2, 4, 1, 1, 1, 32, 16),
    "gqa_decode_Lq1_Lk19_P7": (3, 4, 2, 1, 19, 7, 16),
    "mha_chunk_Lq5_Lk12_P32": (1, 2, 2, 5, 12, 32, 32),
    "mqa_Lq12_Lk5_P7": (2, 2, 1, 12, 5, 7, 16),
    "gqa_L256_P32": (1, 4, 2, 256, 256, 32, 32),  # the 2048-class shape, reduced for CPU
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "perbatch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_backend_matches_float64_oracle(backend, shape, causal, pad, shared, dtype):
    B, Hq, Hkv, Lq, Lk, P, D = SHAPES[shape]
    if Lq == 256 and (dtype == torch.float64 or not shared):
        pytest.skip("the long shape runs once per backend/mask")
    *inputs, mask, do = make_inputs("cpu", dtype, B, Hq, Hkv, Lq, Lk, P, D, shared, pad, bshd=True,
                                    hole_in_row0=True, with_grad_out=True, seed=Lq * 7 + P)
    scale = 0.7 * D**-0.5
    out, grads = _fwd_bwd(backend, inputs, do, causal, mask, scale)
    ref_out, ref_grads = _oracle(inputs, do, causal, mask, scale)
    assert_close(out, ref_out.to(dtype), name="out")
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        assert_close(g, r.to(dtype), name=name)


@pytest.mark.parametrize("backend", ["sdpa", "concat"])
def test_low_precision_within_twice_eager_error(backend):
    """bf16 activations with fp32 master prefixes: each output/gradient within ~2x of eager bf16's own error."""
    *inputs, mask, do = make_inputs("cpu", torch.bfloat16, 2, 4, 2, 33, 33, 7, 32, True, True, bshd=True,
                                    prefix_dtype=torch.float32, with_grad_out=True, seed=3)
    out, grads = _fwd_bwd(backend, inputs, do, True, mask, 0.2)
    ref_out, ref_grads = _oracle(inputs, do, True, mask, 0.2)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    e_out, _ = eager_attention(*leaves, True, mask, 0.2)
    e_grads = torch.autograd.grad(e_out, leaves, do)
    assert grads[3].dtype == torch.float32 and grads[4].dtype == torch.float32
    for name, a, e, r in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), (out, *grads), (e_out, *e_grads),
                             (ref_out, *ref_grads)):
        err, err_eager = (a.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= 2 * err_eager + 1e-3, f"{name}: {backend} err {err:.3g} vs eager bf16 {err_eager:.3g}"


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_fp32_prefix_grads_are_not_rounded_to_the_activation_dtype(backend):
    """fp32 master prefixes with fp16 activations: dPK/dPV are accumulated and returned in fp32, never rounded to
    fp16 on the way (the op used to cast the prefix to q's dtype first). (`concat` gets dK/dV of the concatenated
    keys from SDPA's backward in q's dtype, so its prefix gradients carry fp16 rounding: not tested here.)"""
    *inputs, mask, do = make_inputs("cpu", torch.float16, 2, 4, 2, 13, 13, 7, 16, True, False, bshd=True,
                                    prefix_dtype=torch.float32, with_grad_out=True, seed=11)
    _, grads = _fwd_bwd(backend, inputs, do, True, mask, 0.25)
    _, ref_grads = _oracle(inputs, do, True, mask, 0.25)
    for g, r in zip(grads[3:], ref_grads[3:]):
        assert g.dtype == torch.float32
        # Values fp16 cannot hold: no rounding to fp16 happened on the way.
        assert (g.to(torch.float16).float() != g).float().mean() > 0.5
        err = (g.double() - r).abs().max()
        rounding = (r.to(torch.float16).double() - r).abs().max()
        assert err <= rounding, f"prefix grad error {err:.3g} exceeds one fp16 rounding ({rounding:.3g})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hf_layout_no_copy_and_strided_grad_out(backend):
    """transformers passes [B, H, L, D] views of [B, L, H, D] tensors: the output and every gradient come back in
    that layout (no contiguous copy), and a strided upstream gradient is accepted as is."""
    *inputs, mask = make_inputs("cpu", torch.float32, 2, 4, 2, 13, 13, 7, 16, True, True, bshd=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with peft_kernels.use_backend(backend, strict=True):
        out = prefix_attention(*leaves, causal=True, key_padding_mask=mask)
    assert out.stride() == leaves[0].stride(), (out.stride(), leaves[0].stride())
    do = torch.randn(2, 13, 4, 16).transpose(1, 2)  # strided like transformers' own gradient
    grads = torch.autograd.grad(out, leaves, do)
    for g, t in zip(grads, leaves):
        assert g.shape == t.shape and g.stride() == t.stride(), (g.stride(), t.stride())
    _, ref_grads = _oracle(inputs, do, True, mask, 16**-0.5)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r.float())


def test_dispatch_prefers_the_composition_on_cpu():
    """CPU rule (measured, NOTES.md): one flash call over [prefix; k] unless causal attention is long, where the
    explicit mask it needs loses to the LSE merge on flash's own causal path."""
    *inputs, mask = make_inputs("cpu", torch.float32, 2, 4, 2, 13, 13, 7, 16, True, True)
    assert FAMILY.select(pa.PrefixInputs(*inputs, True, mask, 0.25)) == ("concat", "concat")
    assert FAMILY.select(pa.PrefixInputs(*inputs, False, mask, 0.25)) == ("concat", "concat")
    q, k = torch.randn(1, 2, 600, 16), torch.randn(1, 2, 600, 16)
    assert FAMILY.select(pa.PrefixInputs(q, k, k, *inputs[3:], True, None, 0.25)) == ("sdpa", "sdpa")
    # An input the fused SDPA op cannot take falls back to the next that can, and says why.
    empty = pa.PrefixInputs(inputs[0], inputs[1][:, :, :0], inputs[2][:, :, :0], *inputs[3:], True, None, 0.25)
    assert "Lk = 0" in FAMILY.why_not_reason("sdpa", empty)
    assert FAMILY.select(empty)[0] == "reference"


# --- the PyTorch prefix part (the CPU half of the sdpa backend and the Triton kernels' oracle) --------------------
@pytest.mark.parametrize("shared", [True, False])
def test_prefix_merge_torch_against_float64_split_softmax(shared):
    """Merging the prefix into attention over the real keys equals attention over all keys, rows without a visible
    real key (lse_c = -inf, O_c garbage) included."""
    *inputs, mask, do = make_inputs("cpu", torch.float64, 2, 4, 2, 9, 9, 7, 8, shared, True, with_grad_out=True)
    q, k, v, pk, pv = inputs
    allowed = pa._allowed_keys(2, 9, 9, 0, True, mask, q.device)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    s = s.masked_fill(~allowed, float("-inf"))
    lse_c = torch.logsumexp(s, -1)
    o_c = torch.softmax(s, -1).nan_to_num(float("nan")) @ v.repeat_interleave(2, 1)  # NaN rows where all masked
    assert torch.isinf(lse_c).any() and torch.isnan(o_c).any()
    lse = pa.prefix_merge_torch(q, pk, pv, o_c, lse_c, 0.3)
    ref_out, ref_lse = eager_attention(q, k, v, pk, pv, True, mask, 0.3)
    assert_close(o_c, ref_out, name="out")
    assert_close(lse, ref_lse, name="lse")


def test_dead_rows_mark_rows_without_a_visible_real_key():
    kpm = torch.tensor([[True] * 6, [False, False, True, True, True, False]])
    dead = pa._dead_rows(2, 6, 6, True, kpm, "cpu")
    assert dead[0, 0].tolist() == [False] * 6 and dead[1, 0].tolist() == [True, True, False, False, False, False]
    assert pa._dead_rows(1, 4, 2, True, None, "cpu")[0, 0].tolist() == [True, True, False, False]
    assert pa._dead_rows(1, 4, 4, True, None, "cpu") is None


# --- framework contract ---------------------------------------------------------------------------------------
def test_bf16_inputs_fp32_prefix_default_dispatch():
    q, k, v, pk, pv = make(dtype=torch.bfloat16)
    pk32, pv32 = pk.float().requires_grad_(True), pv.float().requires_grad_(True)
    out = prefix_attention(q, k, v, pk32, pv32, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert pk32.grad.dtype == torch.float32
    oracle = sdpa_oracle(q, k, v, pk32.detach(), pv32.detach(), True, None)
    assert_close(out, oracle.to(torch.bfloat16), dtype=torch.bfloat16)
    assert_close(out, prefix_attention_reference(q, k, v, pk32, pv32, True, upcast=True), dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    q, k, v, pk, pv = make(B=1, Hq=2, Hkv=1, Lq=4, Lk=4, D=3, P=2, dtype=torch.float64)
    kpm = torch.tensor([[True, True, False, True]])
    inputs = [t.requires_grad_(True) for t in (q, k, v, pk, pv)]
    with peft_kernels.use_backend(backend, strict=True):
        assert torch.autograd.gradcheck(lambda *t: prefix_attention(*t, causal=True, key_padding_mask=kpm), inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    *inputs, mask, do = make_inputs("cpu", torch.float32, 1, 2, 1, 5, 5, 2, 8, True, True, bshd=True,
                                    with_grad_out=True)
    inputs = [t.requires_grad_(True) for t in inputs]
    fwd_op, bwd_op = FAMILY.custom_ops
    torch.library.opcheck(fwd_op, (*inputs, True, mask, 0.35, backend, backend))
    out, lse = fwd_op(*(t.detach() for t in inputs), True, mask, 0.35, backend, backend)
    torch.library.opcheck(bwd_op, (do, *(t.detach() for t in inputs), out, lse, True, mask, 0.35, [True] * 5,
                                   backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    q, k, v, pk, pv = make(B=1, Lq=6, Lk=6, D=8, P=2)
    pk.requires_grad_(True)

    def f(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, causal=True).square().sum()

    with peft_kernels.use_backend(backend, strict=True):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        (g,) = torch.autograd.grad(compiled(q, k, v, pk, pv), [pk])
        (g_ref,) = torch.autograd.grad(f(q, k, v, pk, pv), [pk])
    assert_close(g, g_ref)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(pk=torch.randn(2, 5, 8), pv=torch.randn(2, 5, 8)), ValueError, r"prefix_k .*head dim"),
        (dict(pv=torch.randn(2, 4, 16)), ValueError, r"prefix_k of shape .* and prefix_v"),
        (dict(pk=torch.randn(3, 5, 16), pv=torch.randn(3, 5, 16)), ValueError, r"prefix_k .*KV heads"),
        (dict(pk=torch.randn(2, 0, 16), pv=torch.randn(2, 0, 16)), ValueError, r"P = 0"),
        (dict(pv=torch.randn(2, 5, 16).double()), TypeError, r"prefix_v has dtype"),
        (dict(kpm=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"key_padding_mask has shape"),
        (dict(kpm=torch.ones(2, 17)), TypeError, r"key_padding_mask must have dtype"),
        (dict(k=torch.randn(2, 3, 17, 16), v=torch.randn(2, 3, 17, 16)), ValueError, r"multiple of the KV heads"),
        (dict(q=torch.randn(2, 4, 17)), ValueError, r"q must be 4-D"),
        (dict(k=torch.randn(2, 2, 17, 16).double()), TypeError, r"k has dtype"),
        (dict(scale=-1.0), ValueError, r"scale must be > 0"),
    ],
)
def test_validation(change, exc, match):
    q, k, v, pk, pv = make()
    t = dict(q=q, k=k, v=v, pk=pk, pv=pv, kpm=None, scale=None)
    t.update(change)
    with pytest.raises(exc, match="prefix_attention: .*" + match):
        prefix_attention(t["q"], t["k"], t["v"], t["pk"], t["pv"], key_padding_mask=t["kpm"], scale=t["scale"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_batch_prefix_single_batch_and_head_backward(backend):
    """dprefix and dk are slices of one buffer when B * Hkv == 1: they must come back as separate tensors."""
    q, k, v, pk, pv = (t.requires_grad_(True) for t in make(B=1, Hq=1, Hkv=1, Lq=5, Lk=5, D=8, P=3, shared=False))
    with peft_kernels.use_backend(backend, strict=True):
        prefix_attention(q, k, v, pk, pv, causal=True).sum().backward()
    assert pk.grad.shape == pk.shape and k.grad.shape == k.shape


def test_sdpa_backend_makes_no_layout_copy():
    """On HF-layout inputs the sdpa backend returns the very buffers PyTorch's flash op and its backward wrote: the
    output (merged in place) and dQ/dK/dV, no contiguous copy on the way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        ptrs: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "_scaled_dot_product_flash_attention_for_cpu" in func.overloadpacket.__name__:
                self.ptrs.update(t.data_ptr() for t in out if isinstance(t, torch.Tensor))
            return out

    *inputs, mask = make_inputs("cpu", torch.float32, 2, 4, 2, 13, 13, 7, 16, True, True, bshd=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    do = torch.randn(2, 13, 4, 16).transpose(1, 2)
    with peft_kernels.use_backend("sdpa", strict=True), Record() as rec:
        out = prefix_attention(*leaves, causal=True, key_padding_mask=mask)
        grads = torch.autograd.grad(out, leaves, do)
    assert out.data_ptr() in rec.ptrs
    assert all(g.data_ptr() in rec.ptrs for g in grads[:3])


@pytest.mark.parametrize("shape", [(2, 4, 0, 8), (0, 4, 3, 8)], ids=["Lq0", "B0"])
def test_empty_inputs_fall_back_instead_of_crashing(shape):
    """The CPU flash op divides by zero on an empty q (SIGFPE): the SDPA backends refuse it, the reference serves."""
    q = torch.randn(shape, requires_grad=True)
    k = torch.randn(shape[0], 2, 5, 8)
    pk = torch.randn(2, 3, 8, requires_grad=True)
    assert "is empty" in FAMILY.why_not_reason("sdpa", pa.PrefixInputs(q, k, k, pk, pk, True, None, 0.3))
    out = prefix_attention(q, k, k, pk, pk, causal=True)
    out.sum().backward()
    assert out.shape == q.shape and torch.equal(pk.grad, torch.zeros_like(pk))


def test_measured_dispatch_times_the_compositions_and_keeps_one():
    """With measured dispatch on (the CUDA default; forced here on CPU) the family times every backend that serves
    the shape once per tune key -- sdpa and concat on CPU -- keeps the faster, and the answer is still exact."""
    from peft_kernels import _config

    *inputs, mask, do = make_inputs("cpu", torch.float64, 2, 4, 2, 13, 13, 7, 16, True, True, bshd=True,
                                    with_grad_out=True, seed=21)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    _config.clear_tuning_cache()
    FAMILY._cache.clear()
    try:
        with _config.tuning(True):
            out = prefix_attention(*leaves, causal=True, key_padding_mask=mask)
        chosen = {k: v for k, v in _config.tuned_choices().items() if k[0] == "prefix_attention"}
        assert len(chosen) == 1 and set(chosen.values()) <= {"sdpa", "concat"}
        grads = torch.autograd.grad(out, leaves, do)
        ref_out, ref_grads = _oracle(inputs, do, True, mask, 16**-0.5)
        assert_close(out, ref_out)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r)
    finally:
        _config.clear_tuning_cache()
        FAMILY._cache.clear()
