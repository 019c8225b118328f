"""prefix_attention: the reference vs SDPA on concatenated K/V with an explicit mask; opcheck, gradcheck,
compile, validation. (The Triton kernel is tested under the interpreter in tests/triton.)"""

import pytest
import torch
import torch.nn.functional as F

from peft_kernels.ops.prefix_attention import (
    _prefix_attention_backward_op,
    _prefix_attention_op,
    prefix_attention,
    prefix_attention_mask,
    prefix_attention_reference,
)
from tests.helpers import assert_close
from tests.prefix_attention_cases import concat_kv


def make(B=2, Hq=4, Hkv=2, Lq=17, Lk=17, D=16, P=5, shared=True, dtype=torch.float32):
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    pshape = (Hkv, P, D) if shared else (B, Hkv, P, D)
    return q, k, v, torch.randn(pshape, dtype=dtype), torch.randn(pshape, dtype=dtype)


def padding_mask(B, L):
    lengths = torch.randint(1, L + 1, (B,))
    lengths[0] = L
    return torch.arange(L)[None, :] < lengths[:, None]


def sdpa_oracle(q, k, v, pk, pv, causal, kpm, scale=None):
    B, _, Lq, _ = q.shape
    Lk, P = k.shape[2], pk.shape[-2]
    K, V = (t.double() for t in concat_kv(q, k, v, pk, pv))
    mask = prefix_attention_mask(B, Lq, Lk, P, causal, kpm, q.device)
    return F.scaled_dot_product_attention(q.double(), K, V, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)])
def test_matches_sdpa_with_explicit_mask(causal, padded, shared, heads):
    q, k, v, pk, pv = make(Hq=heads[0], Hkv=heads[1], shared=shared)
    kpm = padding_mask(2, 17) if padded else None
    out = prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=kpm)
    assert_close(out, sdpa_oracle(q, k, v, pk, pv, causal, kpm).float())
    assert_close(out, prefix_attention_reference(q, k, v, pk, pv, causal, kpm, upcast=True))


@pytest.mark.parametrize("Lq, Lk", [(1, 9), (3, 12), (1, 1)])
def test_decoding_bottom_right_causal(Lq, Lk):
    q, k, v, pk, pv = make(Lq=Lq, Lk=Lk, P=3)
    out = prefix_attention(q, k, v, pk, pv, causal=True)
    assert_close(out, sdpa_oracle(q, k, v, pk, pv, True, None).float())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_gradients_match_autograd_of_oracle(causal, shared):
    q, k, v, pk, pv = make(shared=shared, Lq=11, Lk=11)
    kpm = padding_mask(2, 11)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    out = prefix_attention(*leaves, causal=causal, key_padding_mask=kpm, scale=0.3)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, pk, pv)]
    ref = sdpa_oracle(*leaves64, causal, kpm, scale=0.3)
    grads64 = torch.autograd.grad(ref, leaves64, do.double())
    for name, g, g64 in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], grads, grads64):
        assert_close(g, g64.float(), rtol=1e-4, atol=1e-5, name=name)


def test_bf16_inputs_fp32_prefix():
    q, k, v, pk, pv = make(dtype=torch.bfloat16)
    pk32, pv32 = pk.float().requires_grad_(True), pv.float().requires_grad_(True)
    out = prefix_attention(q, k, v, pk32, pv32, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert pk32.grad.dtype == torch.float32
    oracle = sdpa_oracle(q, k, v, pk32.detach(), pv32.detach(), True, None)
    assert_close(out, oracle.to(torch.bfloat16), dtype=torch.bfloat16)


def test_gradcheck_float64():
    q, k, v, pk, pv = make(B=1, Hq=2, Hkv=1, Lq=4, Lk=4, D=3, P=2, dtype=torch.float64)
    kpm = torch.tensor([[True, True, False, True]])
    inputs = [t.requires_grad_(True) for t in (q, k, v, pk, pv)]
    assert torch.autograd.gradcheck(lambda *t: prefix_attention(*t, causal=True, key_padding_mask=kpm), inputs)


def test_opcheck():
    q, k, v, pk, pv = make(B=1, Lq=5, Lk=5, D=8, P=2)
    kpm = torch.tensor([[True, True, True, False, True]])
    for t in (q, pk):
        t.requires_grad_(True)
    torch.library.opcheck(_prefix_attention_op, (q, k, v, pk, pv, True, kpm, 0.35, "reference"))
    out, lse = _prefix_attention_op(q.detach(), k, v, pk.detach(), pv, True, kpm, 0.35, "reference")
    torch.library.opcheck(
        _prefix_attention_backward_op,
        (torch.randn_like(out), q.detach(), k, v, pk.detach(), pv, out, lse, True, kpm, 0.35, "reference"),
    )


def test_compile_fullgraph():
    q, k, v, pk, pv = make(B=1, Lq=6, Lk=6, D=8, P=2)
    pk.requires_grad_(True)

    def f(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, causal=True).square().sum()

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


def test_per_batch_prefix_single_batch_and_head_backward():
    """dprefix and dk are slices of one buffer when B * Hkv == 1: they must come back as separate tensors."""
    q, k, v, pk, pv = (t.requires_grad_(True) for t in make(B=1, Hq=1, Hkv=1, Lq=5, Lk=5, D=8, P=3, shared=False))
    prefix_attention(q, k, v, pk, pv, causal=True).sum().backward()
    assert pk.grad.shape == pk.shape and k.grad.shape == k.shape
