"""The public ops with the triton backend forced: autograd, dtypes, dropout and torch.compile end to end
(the kernels themselves are tested in test_lora_triton.py / test_prefix_attention_triton.py)."""

import pytest
import torch

from tests.helpers import assert_close, assert_within_eager_error, triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

import peft_kernels  # noqa: E402
from peft_kernels.nn import LoRALinear  # noqa: E402
from peft_kernels.ops.lora import lora_linear, lora_linear_reference  # noqa: E402
from peft_kernels.ops.prefix_attention import prefix_attention, prefix_attention_reference  # noqa: E402

LOW = [torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _grads(fn, inputs, dy_seed=0):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(dy_seed)).to(out)
    out.backward(g)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("M, K, N, r", [(1, 16, 24, 1), (123, 40, 72, 16), (33, 100, 48, 8)])
def test_lora_linear_triton_fp32_matches_reference(M, K, N, r, dropout_p):
    x = torch.randn(M, K, device=DEV)
    W, b = torch.randn(N, K, device=DEV) / K**0.5, torch.randn(N, device=DEV)
    A, B = torch.randn(r, K, device=DEV) / K**0.5, torch.randn(N, r, device=DEV)
    inputs = (x, W, b, A, B)
    ref_y, ref_g = _grads(lambda *t: lora_linear_reference(*t, 2.0, dropout_p, 21, upcast=True), inputs)
    with peft_kernels.use_backend("triton", strict=True):
        y, g = _grads(lambda *t: lora_linear(*t, 2.0, dropout_p, 21), inputs)
    assert_close(y, ref_y, rtol=2e-4, atol=2e-4, name="y")
    for name, got, want in zip(["dx", "dW", "db", "dA", "dB"], g, ref_g):
        assert_close(got, want, rtol=5e-4, atol=5e-4, name=name)


@pytest.mark.parametrize("dtype", LOW)
def test_lora_linear_triton_low_precision_fp32_adapters(dtype):
    M, K, N, r = 77, 64, 48, 16
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    W = (torch.randn(N, K, device=DEV) / K**0.5).to(dtype)
    A, B = torch.randn(r, K, device=DEV) / K**0.5, torch.randn(N, r, device=DEV)
    inputs = (x, W, None, A, B)
    oracle = _grads(lambda *t: lora_linear_reference(*t, 2.0, upcast=True), inputs)
    eager = _grads(lambda *t: lora_linear_reference(*t, 2.0), inputs)
    with peft_kernels.use_backend("triton", strict=True):
        ours = _grads(lambda *t: lora_linear(*t, 2.0), inputs)
    assert ours[0].dtype == dtype and ours[1][3].dtype == torch.float32
    assert_within_eager_error(ours[0], eager[0], oracle[0], name="y")
    for name, i in [("dx", 0), ("dA", 3), ("dB", 4)]:
        assert_within_eager_error(ours[1][i], eager[1][i], oracle[1][i], name=name)


def test_lora_linear_module_on_triton_backend_compiles():
    layer = LoRALinear(40, 24, r=8, device=DEV)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 40, device=DEV)
    with peft_kernels.use_backend("triton", strict=True):
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        y.sum().backward()
    assert_close(y.detach(), lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                                   layer.scaling, upcast=True), rtol=2e-4, atol=2e-4)
    assert layer.lora_A.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_prefix_attention_triton_matches_reference(causal, shared):
    B, Hq, Hkv, L, D, P = 2, 4, 2, 19, 64, 5
    q = torch.randn(B, Hq, L, D, device=DEV)
    k, v = torch.randn(B, Hkv, L, D, device=DEV), torch.randn(B, Hkv, L, D, device=DEV)
    pshape = (Hkv, P, D) if shared else (B, Hkv, P, D)
    pk, pv = torch.randn(pshape, device=DEV), torch.randn(pshape, device=DEV)
    kpm = torch.arange(L, device=DEV)[None, :] < torch.tensor([[L], [11]], device=DEV)
    inputs = (q, k, v, pk, pv)
    ref = _grads(lambda *t: prefix_attention_reference(*t, causal, kpm, upcast=True), inputs)
    with peft_kernels.use_backend("triton", strict=True):
        ours = _grads(lambda *t: prefix_attention(*t, causal=causal, key_padding_mask=kpm), inputs)
    assert_close(ours[0], ref[0], rtol=5e-4, atol=5e-4, name="out")
    for name, got, want in zip(["dq", "dk", "dv", "dprefix_k", "dprefix_v"], ours[1], ref[1]):
        assert_close(got, want, rtol=1e-3, atol=1e-3, name=name)


def test_lora_triton_refuses_float64_adapters_and_auto_falls_back():
    x = torch.randn(8, 16, device=DEV)
    W = torch.randn(12, 16, device=DEV)
    A, B = torch.randn(4, 16, device=DEV), torch.randn(12, 4, device=DEV, dtype=torch.float64)
    with peft_kernels.use_backend("triton", strict=True), pytest.raises(NotImplementedError, match="lora_B"):
        lora_linear(x, W, None, A, B)
    with peft_kernels.use_backend("triton"), pytest.warns(UserWarning, match="falling back"):
        y = lora_linear(x, W, None, A, B)
    assert_close(y, lora_linear_reference(x, W, None, A, B, upcast=True), rtol=1e-4, atol=1e-4)
