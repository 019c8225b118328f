"""bias_only_norm (LayerNorm / RMSNorm with a frozen weight and a trainable bias): the reference vs float64 math,
F.layer_norm / HF's RMSNorm, autograd; dw never computed; opcheck, gradcheck, torch.compile; validation.
(Triton kernels: tests/triton/test_bias_norm_triton.py; backend-vs-reference: tests/test_op_contract.py.)"""

import pytest
import torch
import torch.nn.functional as F

from peft_kernels.ops.bias_norm import FAMILY, bias_only_norm, bias_only_norm_reference
from tests.helpers import assert_close, assert_within_eager_error


def make(M, H, dtype=torch.float32, param_dtype=None):
    pdt = param_dtype or dtype
    return (torch.randn(M, H, dtype=dtype) * 2 + 0.5, (1 + 0.3 * torch.randn(H)).to(pdt), torch.randn(H, dtype=pdt))


def _float64_grads(x, w, b, dy, eps, rms):
    x64, b64 = x.double().requires_grad_(True), b.double().requires_grad_(True)
    y = bias_only_norm_reference(x64, w.double(), b64, eps, rms)
    y.backward(dy.double())
    return y.detach(), x64.grad, b64.grad


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("M, H", [(1, 80), (123, 431), (37, 80)])
def test_op_matches_float64_and_torch(M, H, rms):
    x, w, b = make(M, H)
    dy = torch.randn(M, H)
    y64, dx64, db64 = _float64_grads(x, w, b, dy, 1e-5, rms)
    xg, bg = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = bias_only_norm(xg, w, bg, 1e-5, rms)
    y.backward(dy)
    assert_close(y.detach(), y64.float(), rtol=1e-5, atol=1e-5, name="y")
    assert_close(xg.grad, dx64.float(), rtol=1e-4, atol=1e-5, name="dx")
    assert_close(bg.grad, db64.float(), rtol=1e-5, atol=1e-5, name="db")
    torch_y = F.rms_norm(x, (H,), w, 1e-5) + b if rms else F.layer_norm(x, (H,), w, b, 1e-5)
    assert_close(y.detach(), torch_y, rtol=1e-5, atol=1e-5, name="vs torch")


def test_rms_matches_hf_llama_rmsnorm_bitwise_in_fp32():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(431, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 431)
    assert transformers is not None
    ours = bias_only_norm(x, norm.weight.detach(), torch.zeros(431), 1e-6, rms=True)
    assert torch.equal(ours, norm(x))  # a zero bias changes nothing, to the bit


def test_low_precision_and_fp32_params():
    x, w, b = make(123, 80, dtype=torch.bfloat16, param_dtype=torch.float32)
    dy = torch.randn(123, 80, dtype=torch.bfloat16)
    bg = b.clone().requires_grad_(True)
    y = bias_only_norm(x, w, bg)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and bg.grad.dtype == torch.float32
    y64, _, db64 = _float64_grads(x, w, b, dy, 1e-5, False)
    eager = F.layer_norm(x, (80,), w.bfloat16(), b.bfloat16(), 1e-5)
    assert_within_eager_error(y.detach(), eager, y64, name="y")
    assert_close(bg.grad, db64.float(), rtol=1e-5, atol=1e-4)


def test_gradcheck_float64():
    for rms in (False, True):
        x, w, b = make(5, 7, dtype=torch.float64)
        x.requires_grad_(True)
        b.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, b, rms=rms, w=w: bias_only_norm(x, w, b, 1e-5, rms), (x, b))


def test_weight_never_gets_a_gradient_and_only_x_or_b():
    x, w, b = make(9, 16)
    xg = x.clone().requires_grad_(True)
    bias_only_norm(xg, w, b).sum().backward()  # bias frozen
    bg = b.clone().requires_grad_(True)
    bias_only_norm(x, w, bg).sum().backward()  # x needs no grad
    assert xg.grad is not None and w.grad is None
    assert_close(bg.grad, torch.full((16,), 9.0))


def test_opcheck_and_compile():
    fwd, bwd = FAMILY.custom_ops
    x, w, b = make(7, 12)
    x.requires_grad_(True)
    b.requires_grad_(True)
    for rms in (False, True):
        torch.library.opcheck(fwd, (x, w, b, 1e-5, rms, "reference", "reference"))
    f = torch.compile(lambda x, b: bias_only_norm(x, w, b, 1e-5, True).pow(2).sum(), fullgraph=True,
                      backend="aot_eager")
    gx, gb = torch.autograd.grad(f(x, b), [x, b])
    ex, eb = torch.autograd.grad(bias_only_norm_reference(x, w, b, 1e-5, True).pow(2).sum(), [x, b])
    assert_close(gx, ex, rtol=1e-5, atol=1e-6)
    assert_close(gb, eb, rtol=1e-5, atol=1e-6)


def test_3d_input_keeps_its_shape():
    x = torch.randn(2, 3, 8)
    w, b = torch.ones(8), torch.zeros(8)
    assert bias_only_norm(x, w, b).shape == (2, 3, 8)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((torch.randn(3, 4), torch.ones(5), torch.zeros(4)), {}, ValueError, r"bias_only_norm: weight .* expected 4"),
    ((torch.randn(3, 4), torch.ones(4), torch.zeros(3)), {}, ValueError, r"bias_only_norm: bias .* expected 4"),
    ((torch.randn(3, 4), torch.ones(4, 1), torch.zeros(4)), {}, ValueError, r"bias_only_norm: weight must be 1-D"),
    ((torch.randn(3, 4), torch.ones(4), torch.zeros(4)), {"eps": 0.0}, ValueError, r"bias_only_norm: eps must be > 0"),
    ((torch.randn(3, 4), torch.ones(4), torch.zeros(4)), {"rms": 1}, TypeError, r"bias_only_norm: rms must be a bool"),
    ((torch.randn(3, 0), torch.ones(0), torch.zeros(0)), {}, ValueError, r"bias_only_norm: x .* = 0"),
    ((torch.randn(3, 4), torch.ones(4, requires_grad=True), torch.zeros(4)), {}, ValueError,
     r"bias_only_norm: weight requires grad"),
])
def test_validation(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bias_only_norm(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "layer_norm"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("M, H", [(1, 80), (123, 431), (8192, 4096)])
def test_gpu_bf16_within_eager_error(backend, rms, M, H):
    import peft_kernels

    if backend == "layer_norm" and rms:
        pytest.skip("the layer_norm backend serves LayerNorm only")
    g = torch.Generator(device="cuda").manual_seed(M + H)
    x = (torch.randn(M, H, device="cuda", generator=g) * 2).bfloat16()
    w = (1 + 0.3 * torch.randn(H, device="cuda", generator=g)).bfloat16()
    b = torch.randn(H, device="cuda", generator=g).bfloat16()
    dy = torch.randn(M, H, device="cuda", generator=g).bfloat16()

    def run(fn):
        xl, bl = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = fn(xl, bl)
        y.backward(dy)
        return y.detach(), xl.grad, bl.grad

    oracle = run(lambda xl, bl: bias_only_norm_reference(xl, w, bl, 1e-5, rms, upcast=True))
    eager = run(lambda xl, bl: (F.rms_norm(xl, (H,), w, 1e-5) + bl) if rms else F.layer_norm(xl, (H,), w, bl, 1e-5))
    with peft_kernels.use_backend(backend, strict=True):
        ours = run(lambda xl, bl: bias_only_norm(xl, w, bl, 1e-5, rms))
    for name, o, e, o64 in zip(["y", "dx", "db"], ours, eager, oracle):
        assert_within_eager_error(o, e, o64, factor=2.0, floor=1e-3, name=f"{backend} {name}")
