"""bias_only_linear (BitFit): reference vs float64 and nn.Linear; native backend; opcheck, gradcheck, compile."""

import pytest
import torch
import torch.nn.functional as F

import peft_kernels
from peft_kernels.ops.bias_only import _bias_only_linear_backward_op, _bias_only_linear_op, bias_only_linear
from tests.helpers import assert_close, assert_within_eager_error

CPU_BACKENDS = ["reference", "cpu"]


def make(M, K, N, dtype=torch.float32, bias_dtype=None):
    return (torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype) / K**0.5,
            torch.randn(N, dtype=bias_dtype or dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 8, 4), (123, 40, 431), (64, 100, 72)])
def test_matches_nn_linear_with_trainable_bias(backend, shape):
    x, W, b = make(*shape)
    linear = torch.nn.Linear(shape[1], shape[2])
    with torch.no_grad():
        linear.weight.copy_(W)
        linear.bias.copy_(b)
    linear.weight.requires_grad_(False)
    x1 = x.clone().requires_grad_(True)
    y_ref = linear(x1)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    x2, b2 = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    with peft_kernels.use_backend(backend, strict=True):
        y = bias_only_linear(x2, W, b2)
    y.backward(dy)
    assert_close(y.detach(), y_ref.detach())
    assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    assert_close(b2.grad, linear.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_activations_fp32_bias(backend):
    x, W, b = make(123, 64, 96, dtype=torch.bfloat16, bias_dtype=torch.float32)
    dy = torch.randn(123, 96, dtype=torch.bfloat16)
    b_ours = b.clone().requires_grad_(True)
    with peft_kernels.use_backend(backend, strict=True):
        y = bias_only_linear(x, W, b_ours)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and b_ours.grad.dtype == torch.float32
    oracle = x.double() @ W.double().t() + b.double()
    eager = F.linear(x, W, b.to(torch.bfloat16))
    assert_within_eager_error(y.detach(), eager, oracle, name="y")
    # The bias gradient is summed in fp32 and kept in fp32 (not rounded to bf16 on the way).
    assert_close(b_ours.grad, dy.double().sum(0).float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_3d_input(backend):
    x = torch.randn(2, 5, 16)
    W, b = torch.randn(8, 16), torch.randn(8)
    with peft_kernels.use_backend(backend, strict=True):
        assert_close(bias_only_linear(x, W, b), F.linear(x, W, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend):
    x, W, b = make(6, 5, 4, dtype=torch.float64)
    x.requires_grad_(True)
    b.requires_grad_(True)
    with peft_kernels.use_backend(backend, strict=True):
        assert torch.autograd.gradcheck(lambda x, b: bias_only_linear(x, W, b), (x, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x, W, b = make(7, 6, 5)
    b.requires_grad_(True)
    torch.library.opcheck(_bias_only_linear_op, (x, W, b, backend))
    torch.library.opcheck(
        _bias_only_linear_backward_op,
        (torch.randn(7, 5).bfloat16(), W.bfloat16(), torch.float32, backend, [True, True]),
    )


def test_compile_fullgraph():
    x, W, b = make(9, 8, 4)
    b.requires_grad_(True)
    f = torch.compile(lambda x, W, b: bias_only_linear(x, W, b).sum(), fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(f(x, W, b), [b])
    assert_close(g, torch.full((4,), 9.0))


def test_trainable_weight_is_refused():
    x, W, b = make(3, 4, 2)
    W.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="bias_only_linear: weight requires grad"):
        bias_only_linear(x, W, b)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.randn(3, 4), torch.randn(2, 5), torch.randn(2)), ValueError, r"bias_only_linear: weight .* expected 4"),
        ((torch.randn(3, 4), torch.randn(2, 4), torch.randn(3)), ValueError, r"bias_only_linear: bias .* expected 2"),
        ((torch.randn(3, 4), torch.randn(2, 4).double(), torch.randn(2)), TypeError, r"bias_only_linear: weight has"),
        ((torch.randn(3, 4), torch.randn(2, 4), torch.randn(2, 1)), ValueError, r"bias_only_linear: bias must be 1-D"),
    ],
)
def test_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        bias_only_linear(*args)
