"""lora_linear: reference vs float64 math and HF peft; the cpu backend vs the reference; opcheck, gradcheck,
torch.compile; input validation. (The Triton kernels are tested under the interpreter in tests/triton.)"""

import pytest
import torch
import torch.nn.functional as F

import peft_kernels
from peft_kernels import _backends, _config
from peft_kernels.ops.dropout_mask import dropout_keep_mask
from peft_kernels.ops.lora import (
    FAMILY,
    lora_linear,
    lora_linear_reference,
)
from tests.helpers import assert_close, assert_within_eager_error

CPU_BACKENDS = ["reference", "aten"]


def make_inputs(M, K, N, r, dtype=torch.float32, bias=True, adapter_dtype=torch.float32, lead=None, device="cpu"):
    shape = (*lead, K) if lead else (M, K)
    x = torch.randn(shape, dtype=dtype, device=device)
    W = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    A = torch.randn(r, K, dtype=adapter_dtype, device=device) / K**0.5
    B = torch.randn(N, r, dtype=adapter_dtype, device=device) / r**0.5
    return x, W, b, A, B


def run_with_grads(fn, x, W, b, A, B, dy, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, W, b, A, B)]
    y = fn(*leaves, **kw)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def test_native_extension_loaded():
    ok, detail = _backends.native_status()
    assert ok, detail


@pytest.mark.parametrize("shape", [(1, 16, 8, 1), (17, 40, 72, 8), (123, 100, 48, 16), (64, 32, 32, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_float64(shape, bias):
    M, K, N, r = shape
    x, W, b, A, B = make_inputs(M, K, N, r, bias=bias)
    y = lora_linear_reference(x, W, b, A, B, scaling=0.5)
    x64 = x.double()
    y64 = x64 @ W.double().t() + (b.double() if bias else 0) + 0.5 * (x64 @ A.double().t()) @ B.double().t()
    assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)


def test_matches_hf_peft_layer_forward_and_grads():
    peft = pytest.importorskip("peft")

    model = torch.nn.Sequential(torch.nn.Linear(40, 24))
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["0"])
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 40, requires_grad=True)
    y_peft = layer(x)
    g = torch.randn_like(y_peft)
    grads_peft = torch.autograd.grad(y_peft, [x, A, B], g)
    ours = lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, A, B, scaling=16 / 8)
    grads = torch.autograd.grad(ours, [x, A, B], g)
    assert_close(ours.detach(), y_peft.detach())
    for name, a, b in zip(["dx", "dA", "dB"], grads, grads_peft):
        assert_close(a, b, rtol=1e-4, atol=1e-5, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 16, 8, 1), (17, 40, 72, 8), (123, 100, 48, 16), (31, 24, 56, 128)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_backend_fp32_matches_reference(backend, shape, bias, dropout_p):
    M, K, N, r = shape
    x, W, b, A, B = make_inputs(M, K, N, r, bias=bias)
    dy = torch.randn(M, N)
    ref_y, ref_g = run_with_grads(lora_linear_reference, x, W, b, A, B, dy, scaling=2.0, dropout_p=dropout_p, seed=7,
                                  upcast=True)
    with peft_kernels.use_backend(backend, strict=True):
        y, g = run_with_grads(lora_linear, x, W, b, A, B, dy, scaling=2.0, dropout_p=dropout_p, seed=7)
    assert_close(y, ref_y, name="y")
    for name, got, want in zip(["dx", "dW", "db", "dA", "dB"], g, ref_g):
        if want is None:
            assert got is None
        else:
            assert_close(got, want, rtol=1e-4, atol=1e-4, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_low_precision_within_eager_error(backend, dtype):
    M, K, N, r = 123, 96, 80, 16
    x, W, b, A, B = make_inputs(M, K, N, r, dtype=dtype)
    dy = torch.randn(M, N, dtype=dtype)
    oracle_y, oracle_g = run_with_grads(lora_linear_reference, x, W, b, A, B, dy, scaling=2.0, upcast=True)
    eager_y, eager_g = run_with_grads(lora_linear_reference, x, W, b, A, B, dy, scaling=2.0)
    with peft_kernels.use_backend(backend, strict=True):
        y, g = run_with_grads(lora_linear, x, W, b, A, B, dy, scaling=2.0)
    assert y.dtype == dtype
    assert g[3].dtype == torch.float32 and g[4].dtype == torch.float32  # fp32 master adapter grads
    assert_within_eager_error(y, eager_y, oracle_y, name="y")
    for name, got, eager, want in zip(["dx", "dW", "db", "dA", "dB"], g, eager_g, oracle_g):
        assert_within_eager_error(got, eager, want, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_3d_and_noncontiguous_inputs(backend):
    x, W, b, A, B = make_inputs(0, 48, 32, 8, lead=(2, 7))
    x_nc = torch.randn(48, 2, 7).permute(1, 2, 0)  # non-contiguous [2, 7, 48]
    with peft_kernels.use_backend(backend, strict=True):
        for inp in (x, x_nc):
            y = lora_linear(inp, W, b, A, B, scaling=1.5)
            assert y.shape == (2, 7, 32)
            assert_close(y, lora_linear_reference(inp, W, b, A, B, scaling=1.5, upcast=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_mask_is_the_library_mask(backend):
    """Forward with dropout equals the math with dropout_keep_mask(seed), and the same mask is used in backward."""
    M, K, N, r, p, seed = 33, 40, 24, 4, 0.3, 1234
    x, W, b, A, B = make_inputs(M, K, N, r)
    keep = dropout_keep_mask(seed, M, K, p, "cpu").double()
    xd = x.double() * keep / (1 - p)
    expected = x.double() @ W.double().t() + b.double() + 2.0 * (xd @ A.double().t()) @ B.double().t()
    with peft_kernels.use_backend(backend, strict=True):
        y1 = lora_linear(x, W, b, A, B, scaling=2.0, dropout_p=p, seed=seed)
        y2 = lora_linear(x, W, b, A, B, scaling=2.0, dropout_p=p, seed=seed)
        y3 = lora_linear(x, W, b, A, B, scaling=2.0, dropout_p=p, seed=seed + 1)
    assert_close(y1, expected.float())
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)


def test_fresh_seed_per_call():
    x, W, b, A, B = make_inputs(16, 32, 16, 4)
    y1 = lora_linear(x, W, b, A, B, dropout_p=0.5)
    y2 = lora_linear(x, W, b, A, B, dropout_p=0.5)
    assert not torch.allclose(y1, y2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_gradcheck_float64(backend, dropout_p):
    x, W, b, A, B = make_inputs(5, 7, 6, 3, dtype=torch.float64, adapter_dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, W, b, A, B)]
    with peft_kernels.use_backend(backend, strict=True):
        assert torch.autograd.gradcheck(
            lambda *t: lora_linear(*t, scaling=1.5, dropout_p=dropout_p, seed=3), inputs, eps=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x, W, b, A, B = make_inputs(9, 12, 10, 4)
    seed = torch.tensor(5, dtype=torch.int64)
    A.requires_grad_(True)
    B.requires_grad_(True)
    forward_op, backward_op = FAMILY.custom_ops
    torch.library.opcheck(forward_op, (x, W, b, A, B, 2.0, 0.1, seed, backend, backend))
    dy = torch.randn(9, 10)
    S = torch.randn(9, 4)
    torch.library.opcheck(
        backward_op,
        (dy, x, W, A.detach(), B.detach(), S, 2.0, 0.1, seed, torch.float32, [True, False, True, True, True], backend),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, W, b, A, B = make_inputs(12, 16, 8, 4)
    A.requires_grad_(True)

    def f(x, W, b, A, B):
        return lora_linear(x, W, b, A, B, scaling=2.0, dropout_p=0.1, seed=11).sum()

    with peft_kernels.use_backend(backend, strict=True):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(x, W, b, A, B)
        (gA,) = torch.autograd.grad(out, [A])
        out_ref = f(x, W, b, A, B)
        (gA_ref,) = torch.autograd.grad(out_ref, [A])
    assert_close(out.detach(), out_ref.detach())
    assert_close(gA, gA_ref)


def test_frozen_weight_gets_no_grad_and_base_matches_linear():
    x, W, b, A, B = make_inputs(10, 16, 12, 4)
    B = torch.zeros_like(B)
    y = lora_linear(x, W, b, A, B)
    assert_close(y, F.linear(x, W, b))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda t: t.update(W=torch.randn(12, 15)), ValueError, r"lora_linear: weight .* expected 16"),
        (lambda t: t.update(A=torch.randn(4, 15)), ValueError, r"lora_linear: lora_A .* expected 16"),
        (lambda t: t.update(B=torch.randn(11, 4)), ValueError, r"lora_linear: lora_B .* expected 12"),
        (lambda t: t.update(B=torch.randn(12, 5)), ValueError, r"lora_linear: lora_B .*rank r"),
        (lambda t: t.update(A=torch.randn(0, 16), B=torch.randn(12, 0)), ValueError, r"lora_linear: .*r must be >= 1"),
        (lambda t: t.update(b=torch.randn(11)), ValueError, r"lora_linear: bias"),
        (lambda t: t.update(W=torch.randn(12, 16, dtype=torch.float64)), TypeError, r"lora_linear: weight has dtype"),
        (lambda t: t.update(x=torch.randint(0, 3, (10, 16))), TypeError, r"lora_linear: x must have dtype"),
        (lambda t: t.update(W=torch.randn(12)), ValueError, r"lora_linear: weight must be 2-D"),
        (lambda t: t.update(p=-0.1), ValueError, r"lora_linear: dropout_p must be in \[0, 1\)"),
        (lambda t: t.update(p=1.0), ValueError, r"lora_linear: dropout_p"),
        (lambda t: t.update(s=float("nan")), ValueError, r"lora_linear: scaling must be finite"),
        (lambda t: t.update(x="not a tensor"), TypeError, r"lora_linear: x must be a torch.Tensor"),
    ],
)
def test_validation_errors(mutate, exc, match):
    x, W, b, A, B = make_inputs(10, 16, 12, 4)
    t = {"x": x, "W": W, "b": b, "A": A, "B": B, "s": 1.0, "p": 0.0}
    mutate(t)
    with pytest.raises(exc, match=match):
        lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], scaling=t["s"], dropout_p=t["p"])


def test_strict_backend_refuses_and_lenient_falls_back():
    x, W, b, A, B = make_inputs(4, 8, 8, 2)
    with peft_kernels.use_backend("triton", strict=True), pytest.raises(NotImplementedError, match="lora_linear"):
        lora_linear(x, W, b, A, B)
    with peft_kernels.use_backend("triton"), pytest.warns(UserWarning, match="falling back"):
        y = lora_linear(x, W, b, A, B)
    assert_close(y, lora_linear_reference(x, W, b, A, B, upcast=True))


def test_float64_bias_gradient_keeps_float64_precision():
    x, W, b, A, B = make_inputs(7, 6, 3, 2, dtype=torch.float64, adapter_dtype=torch.float64)
    dy = torch.randn(7, 3, dtype=torch.float64) + 1e-9
    for backend in CPU_BACKENDS:
        b_ = b.clone().requires_grad_(True)
        with peft_kernels.use_backend(backend, strict=True):
            lora_linear(x, W, b_, A, B).backward(dy)
        assert torch.allclose(b_.grad, dy.sum(0), rtol=1e-14, atol=1e-14), backend


def test_measured_dispatch_survives_a_failing_backend(monkeypatch):
    calls = []

    def failing(*args):
        calls.append("aten")
        raise RuntimeError("out of resources")

    x, W, b, A, B = make_inputs(4, 8, 8, 2)
    inputs = FAMILY.Inputs(x, W, b, A, B, 1.0, 0.0, torch.zeros((), dtype=torch.int64))
    monkeypatch.setattr(FAMILY.forward_backends["aten"], "run", failing)
    _config.clear_tuning_cache()
    with pytest.warns(UserWarning, match="failed while being timed"):
        chosen = FAMILY._fastest(["aten", "reference"], inputs)
    assert calls and chosen == "reference"
    _config.clear_tuning_cache()


def test_autocast_runs_in_the_autocast_dtype_with_fp32_adapter_grads():
    x, W, b, A, B = make_inputs(9, 16, 12, 4)
    A.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, b, A, B, scaling=2.0)
        ref = F.linear(x, W, b)
    assert y.dtype == torch.bfloat16 == ref.dtype
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32
    expected = lora_linear_reference(x.bfloat16(), W.bfloat16(), b.bfloat16(), A, B, 2.0, upcast=True)
    assert_within_eager_error(y, lora_linear_reference(x.bfloat16(), W.bfloat16(), b.bfloat16(), A, B, 2.0),
                              expected, factor=2.0, floor=1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_master_bias_gets_an_fp32_gradient_summed_in_fp32(backend):
    x, W, _, A, B = make_inputs(64, 16, 12, 4, dtype=torch.bfloat16)
    b = torch.randn(12, dtype=torch.float32, requires_grad=True)
    dy = torch.randn(64, 12, dtype=torch.bfloat16)
    with peft_kernels.use_backend(backend, strict=True):
        lora_linear(x, W, b, A, B).backward(dy)
    assert b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, dy.float().sum(0), rtol=1e-6, atol=1e-5)  # not rounded to bf16


# --- the eager path of the aten backend: one C++ autograd node (csrc/lora.cpp) --------------------------------------
NODE = "LoraLinearFunction"


def _node(y):
    """The op's autograd node (under the reshape view of a 3-D input)."""
    fn = y.grad_fn
    return fn.next_functions[0][0].name() if fn.name() == "ViewBackward0" else fn.name()


@pytest.mark.parametrize("needs", ["x", "A", "B", "x,b", "A,B", "x,W,b,A,B"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_cpu_eager_path_is_one_cpp_node_with_exact_gradients(needs, dropout_p):
    """On CPU tensors the default dispatch runs the C++ node; every needs combination gives the reference's
    gradients (dropout: the same mask), and nothing is computed for an input that needs none."""
    x, W, b, A, B = make_inputs(7, 24, 12, 4, dtype=torch.float64, adapter_dtype=torch.float64, lead=(2, 7))
    wanted = set(needs.split(","))
    leaves = {n: t.clone().requires_grad_(n in wanted) for n, t in zip("xWbAB", (x, W, b, A, B))}
    y = lora_linear(*leaves.values(), scaling=0.7, dropout_p=dropout_p, seed=11)
    assert NODE in _node(y)
    ref = {n: t.detach().clone().requires_grad_(n in wanted) for n, t in leaves.items()}
    y_ref = lora_linear_reference(*ref.values(), scaling=0.7, dropout_p=dropout_p, seed=11)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for n in "xWbAB":
        if n in wanted:
            assert_close(leaves[n].grad, ref[n].grad, atol=1e-11, rtol=1e-11)
        else:
            assert leaves[n].grad is None


def test_cpp_node_gradcheck_with_dropout_and_without_bias():
    x, W, _, A, B = make_inputs(5, 6, 4, 2, dtype=torch.float64, adapter_dtype=torch.float64, bias=False)
    fn = lambda x, A, B: lora_linear(x, W, None, A, B, scaling=1.5, dropout_p=0.3, seed=3)  # noqa: E731
    args = [t.requires_grad_() for t in (x, A, B)]
    assert NODE in _node(fn(*args))
    assert torch.autograd.gradcheck(fn, args)


def test_cpp_node_master_weights_get_their_own_dtype_gradients():
    """fp32 adapters and an fp32 master bias under bf16 activations: dA, dB, db come back fp32; db summed in fp32."""
    x, W, _, A, B = make_inputs(33, 16, 8, 4, dtype=torch.bfloat16)
    b = torch.randn(8, dtype=torch.float32, requires_grad=True)
    A.requires_grad_(), B.requires_grad_()
    y = lora_linear(x, W, b, A, B, scaling=2.0)
    assert NODE in _node(y) and y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    assert A.grad.dtype == B.grad.dtype == b.grad.dtype == torch.float32
    assert_close(b.grad, dy.float().sum(0), atol=1e-5, rtol=1e-5)


def test_cpp_node_sees_in_place_changes_of_saved_tensors():
    """Saved through save_for_backward: modifying x in place after the forward is an error, not a wrong dA."""
    x, W, b, A, B = make_inputs(4, 8, 8, 2)
    A.requires_grad_()
    y = lora_linear(x, W, b, A, B)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_steady_state_path_still_checks_scalars_and_new_signatures():
    x, W, b, A, B = make_inputs(4, 8, 8, 2)
    lora_linear(x, W, b, A, B, 1.0)  # cached
    with pytest.raises(ValueError, match="scaling"):
        lora_linear(x, W, b, A, B, float("nan"))
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, b, A, B, 1.0, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, W, b, A[:, :4], B, 1.0)
