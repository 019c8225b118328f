"""bias_only_linear (BitFit): reference vs float64 and nn.Linear; the aten backend; dW never computed; opcheck of
the native ops, gradcheck, torch.compile; validation. (Triton kernels: tests/triton/test_bias_only_triton.py; the
generated backend-vs-reference tests over tests/cases/bias_only_linear.py: tests/test_op_contract.py.)"""

import pytest
import torch
import torch.nn.functional as F

import peft_kernels
from peft_kernels.ops.bias_only import FAMILY, bias_only_linear, bias_only_linear_reference
from tests.helpers import assert_close, assert_within_eager_error

CPU_BACKENDS = ["reference", "aten"]


def make(M, K, N, dtype=torch.float32, bias_dtype=None):
    return (torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype) / K**0.5,
            torch.randn(N, dtype=bias_dtype or dtype))


@pytest.mark.parametrize("shape", [(1, 80, 431), (123, 431, 80), (123, 80, 80)])
def test_reference_matches_float64(shape):
    x, W, b = make(*shape)
    y64 = x.double() @ W.double().t() + b.double()
    assert_close(bias_only_linear_reference(x, W, b), y64.float(), rtol=1e-5, atol=1e-5)
    assert_close(bias_only_linear_reference(x, W, b, upcast=True), y64.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 80, 431), (123, 431, 80), (123, 80, 431), (64, 100, 72)])
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
def test_only_bias_or_only_x_grad(backend):
    x, W, b = make(37, 24, 40)
    dy = torch.randn(37, 40)
    with peft_kernels.use_backend(backend, strict=True):
        b1 = b.clone().requires_grad_(True)
        bias_only_linear(x, W, b1).backward(dy)  # x needs no grad (the first layer of a BitFit model)
        x2 = x.clone().requires_grad_(True)
        bias_only_linear(x2, W, b).backward(dy)  # the bias frozen (include= left it out)
    assert_close(b1.grad, dy.sum(0), rtol=1e-5, atol=1e-5)
    assert_close(x2.grad, dy @ W, rtol=1e-5, atol=1e-5)


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


def test_no_dw_gemm_runs():
    """The backward runs one GEMM (dx) and one reduction (db), never a dy^T x GEMM: the ATen ops it dispatches
    are counted (on the reference and aten backends), against nn.Linear which runs the same two plus nothing else
    only because its weight is frozen -- the point is that no [N, K] result is ever produced."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.outputs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.outputs.append((str(func.overloadpacket), tuple(t.shape)))
            return out

    M, K, N = 33, 24, 40
    for backend in CPU_BACKENDS:
        x = torch.randn(M, K, requires_grad=True)
        W = torch.randn(N, K)
        b = torch.randn(N, requires_grad=True)
        with peft_kernels.use_backend(backend, strict=True):
            y = bias_only_linear(x, W, b)
        dy = torch.randn(M, N)
        with Shapes() as mode:
            y.backward(dy)
        shapes = [s for _, s in mode.outputs]
        assert (N, K) not in shapes, f"{backend}: a [N, K] tensor (dW) was produced: {mode.outputs}"
        gemms = [f for f, s in mode.outputs if "mm" in f]
        assert len(gemms) <= 1, f"{backend}: more than the dx GEMM ran: {mode.outputs}"
        assert W.grad is None and x.grad is not None and b.grad is not None


def test_native_ops_opcheck():
    ops = torch.ops.peft_kernels
    dy, W = torch.randn(7, 5), torch.randn(5, 6)
    torch.library.opcheck(ops.bias_only_linear_fwd.default, (torch.randn(7, 6), W, torch.randn(5)))
    for needs in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(ops.bias_only_linear_bwd.default, (dy, W, needs, torch.float32))
    torch.library.opcheck(ops.bias_only_linear_bwd.default, (dy.bfloat16(), W.bfloat16(), [True, True], torch.float32))


def test_family_custom_ops_opcheck():
    fwd, bwd = FAMILY.custom_ops
    x, W, b = make(7, 6, 5)
    x.requires_grad_(True)
    b.requires_grad_(True)
    for backend in CPU_BACKENDS:
        torch.library.opcheck(fwd, (x, W, b, backend, backend))
        torch.library.opcheck(bwd, (torch.randn(7, 5), W, torch.float32, [True, True], backend))


def test_compile_fullgraph():
    x, W, b = make(9, 8, 4)
    b.requires_grad_(True)
    f = torch.compile(lambda x, W, b: bias_only_linear(x, W, b).sum(), fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(f(x, W, b), [b])
    assert_close(g, torch.full((4,), 9.0))


def test_autocast_keeps_an_fp32_bias_and_its_grad():
    x, W, b = make(12, 16, 8)
    b.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bias_only_linear(x, W, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert b.grad.dtype == torch.float32
    assert_close(b.grad, torch.full((8,), 12.0))


def test_deterministic_db():
    x, W, b = make(257, 32, 48)
    b.requires_grad_(True)
    dy = torch.randn(257, 48)
    grads = []
    for _ in range(2):
        b.grad = None
        bias_only_linear(x, W, b).backward(dy)
        grads.append(b.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_trainable_weight_is_refused():
    x, W, b = make(3, 4, 2)
    W.requires_grad_(True)
    with pytest.raises(ValueError, match="bias_only_linear: weight requires grad"):
        bias_only_linear(x, W, b)
    with torch.no_grad():  # inference with a trainable W is fine: nothing would compute dW
        bias_only_linear(x, W, b)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.randn(3, 4), torch.randn(2, 5), torch.randn(2)), ValueError, r"bias_only_linear: weight .* expected 4"),
        ((torch.randn(3, 4), torch.randn(2, 4), torch.randn(3)), ValueError, r"bias_only_linear: bias .* expected 2"),
        ((torch.randn(3, 4), torch.randn(2, 4).double(), torch.randn(2)), TypeError, r"bias_only_linear: weight has"),
        ((torch.randn(3, 4), torch.randn(2, 4), torch.randn(2, 1)), ValueError, r"bias_only_linear: bias must be 1-D"),
        ((torch.randn(3, 0), torch.randn(2, 0), torch.randn(2)), ValueError, r"bias_only_linear: x .* in_features = 0"),
        ((torch.randn(3, 4), torch.randn(2, 4), "b"), TypeError, r"bias_only_linear: bias must be a torch.Tensor"),
        ((torch.randn(3, 4).long(), torch.randn(2, 4), torch.randn(2)), TypeError, r"bias_only_linear: x must have"),
    ],
)
def test_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        bias_only_linear(*args)


# ------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA; benchmarks/gpu_suite.sh runs them)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "aten"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, K, N", [(1, 80, 431), (123, 431, 80), (1000, 1024, 4096), (4096, 4096, 1024)])
def test_gpu_backends_within_eager_error(backend, dtype, M, K, N):
    g = torch.Generator(device="cuda").manual_seed(M + K + N)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, device="cuda", generator=g)  # an fp32 master bias
    dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)

    def run(fn, bias):
        xl, bl = x.clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
        y = fn(xl, bl)
        y.backward(dy)
        return y.detach(), xl.grad, bl.grad

    oracle = run(lambda xl, bl: bias_only_linear_reference(xl, W, bl, upcast=True), b.double())
    eager = run(lambda xl, bl: F.linear(xl, W, bl), b.to(dtype))
    with peft_kernels.use_backend(backend, strict=True):
        ours = run(lambda xl, bl: bias_only_linear(xl, W, bl), b)
        again = run(lambda xl, bl: bias_only_linear(xl, W, bl), b)
    assert ours[2].dtype == torch.float32
    for name, o, e, w in zip(["y", "dx", "db"], ours, eager, oracle):
        assert_within_eager_error(o, e.to(o.dtype), w, factor=2.0, floor=1e-3, name=f"{backend} {name}")
    assert torch.equal(ours[2], again[2]), f"{backend}: db differs between two runs"


@pytest.mark.gpu
def test_gpu_saves_no_activation():
    """The BitFit backward needs only W: nothing of size M is held between forward and backward."""
    M, K, N = 8192, 1024, 4096
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, device="cuda", requires_grad=True)
    for backend in ("triton", "cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with peft_kernels.use_backend(backend, strict=True):
            y = bias_only_linear(x, W, b)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before - y.numel() * y.element_size() <= 4096, backend
        del y
