"""GPU checks of the native CUDA and Triton backends (skipped without CUDA; benchmarks/gpu_suite.sh runs them)."""

import pytest
import torch
import torch.nn.functional as F

import peft_kernels
from peft_kernels import _config
from peft_kernels.ops.bias_only import bias_only_linear
from peft_kernels.ops.lora import lora_linear, lora_linear_reference
from tests.helpers import assert_within_eager_error

pytestmark = pytest.mark.gpu


def _lora_inputs(M, K, N, r, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, device="cuda", dtype=dtype, generator=g)
    A = torch.randn(r, K, device="cuda", generator=g) / K**0.5
    B = torch.randn(N, r, device="cuda", generator=g) / r**0.5
    return x, W, b, A, B


def _fwd_bwd(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_(i in (0, 2, 3, 4)) for i, t in enumerate(inputs)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [leaves[i].grad for i in (0, 2, 3, 4)]


@pytest.mark.parametrize("backend", ["aten", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64, 96, 1), (123, 431, 256, 16), (1024, 4096, 1024, 64), (2048, 768, 4096, 128)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_lora_backends_within_eager_error(backend, dtype, shape, dropout_p):
    M, K, N, r = shape
    inputs = _lora_inputs(M, K, N, r, dtype)
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    oracle = _fwd_bwd(lambda *t: lora_linear_reference(*t, 2.0, dropout_p, 5, upcast=True), inputs, dy)
    eager = _fwd_bwd(lambda *t: lora_linear_reference(*t, 2.0, dropout_p, 5), inputs, dy)
    with peft_kernels.use_backend(backend, strict=True):
        ours = _fwd_bwd(lambda *t: lora_linear(*t, 2.0, dropout_p, 5), inputs, dy)
    for name, o, e, w in zip(["y", "dx", "db", "dA", "dB"], ours, eager, oracle):
        assert_within_eager_error(o, e, w, factor=2.0, floor=1e-3, name=f"{backend} {name}")


@pytest.mark.parametrize("backend", ["aten", "triton"])
def test_lora_activation_memory_over_frozen_base(backend):
    """Saved activations over the frozen base layer's: S (M x r in bf16) only, dropout included."""
    M, K, N, r = 8192, 4096, 4096, 16
    x, W, _, A, B = _lora_inputs(M, K, N, r, torch.bfloat16)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)

    def held(fn):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = fn()
        torch.cuda.synchronize()
        extra = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
        del y
        return extra

    base = held(lambda: F.linear(x, W))
    with peft_kernels.use_backend(backend, strict=True):
        ours = held(lambda: lora_linear(x, W, None, A, B, 2.0, 0.05))
    assert ours - base <= M * r * 2 * 1.01 + 4096, (backend, ours - base)


def test_measured_dispatch_picks_a_kernel_backend():
    _config.clear_tuning_cache()
    x, W, b, A, B = _lora_inputs(4096, 2048, 2048, 16, torch.bfloat16)
    A.requires_grad_(True)
    lora_linear(x, W, b, A, B)
    choices = _config.tuned_choices()
    assert choices and set(choices.values()) <= {"aten", "triton"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bias_only_cuda(dtype):
    x = torch.randn(2048, 1024, device="cuda", dtype=dtype)
    W = torch.randn(3000, 1024, device="cuda", dtype=dtype) / 32
    b = torch.randn(3000, device="cuda", requires_grad=True)
    dy = torch.randn(2048, 3000, device="cuda", dtype=dtype)
    with peft_kernels.use_backend("cuda", strict=True):
        y = bias_only_linear(x, W, b)
    y.backward(dy)
    oracle = dy.double().sum(0)
    eager = dy.sum(0)
    assert_within_eager_error(b.grad, eager, oracle, factor=2.0, floor=1e-5, name="db")
