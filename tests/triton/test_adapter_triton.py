"""Triton bottleneck-adapter kernels (peft_kernels/triton/adapter.py) vs float64 math.

Runs under TRITON_INTERPRET=1 on CPU tensors (fp32 and fp16; bf16 tl.dot is wrong in the interpreter) or natively
on CUDA (bf16 added). Outputs are NaN-poisoned before the kernels write them. Sizes are odd ones:
N = 1, 123; H = 80, 431; bottleneck 1, 8, 64, 256; every activation; the interpreter's small blocks reach the
row, column and split tails.
"""

import pytest
import torch

from tests.helpers import INTERPRET, assert_close, assert_within_eager_error, triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

import peft_kernels  # noqa: E402
from peft_kernels import _config  # noqa: E402
from peft_kernels.ops.adapter import (  # noqa: E402
    ACTIVATIONS,
    FAMILY,
    _reference_backward,
    _reference_forward,
    _route,
    bottleneck_adapter,
    bottleneck_adapter_mixed,
)
from peft_kernels.triton import adapter as ta  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" and not INTERPRET else [])
NAMES = ("dh", "dW_down", "db_down", "dW_up", "db_up")


@pytest.fixture(autouse=True)
def _poison():
    with _config.poison(True):
        yield


def _inputs(N, H, m, dtype, bias=True, A=None, wdtype=torch.float32):
    lead = () if A is None else (A,)
    h = torch.randn(N, H, device=DEV).to(dtype)
    W_down = (torch.randn(*lead, m, H, device=DEV) / H**0.5).to(wdtype)
    W_up = (torch.randn(*lead, H, m, device=DEV) / m**0.5).to(wdtype)
    b_down = (torch.randn(*lead, m, device=DEV) * 0.5).to(wdtype) if bias else None
    b_up = (torch.randn(*lead, H, device=DEV) * 0.5).to(wdtype) if bias else None
    return h, W_down, b_down, W_up, b_up


def _f64(t):
    return None if t is None else t.double()


def _check(ours, eager, oracle, dtype, name):
    """fp32: close to the float64 oracle; half types: the FlashAttention rule against eager in that dtype."""
    if ours is None:
        assert oracle is None, name
        return
    assert not torch.isnan(ours).any(), f"{name}: NaN (an element the kernel did not write?)"
    if dtype == torch.float32:
        assert_close(ours.double(), oracle, dtype=torch.float32, rtol=2e-4, atol=2e-5, name=name)
    else:
        assert_within_eager_error(ours, eager, oracle, factor=2.0, floor=1e-3, name=name)


def _run_and_compare(N, H, m, activation, dtype, residual=True, bias=True, scaling=0.7, needs=(True,) * 5):
    h, Wd, bd, Wu, bu = _inputs(N, H, m, dtype, bias)
    dy = torch.randn(N, H, device=DEV).to(dtype)
    y, z = ta.adapter_forward(h, Wd, bd, Wu, bu, activation, scaling, residual)
    g = ta.adapter_backward(dy, h, Wd, bd, Wu, bu, z, activation, scaling, residual, list(needs))
    # Oracle: float64 math; eager: the reference in the activation dtype (weights cast to it, as PyTorch would).
    y64, z64 = _reference_forward(h.double(), Wd.double(), _f64(bd), Wu.double(), _f64(bu), activation, scaling,
                                  residual)
    g64 = _reference_backward(dy.double(), h.double(), Wd.double(), _f64(bd), Wu.double(), _f64(bu), z64, activation,
                              scaling, residual, list(needs))
    ye, ze = _reference_forward(h, Wd, bd, Wu, bu, activation, scaling, residual)
    ge = _reference_backward(dy, h, Wd, bd, Wu, bu, ze, activation, scaling, residual, list(needs))
    assert y.dtype == dtype and z.dtype == dtype
    _check(y, ye, y64, dtype, "y")
    _check(z, ze, z64, dtype, "z")
    for ours, e, o, w, name in zip(g, ge, g64, (h, Wd, bd, Wu, bu), NAMES):
        if ours is not None:
            assert ours.dtype == w.dtype and ours.shape == w.shape, name
        _check(ours, e, o, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 8, 64, 256])
@pytest.mark.parametrize("H", [80, 431])
@pytest.mark.parametrize("N", [1, 123])
def test_sizes(N, H, m, dtype):
    if m > H:
        pytest.skip("bottleneck wider than the hidden size")
    _run_and_compare(N, H, m, "relu", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, dtype):
    _run_and_compare(123, 80, 8, activation, dtype, scaling=1.3)


@pytest.mark.parametrize("residual, bias", [(False, True), (True, False), (False, False)])
def test_residual_and_bias_variants(residual, bias):
    _run_and_compare(37, 80, 20, "silu", torch.float32, residual=residual, bias=bias)


@pytest.mark.parametrize("needs", [(True, False, False, False, False), (False, True, True, False, False),
                                   (False, False, False, True, True), (False, True, False, True, False)])
def test_partial_needs(needs):
    _run_and_compare(41, 80, 8, "gelu", torch.float32, needs=needs)


@pytest.mark.parametrize("split", [1, 3])
def test_column_pass_splits(split):
    with _config.override_interpret_blocks(cols=(16, 32, split), fwd=(32, 16, 64), rows=(32, 16)):
        _run_and_compare(123, 80, 64, "tanh", torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_adapter_scaling", [False, True])
def test_mixed_batch_equals_each_row_with_its_adapter(dtype, per_adapter_scaling):
    """Rows choose among 3 adapters (one unused); the kernels equal the per-adapter reference, fwd and bwd."""
    A, N, H, m = 4, 57, 80, 8
    h, Wd, bd, Wu, bu = _inputs(N, H, m, dtype, A=A)
    ids = torch.randint(0, 3, (N,), device=DEV)
    ids[:20] = 1  # a long run: row blocks with one adapter, and blocks that straddle two
    scal = (0.5, 1.0, 2.0, 3.0) if per_adapter_scaling else (0.8,) * A
    s_arg = torch.tensor(scal, device=DEV) if per_adapter_scaling else scal[0]
    routing = ta.Routing(*_route(ids, A))
    y, z = ta.adapter_forward(h, Wd, bd, Wu, bu, "silu", s_arg, True, routing=routing)
    dy = torch.randn(N, H, device=DEV).to(dtype)
    g = ta.adapter_backward(dy, h, Wd, bd, Wu, bu, z, "silu", s_arg, True, [True] * 5, routing=routing)
    y64 = torch.empty(N, H, dtype=torch.float64, device=DEV)
    g64 = [torch.zeros(t.shape, dtype=torch.float64, device=DEV) for t in (h, Wd, bd, Wu, bu)]
    for a in range(A):
        rows = (ids == a).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        ya, za = _reference_forward(h[rows].double(), Wd[a].double(), bd[a].double(), Wu[a].double(),
                                    bu[a].double(), "silu", scal[a], True)
        y64[rows] = ya
        ga = _reference_backward(dy[rows].double(), h[rows].double(), Wd[a].double(), bd[a].double(), Wu[a].double(),
                                 bu[a].double(), za, "silu", scal[a], True, [True] * 5)
        g64[0][rows] = ga[0]
        for k in range(1, 5):
            g64[k][a] = ga[k]
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert_close(y.double(), y64, dtype=torch.float32, name="y", **tol)
    for ours, o, name in zip(g, g64, NAMES):
        assert_close(ours.double(), o, dtype=torch.float32, name=name, **tol)
    assert (g[1][3] == 0).all() and (g[3][3] == 0).all(), "an unused adapter gets zero gradients"


def test_dispatch_runs_triton_through_autograd():
    h, Wd, bd, Wu, bu = (t.requires_grad_(True) for t in _inputs(33, 80, 8, torch.float32))
    inp = FAMILY.Inputs(h, Wd, bd, Wu, bu, "relu", 1.0, True)
    # CUDA prefers the fused kernels; on the CPU the reference is preferred (the interpreter is for tests).
    expected = "triton" if DEV == "cuda" else "reference"
    assert FAMILY.select(inp) == (expected, expected)
    with peft_kernels.use_backend("triton", strict=True):
        y = bottleneck_adapter(h, Wd, bd, Wu, bu, "relu")
        grads = torch.autograd.grad(y.square().sum(), [h, Wd, bd, Wu, bu])
    with peft_kernels.use_backend("reference"):
        y_r = bottleneck_adapter(h, Wd, bd, Wu, bu, "relu")
        grads_r = torch.autograd.grad(y_r.square().sum(), [h, Wd, bd, Wu, bu])
    assert_close(y, y_r, rtol=1e-4, atol=1e-5)
    for g, r, name in zip(grads, grads_r, NAMES):
        assert_close(g, r, rtol=1e-4, atol=1e-4, name=name)


def test_dispatch_mixed_and_wide_bottleneck_falls_back():
    h, Wd, bd, Wu, bu = _inputs(9, 300, 288, torch.float32)  # m = 288 > 256: not kept on chip
    inp = FAMILY.Inputs(h, Wd, bd, Wu, bu, "relu", 1.0, True)
    assert "exceeds 256" in FAMILY.why_not_reason("triton", inp)
    assert FAMILY.select(inp)[0] == "reference"
    A = 2
    h, Wd, bd, Wu, bu = (t.requires_grad_(True) for t in _inputs(10, 80, 8, torch.float32, A=A))
    ids = torch.tensor([0, 1] * 5, device=DEV)
    with peft_kernels.use_backend("triton", strict=True):
        y = bottleneck_adapter_mixed(h, Wd, bd, Wu, bu, ids, "gelu", (1.0, 0.5))
        gt = torch.autograd.grad(y.sum(), [h, Wd, Wu])
    with peft_kernels.use_backend("reference"):
        y_r = bottleneck_adapter_mixed(h, Wd, bd, Wu, bu, ids, "gelu", (1.0, 0.5))
        gr = torch.autograd.grad(y_r.sum(), [h, Wd, Wu])
    assert_close(y, y_r, rtol=1e-4, atol=1e-5)
    for a, b in zip(gt, gr):
        assert_close(a, b, rtol=1e-4, atol=1e-4)
