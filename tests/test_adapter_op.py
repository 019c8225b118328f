"""bottleneck_adapter: reference backend vs float64 math, vs nn.Linear + activation modules, autograd,
gradcheck, opcheck, torch.compile, input validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernels.ops import bottleneck_adapter, bottleneck_adapter_reference
from peft_kernels.ops.adapter import (
    ACTIVATIONS,
    FAMILY,
    MIXED_FAMILY,
    activation_derivative,
    bottleneck_adapter_mixed,
)
from tests.helpers import assert_close, assert_within_eager_error, rel_err

OP = "bottleneck_adapter"

ACT_MODULES = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_inputs(lead=(4, 9), H=24, m=8, dtype=torch.float32, wdtype=None, bias=(True, True),
                requires_grad=True):
    wdtype = wdtype or dtype
    h = torch.randn(*lead, H, dtype=dtype)
    W_down = torch.randn(m, H, dtype=wdtype) / H**0.5
    W_up = torch.randn(H, m, dtype=wdtype) / m**0.5
    b_down = torch.randn(m, dtype=wdtype) * 0.5 if bias[0] else None
    b_up = torch.randn(H, dtype=wdtype) * 0.5 if bias[1] else None
    ts = [h, W_down, b_down, W_up, b_up]
    if requires_grad:
        for t in ts:
            if t is not None:
                t.requires_grad_(True)
    return ts


def grads_of(out, inputs, dy):
    live = [t for t in inputs if t is not None and t.requires_grad]
    gs = iter(torch.autograd.grad(out, live, dy))
    return [next(gs) if (t is not None and t.requires_grad) else None for t in inputs]


NAMES = ["h", "W_down", "b_down", "W_up", "b_up"]


# --------------------------------------------------------------------------------------------------
# Forward and backward vs float64 math and autograd of the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [True, False])
def test_fp32_matches_float64_and_reference_autograd(activation, residual):
    inputs = make_inputs()
    kw = dict(activation=activation, scaling=0.7, residual=residual)
    y = bottleneck_adapter(*inputs, **kw)
    y64 = bottleneck_adapter_reference(*[t.double() if t is not None else None for t in inputs], **kw)
    assert y.dtype == torch.float32 and y.shape == inputs[0].shape
    assert_close(y, y64, name="y")
    y_ref = bottleneck_adapter_reference(*inputs, **kw)
    assert_close(y, y_ref, name="y vs fp32 reference")

    dy = torch.randn_like(y)
    ours = grads_of(y, inputs, dy)
    ref = grads_of(y_ref, inputs, dy)
    for g, r, name in zip(ours, ref, NAMES):
        assert g.dtype == r.dtype
        assert_close(g, r, name=f"d{name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [True, False])
def test_matches_nn_sequential(activation, residual):
    """The implementation users know: nn.Linear -> activation module -> nn.Linear, same weights."""
    H, m = 40, 6
    seq = nn.Sequential(nn.Linear(H, m), ACT_MODULES[activation](), nn.Linear(m, H))
    h = torch.randn(3, 41, H, requires_grad=True)
    scaling = 1.3
    y_torch = (h + scaling * seq(h)) if residual else scaling * seq(h)
    W_down, b_down, W_up, b_up = seq[0].weight, seq[0].bias, seq[2].weight, seq[2].bias
    y = bottleneck_adapter(h, W_down, b_down, W_up, b_up, activation, scaling, residual)
    assert_close(y, y_torch, name="y vs nn.Sequential")
    dy = torch.randn_like(y)
    params = [h, W_down, b_down, W_up, b_up]
    for g, r, name in zip(grads_of(y, params, dy), grads_of(y_torch, params, dy), NAMES):
        assert_close(g, r, name=f"d{name} vs nn.Sequential")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "tanh"])
def test_half_precision_within_eager_error(dtype, activation):
    """FlashAttention rule: error vs float64 at most ~2x eager PyTorch's (nn.Sequential) in the same dtype."""
    H, m = 40, 8
    seq = nn.Sequential(nn.Linear(H, m), ACT_MODULES[activation](), nn.Linear(m, H)).to(dtype)
    W_down, b_down, W_up, b_up = (p.detach().requires_grad_(True) for p in
                                  (seq[0].weight, seq[0].bias, seq[2].weight, seq[2].bias))
    h = torch.randn(123, H, dtype=dtype, requires_grad=True)
    params = [h, W_down, b_down, W_up, b_up]
    y = bottleneck_adapter(*params, activation=activation, scaling=0.5)
    y_eager = h + 0.5 * seq(h)
    y64 = bottleneck_adapter_reference(*params, activation=activation, scaling=0.5, upcast=True)
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    y64_full = bottleneck_adapter_reference(*p64, activation=activation, scaling=0.5)
    assert y.dtype == dtype
    assert_close(y, y64, name="y")
    assert_within_eager_error(y, y_eager, y64_full, name="y")

    dy = torch.randn_like(y)
    ours = grads_of(y, params, dy)
    eager = grads_of(y_eager, [h, *seq.parameters()], dy)
    oracle = grads_of(y64_full, p64, dy.double())
    for g, e, o, name in zip(ours, eager, oracle, NAMES):
        assert g.dtype == dtype
        assert_within_eager_error(g, e, o, name=f"d{name}")


def test_fp32_master_weights_with_half_activations():
    """bf16 h with fp32 adapter weights: output in h's dtype, each gradient in its parameter's dtype."""
    inputs = make_inputs(dtype=torch.bfloat16, wdtype=torch.float32)
    y = bottleneck_adapter(*inputs, activation="gelu")
    assert y.dtype == torch.bfloat16
    y64 = bottleneck_adapter_reference(*inputs, activation="gelu", upcast=True)
    assert_close(y, y64, name="y")
    dy = torch.randn_like(y)
    p64 = [t.detach().double().requires_grad_(True) for t in inputs]
    oracle = grads_of(bottleneck_adapter_reference(*p64, activation="gelu"), p64, dy.double())
    for g, t, o, name in zip(grads_of(y, inputs, dy), inputs, oracle, NAMES):
        assert g.dtype == t.dtype, name
        # Gradients are bf16 products (fp32 accumulation) cast to fp32: a bf16-sized relative error.
        assert rel_err(g, o) < 1e-2, name


@pytest.mark.parametrize("bias", [(False, False), (True, False), (False, True)])
def test_optional_biases(bias):
    inputs = make_inputs(bias=bias, dtype=torch.float64)
    y = bottleneck_adapter(*inputs, activation="silu", scaling=2.0)
    y_ref = bottleneck_adapter_reference(*inputs, activation="silu", scaling=2.0)
    assert_close(y, y_ref)
    dy = torch.randn_like(y)
    for g, r, name in zip(grads_of(y, inputs, dy), grads_of(y_ref, inputs, dy), NAMES):
        if r is None:
            assert g is None
        else:
            assert_close(g, r, name=f"d{name}")


@pytest.mark.parametrize("trainable", [(0,), (1, 3), (2, 4), (0, 4)])
def test_only_requested_gradients(trainable):
    """Frozen inputs get no gradient; the trainable ones still match autograd."""
    inputs = make_inputs(requires_grad=False)
    for i in trainable:
        inputs[i].requires_grad_(True)
    y = bottleneck_adapter(*inputs, activation="tanh")
    y_ref = bottleneck_adapter_reference(*inputs, activation="tanh")
    dy = torch.randn_like(y)
    y.backward(dy)
    ours = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    y_ref.backward(dy)
    for i, (g, t) in enumerate(zip(ours, inputs)):
        if i in trainable:
            assert_close(g, t.grad, name=f"d{NAMES[i]}")
        else:
            assert g is None


def test_no_grad_anywhere():
    inputs = make_inputs(requires_grad=False)
    y = bottleneck_adapter(*inputs)
    assert not y.requires_grad


def test_odd_shapes():
    inputs = make_inputs(lead=(123,), H=40, m=7, dtype=torch.float64)
    y = bottleneck_adapter(*inputs, activation="gelu_tanh", scaling=0.25)
    y_ref = bottleneck_adapter_reference(*inputs, activation="gelu_tanh", scaling=0.25)
    assert_close(y, y_ref)
    dy = torch.randn_like(y)
    for g, r, name in zip(grads_of(y, inputs, dy), grads_of(y_ref, inputs, dy), NAMES):
        assert_close(g, r, name=f"d{name}")


def test_non_contiguous_input():
    inputs = make_inputs(lead=(6,), H=16, m=4, dtype=torch.float64)
    h_big = torch.randn(16, 12, dtype=torch.float64)
    h = h_big.t()[::2]  # [6, 16], strided
    inputs[0] = h
    y = bottleneck_adapter(*inputs, activation="relu")
    assert_close(y, bottleneck_adapter_reference(*inputs, activation="relu"))


def test_single_row_and_empty_batch():
    inputs = make_inputs(lead=(1,), dtype=torch.float64)
    assert_close(bottleneck_adapter(*inputs), bottleneck_adapter_reference(*inputs))
    inputs = make_inputs(lead=(0, 5), dtype=torch.float64)
    y = bottleneck_adapter(*inputs)
    assert y.shape == (0, 5, 24)
    y.sum().backward()
    assert inputs[1].grad.abs().sum() == 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivative_matches_autograd(activation):
    z = torch.randn(257, dtype=torch.float64) * 3
    z.requires_grad_(True)
    from peft_kernels.ops.adapter import activation_reference

    (auto,) = torch.autograd.grad(activation_reference(z, activation).sum(), z)
    assert_close(activation_derivative(z.detach(), activation), auto)


# --------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [True, False])
def test_gradcheck(activation, residual):
    inputs = make_inputs(lead=(2, 3), H=5, m=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *a: bottleneck_adapter(*a, activation=activation, scaling=0.6, residual=residual), inputs
    )


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
@pytest.mark.parametrize("bias", [(True, True), (False, False)])
def test_opcheck_forward(activation, bias):
    h, W_down, b_down, W_up, b_up = make_inputs(lead=(7,), H=12, m=4, bias=bias)
    op, _ = FAMILY.custom_ops
    ref = ("reference", "reference")
    torch.library.opcheck(op, (h, W_down, b_down, W_up, b_up, activation, 0.5, True, *ref))
    torch.library.opcheck(op, (h.detach(), W_down, b_down, W_up, b_up, activation, 0.5, False, *ref))


@pytest.mark.parametrize("needs", [[True] * 5, [False, True, False, True, False],
                                   [True, False, True, False, True]])
def test_opcheck_backward(needs):
    h, W_down, b_down, W_up, b_up = make_inputs(lead=(7,), H=12, m=4, requires_grad=False)
    fwd, bwd = FAMILY.custom_ops
    _, z = fwd(h, W_down, b_down, W_up, b_up, "silu", 0.5, True, "reference", "reference")
    dy = torch.randn_like(h)
    torch.library.opcheck(bwd, (dy, h, W_down, b_down, W_up, b_up, z, "silu", 0.5, True, needs, "reference"))


def test_torch_compile_fullgraph():
    inputs = make_inputs(lead=(3, 5), H=16, m=4)

    def f(h, W_down, b_down, W_up, b_up):
        return bottleneck_adapter(h, W_down, b_down, W_up, b_up, activation="gelu", scaling=0.5) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, y_c = f(*inputs), compiled(*inputs)
    assert_close(y_c, y, rtol=0, atol=0, name="compiled y")
    dy = torch.randn_like(y)
    for g, gc, name in zip(grads_of(y, inputs, dy), grads_of(y_c, inputs, dy), NAMES):
        assert_close(gc, g, rtol=0, atol=0, name=f"compiled d{name}")


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def _good(**over):
    h, W_down, b_down, W_up, b_up = make_inputs(lead=(3,), H=8, m=4, requires_grad=False)
    args = dict(h=h, W_down=W_down, b_down=b_down, W_up=W_up, b_up=b_up)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(h=torch.randn(())), ValueError, "h must have at least 1 dims"),
    (dict(W_down=torch.randn(4, 8, 1)), ValueError, "W_down must be 2-D"),
    (dict(W_up=torch.randn(8)), ValueError, "W_up must be 2-D"),
    (dict(b_down=torch.randn(4, 1)), ValueError, "b_down must be 1-D"),
    (dict(b_up=torch.randn(1, 8)), ValueError, "b_up must be 1-D"),
    (dict(W_down=torch.randn(4, 9)), ValueError, "W_down .* expected 8"),
    (dict(W_up=torch.randn(9, 4)), ValueError, "W_up .* expected 8"),
    (dict(W_up=torch.randn(8, 5)), ValueError, "W_up .* expected 4"),
    (dict(b_down=torch.randn(5)), ValueError, "b_down .* expected 4"),
    (dict(b_up=torch.randn(7)), ValueError, "b_up .* expected 8"),
    (dict(W_down=torch.randn(0, 8), W_up=torch.randn(8, 0), b_down=None), ValueError, "W_down has 0 rows"),
    (dict(h=torch.randint(0, 3, (3, 8))), TypeError, "h must have dtype"),
    (dict(W_down=torch.randn(4, 8).to(torch.int32)), TypeError, "W_down must have dtype"),
    (dict(b_up=torch.ones(8, dtype=torch.bool)), TypeError, "b_up must have dtype"),
    (dict(h=[[1.0] * 8]), TypeError, "h must be a torch.Tensor"),
    (dict(W_up="W"), TypeError, "W_up must be a torch.Tensor"),
])
def test_validation_tensors(over, exc, match):
    with pytest.raises(exc, match=f"{OP}: {match}"):
        bottleneck_adapter(**_good(**over))


def test_validation_activation_name_lists_choices():
    with pytest.raises(ValueError, match=rf"{OP}: unknown activation 'swish'.*relu.*gelu.*identity"):
        bottleneck_adapter(**_good(), activation="swish")
    with pytest.raises(TypeError, match=f"{OP}: activation must be a str"):
        bottleneck_adapter(**_good(), activation=torch.relu)


@pytest.mark.parametrize("scaling, exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                          ("1.0", TypeError), (None, TypeError), (True, TypeError)])
def test_validation_scaling(scaling, exc):
    with pytest.raises(exc, match=f"{OP}: scaling"):
        bottleneck_adapter(**_good(), scaling=scaling)


def test_validation_residual():
    with pytest.raises(TypeError, match=f"{OP}: residual must be a bool"):
        bottleneck_adapter(**_good(), residual=1)


# --------------------------------------------------------------------------------------------------
# Mixed-adapter batch (reference backend here; the Triton kernel in tests/triton/test_adapter_triton.py)
# --------------------------------------------------------------------------------------------------
def make_stacked(A=3, H=24, m=8, dtype=torch.float64, bias=True):
    W_down = (torch.randn(A, m, H, dtype=dtype) / H**0.5).requires_grad_(True)
    W_up = (torch.randn(A, H, m, dtype=dtype) / m**0.5).requires_grad_(True)
    b_down = (torch.randn(A, m, dtype=dtype) * 0.5).requires_grad_(True) if bias else None
    b_up = (torch.randn(A, H, dtype=dtype) * 0.5).requires_grad_(True) if bias else None
    return W_down, b_down, W_up, b_up


def per_row(h, W_down, b_down, W_up, b_up, ids, activation, scalings, residual=True):
    """Each row with its own adapter through the single-adapter reference (the definition)."""
    rows = [bottleneck_adapter_reference(h[i: i + 1], W_down[a], None if b_down is None else b_down[a], W_up[a],
                                         None if b_up is None else b_up[a], activation, scalings[a], residual)
            for i, a in enumerate(ids.tolist())]
    return torch.cat(rows)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_mixed_batch_equals_per_row(activation, bias):
    A, H = 3, 24
    stacked = make_stacked(A, H, bias=bias)
    h = torch.randn(17, H, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, A, (17,))
    ids[:3] = torch.tensor([2, 0, 2])
    scalings = (1.0, 0.5, 2.0)
    y = bottleneck_adapter_mixed(h, *stacked, ids, activation, scalings)
    y_ref = per_row(h, *stacked, ids, activation, scalings)
    assert_close(y, y_ref, name="y")
    dy = torch.randn_like(y)
    params = [h, *stacked]
    for g, r, name in zip(grads_of(y, params, dy), grads_of(y_ref, params, dy), NAMES):
        if r is None:
            assert g is None
        else:
            assert_close(g, r, name=f"d{name}")


def test_mixed_batch_one_id_per_sequence_and_unused_adapter():
    stacked = make_stacked(A=4, H=16, m=4)
    h = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 3, 1])  # adapters 0 and 2 unused: zero gradients
    y = bottleneck_adapter_mixed(h, *stacked, ids, "tanh", 0.7, residual=False)
    ref = torch.stack([bottleneck_adapter_reference(h[b], stacked[0][a], stacked[1][a], stacked[2][a], stacked[3][a],
                                                    "tanh", 0.7, False) for b, a in enumerate(ids.tolist())])
    assert_close(y, ref)
    y.sum().backward()
    assert stacked[0].grad[0].abs().sum() == 0 and stacked[0].grad[2].abs().sum() == 0
    assert stacked[0].grad[1].abs().sum() > 0


def test_mixed_gradcheck():
    stacked = make_stacked(A=2, H=5, m=3)
    h = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda *a: bottleneck_adapter_mixed(*a, ids, "gelu_tanh", (0.5, 2.0)),
                                    (h, *stacked))


def test_mixed_opcheck_and_compile():
    W_down, b_down, W_up, b_up = (t.detach().float() for t in make_stacked(A=2, H=12, m=4))
    h = torch.randn(6, 12)
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    fwd, _ = MIXED_FAMILY.custom_ops
    torch.library.opcheck(fwd, (h, W_down, b_down, W_up, b_up, ids, "relu", [1.0, 0.5], True, "reference",
                                "reference"))
    params = [t.requires_grad_(True) for t in (h, W_down, b_down, W_up, b_up)]

    def f(h, W_down, b_down, W_up, b_up):
        return bottleneck_adapter_mixed(h, W_down, b_down, W_up, b_up, ids, "relu", (1.0, 0.5))

    y = f(*params)
    y_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*params)
    assert_close(y_c, y, rtol=0, atol=0)


@pytest.mark.parametrize("over, exc, match", [
    (dict(ids=torch.tensor([0, 3, 1])), ValueError, r"adapter_ids must lie in \[0, 3\)"),
    (dict(ids=torch.tensor([0.0, 1.0, 1.0])), TypeError, "adapter_ids must be an integer tensor"),
    (dict(ids=torch.tensor([0, 1])), ValueError, "adapter_ids has shape"),
    (dict(scalings=(1.0, 2.0)), ValueError, "scalings has 2 entries"),
    (dict(W_up=torch.randn(2, 16, 4, dtype=torch.float64)), ValueError, "W_up .* expected 3"),
    (dict(W_down=torch.randn(4, 16, dtype=torch.float64)), ValueError, "W_down must be 3-D"),
])
def test_mixed_validation(over, exc, match):
    W_down, b_down, W_up, b_up = make_stacked(A=3, H=16, m=4)
    args = dict(h=torch.randn(3, 16, dtype=torch.float64), W_down=W_down, b_down=b_down, W_up=W_up, b_up=b_up,
                ids=torch.tensor([0, 2, 1]), scalings=1.0)
    args.update(over)
    with pytest.raises(exc, match=f"bottleneck_adapter_mixed: {match}"):
        bottleneck_adapter_mixed(args["h"], args["W_down"], args["b_down"], args["W_up"], args["b_up"], args["ids"],
                                 "relu", args["scalings"])


# --------------------------------------------------------------------------------------------------
# GPU: the triton and cuda backends in bf16/fp16 at larger sizes (skipped without CUDA)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
def test_gpu_backends_within_eager_error(backend, dtype, activation):
    import peft_kernels

    torch.manual_seed(0)
    N, H, m = 4099, 1024, 64
    h = torch.randn(N, H, device="cuda", dtype=dtype, requires_grad=True)
    W_down = (torch.randn(m, H, device="cuda") / H**0.5).requires_grad_(True)  # fp32 masters
    W_up = (torch.randn(H, m, device="cuda") / m**0.5).requires_grad_(True)
    b_down = (torch.randn(m, device="cuda") * 0.1).requires_grad_(True)
    b_up = (torch.randn(H, device="cuda") * 0.1).requires_grad_(True)
    params = [h, W_down, b_down, W_up, b_up]
    inp = FAMILY.Inputs(h, W_down, b_down, W_up, b_up, activation, 0.5, True)
    reason = FAMILY.why_not_reason(backend, inp)
    if reason is not None:
        pytest.skip(reason)
    with peft_kernels.use_backend(backend, strict=True):
        y = bottleneck_adapter(*params, activation=activation, scaling=0.5)
    with peft_kernels.use_backend("reference"):
        y_eager = bottleneck_adapter(*params, activation=activation, scaling=0.5)
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    y64 = bottleneck_adapter_reference(*p64, activation=activation, scaling=0.5)
    assert_within_eager_error(y, y_eager, y64, name="y")
    dy = torch.randn_like(y)
    for g, e, o, name in zip(grads_of(y, params, dy), grads_of(y_eager, params, dy), grads_of(y64, p64, dy.double()),
                             NAMES):
        assert_within_eager_error(g, e, o, name=f"d{name}")


@pytest.mark.gpu
def test_gpu_mixed_batch_triton_matches_reference():
    import peft_kernels

    torch.manual_seed(0)
    A, N, H, m = 4, 2051, 512, 64
    stacked = [t.detach().cuda().float().requires_grad_(True) for t in make_stacked(A, H, m)]
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, A, (N,), device="cuda")
    with peft_kernels.use_backend("triton", strict=True):
        y = bottleneck_adapter_mixed(h, *stacked, ids, "relu", (1.0, 0.5, 2.0, 1.5))
    with peft_kernels.use_backend("reference"):
        y_r = bottleneck_adapter_mixed(h, *stacked, ids, "relu", (1.0, 0.5, 2.0, 1.5))
    assert rel_err(y, y_r) < 1e-2
    dy = torch.randn_like(y)
    for g, r, name in zip(grads_of(y, [h, *stacked], dy), grads_of(y_r, [h, *stacked], dy), NAMES):
        assert rel_err(g, r) < 2e-2, name


# --- the eager path of the reference backend: one C++ autograd node (csrc/adapter.cpp) -----------------------------
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"])
@pytest.mark.parametrize("residual, scaling", [(True, 1.0), (True, 0.5), (False, 1.0), (False, 2.0)])
@pytest.mark.parametrize("bias", [(True, True), (False, True), (True, False)])
def test_cpp_node_is_bit_identical_to_the_python_reference_backward(activation, residual, scaling, bias):
    """The C++ node runs the reference's ATen calls op for op: outputs and every gradient bit-identical to the
    Python forward + backward (what torch.compile runs), for every activation, bias layout and residual mode."""
    from peft_kernels.ops.adapter import FAMILY, AdapterInputs

    inputs = make_inputs(lead=(3, 7), H=16, m=5, bias=bias)
    y = bottleneck_adapter(*inputs, activation=activation, scaling=scaling, residual=residual)
    assert "AdapterFunction" in y.grad_fn.next_functions[0][0].name()
    dy = torch.randn_like(y)
    grads = grads_of(y, inputs, dy)
    h2d = inputs[0].detach().reshape(-1, 16)
    rec = AdapterInputs(h2d, *(t.detach() if t is not None else None for t in inputs[1:]), activation, scaling,
                        residual)
    y_py, z = FAMILY.forward_backends["reference"].run(*rec)
    py_grads = FAMILY.backward_backends["reference"].run(
        dy.reshape(-1, 16), *FAMILY._save_fn(rec, (y_py, z)), [t is not None for t in inputs])
    assert torch.equal(y.detach().reshape(-1, 16), y_py)
    for g, g_py, name in zip(grads, py_grads, NAMES):
        if g_py is None:
            assert g is None, name
        else:
            assert torch.equal(g.reshape(g_py.shape), g_py), name


def test_cpp_node_half_activations_and_master_weight_grads():
    inputs = make_inputs(lead=(9,), H=16, m=4, dtype=torch.bfloat16, wdtype=torch.float32)
    y = bottleneck_adapter(*inputs, activation="gelu", scaling=0.5)
    assert "AdapterFunction" in y.grad_fn.name() and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in inputs[1:])
    assert inputs[0].grad.dtype == torch.bfloat16
