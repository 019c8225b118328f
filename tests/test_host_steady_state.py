"""The eager host path of the public functions: the steady-state cache key (C++ and Python) and the eager nodes
that serve a signature once it is cached (prefix attention's concat node on CPU, F.linear for BitFit on CPU).
Each must give what the backend's own forward and backward give, and a signature it does not serve must not
reach it."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

import peft_kernels
from peft_kernels import _backends
from peft_kernels._op import _EagerFunction, python_signature, signature
from peft_kernels.ops.bias_only import bias_only_linear, bias_only_linear_reference
from tests.helpers import assert_close

pa = importlib.import_module("peft_kernels.ops.prefix_attention")
bo = importlib.import_module("peft_kernels.ops.bias_only")

native = pytest.mark.skipif(not _backends.native_status()[0], reason="the native extension is not built")


# --- the cache key ---------------------------------------------------------------------------------------------
def _variants(x):
    """Tensors that differ from x in exactly one field the key must see."""
    return {
        "shape": x.detach().reshape(x.shape[1], x.shape[0]),
        "strides": x.detach().t().contiguous().t(),
        "dtype": x.detach().double(),
        "requires_grad": x.detach().requires_grad_(not x.requires_grad),
        "dim": x.detach().reshape(-1),
    }


@pytest.mark.parametrize("key", [python_signature, signature], ids=["python", "active"])
def test_signature_sees_every_field_and_only_those(key):
    x = torch.randn(3, 4)
    assert key(x, None) == key(torch.randn(3, 4), None)  # values do not matter
    assert key(x, None) != key(None, x) and key(x) != key(x, None)
    assert key(torch.nn.Parameter(x.clone())) == key(x.clone().requires_grad_(True))
    for field, other in _variants(x).items():
        assert key(other) != key(x), field


@pytest.mark.parametrize("key", [python_signature, signature], ids=["python", "active"])
def test_signature_refuses_what_it_cannot_describe(key):
    class Sub(torch.Tensor):
        pass

    x = torch.randn(3, 4)
    assert key(x.as_subclass(Sub)) is None  # a subclass may report another shape or dtype than it stores
    assert key(x.to_sparse()) is None
    assert key(x, 1.0) is None and key("x") is None


@native
def test_the_native_signature_is_the_active_one():
    assert signature is _backends.native_function("tensor_signature")


# --- prefix attention: the concat backend's eager node (csrc/prefix.cpp) ----------------------------------------
def _prefix_inputs(dtype, shared, hf, pdtype, B=2, Hq=4, Hkv=2, Lq=7, Lk=9, D=16, P=3):
    def act(*shape):  # transformers passes [B, L, H, D] projections viewed as [B, H, L, D]
        t = torch.randn(shape[0], shape[2], shape[1], shape[3], dtype=dtype)
        return t.transpose(1, 2) if hf else t.transpose(1, 2).contiguous()

    pshape = (Hkv, P, D) if shared else (B, Hkv, P, D)
    return (act(B, Hq, Lq, D), act(B, Hkv, Lk, D), act(B, Hkv, Lk, D), torch.randn(pshape, dtype=pdtype or dtype),
            torch.randn(pshape, dtype=pdtype or dtype))


def _python_concat(inputs, scale, needs, dout, causal=False, padding=None):
    leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
    out = _EagerFunction.apply(pa.FAMILY, "concat", "concat", *leaves, causal, padding, scale)
    out.backward(dout)
    return out, [t.grad for t in leaves]


@native
@pytest.mark.parametrize("dtype, pdtype", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, None),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("hf", [True, False])
@pytest.mark.parametrize("causal, Lq", [(False, 7), (True, 7), (True, 9), (True, 12), (True, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_concat_node_is_bit_identical_to_the_python_backend(dtype, pdtype, shared, hf, causal, Lq, padded):
    """Outputs, every gradient, their strides and dtypes: what the Python forward + backward (the path
    torch.compile runs) give; causal with fewer, as many and more queries than real keys (9), and one query;
    with keys padded (left and right, one sequence with no real key: it still sees the prefix)."""
    torch.manual_seed(0)
    inputs = _prefix_inputs(dtype, shared, hf, pdtype, Lq=Lq)
    padding = None
    if padded:
        padding = torch.ones(2, 9, dtype=torch.bool)
        padding[0, :2] = padding[0, -3:] = False
        padding[1] = False
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = pa._CONCAT_NODE(*leaves, causal, padding, 0.3)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref, ref_grads = _python_concat(inputs, 0.3, [True] * 5, dout, causal, padding)
    assert torch.equal(out, ref) and out.stride() == ref.stride() == inputs[0].stride()
    for name, g, r, t in zip("q k v prefix_k prefix_v".split(), (t.grad for t in leaves), ref_grads, inputs):
        assert torch.equal(g, r), name
        assert g.dtype == r.dtype == t.dtype and g.stride() == r.stride(), name


@native
@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=5) if any(n)][::3])
def test_concat_node_computes_only_the_gradients_asked_for(needs):
    torch.manual_seed(1)
    inputs = _prefix_inputs(torch.float32, True, True, None)
    leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
    out = pa._CONCAT_NODE(*leaves, False, None, 0.25)
    dout = torch.randn_like(out)
    out.backward(dout)
    _, ref_grads = _python_concat(inputs, 0.25, needs, dout)
    for t, r, n in zip(leaves, ref_grads, needs):
        assert (t.grad is None) == (not n)
        if n:
            assert torch.equal(t.grad, r)


@native
def test_concat_node_serves_cpu_signatures():
    """Causal or not, padded or not; the result is the float64 reference's."""
    torch.manual_seed(2)
    q, k, v, pk_, pv = _prefix_inputs(torch.float64, True, True, None, Lq=9, Lk=9)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, -3:] = False
    cases = [(dict(), True), (dict(causal=True), True), (dict(key_padding_mask=pad), True),
             (dict(causal=True), True), (dict(causal=True, key_padding_mask=pad), True)]
    with peft_kernels.use_backend("concat", strict=True):
        for i, (kw, serves) in enumerate(cases):
            qq = q[:, :, :1] if i == 3 else q  # one query row sees every key: causal is no mask there
            leaves = [t.detach().requires_grad_(True) for t in (qq, k, v, pk_, pv)]
            out = peft_kernels.prefix_attention(*leaves, **kw)
            assert ("PrefixConcatFunction" in out.grad_fn.name()) == serves, kw
            out.sum().backward()
            ref_leaves = [t.detach().requires_grad_(True) for t in (qq, k, v, pk_, pv)]
            ref = pa.prefix_attention_reference(*ref_leaves, upcast=True, **kw)
            ref.sum().backward()
            assert_close(out, ref, name="out")
            for t, r in zip(leaves, ref_leaves):
                assert_close(t.grad, r.grad, name="grad")


@native
def test_concat_node_checks_its_padding_mask():
    q, k, v, pk_, pv = _prefix_inputs(torch.float32, True, True, None)
    for bad in (torch.ones(2, 9), torch.ones(2, 8, dtype=torch.bool), torch.ones(9, dtype=torch.bool)):
        with pytest.raises(RuntimeError, match="key_padding_mask must be a CPU bool"):
            pa._CONCAT_NODE(q, k, v, pk_, pv, False, bad, 0.25)


@native
def test_cpu_dispatch_runs_the_concat_node_in_the_steady_state():
    q, k, v, pk_, pv = (t.requires_grad_(True) for t in _prefix_inputs(torch.float32, True, True, None))
    for _ in range(2):  # the second call takes the cached path
        out = peft_kernels.prefix_attention(q, k, v, pk_, pv)
        assert "PrefixConcatFunction" in out.grad_fn.name()
    with torch.no_grad():
        assert torch.equal(peft_kernels.prefix_attention(q, k, v, pk_, pv), out)


# --- BitFit on CPU: F.linear itself in the steady state -----------------------------------------------------------
@pytest.mark.parametrize("lead", [(5,), (2, 3), (3, 1, 2)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_bias_only_steady_state_on_cpu(lead, contiguous):
    torch.manual_seed(3)
    W = torch.randn(6, 8, dtype=torch.float64)
    x = torch.randn(*lead, 8, dtype=torch.float64)
    if not contiguous:
        x = torch.randn(*lead, 16, dtype=torch.float64)[..., ::2]
    for _ in range(2):  # the first call validates and dispatches, the second is the cached path
        xg = x.detach().requires_grad_(True)
        b = torch.randn(6, dtype=torch.float64, requires_grad=True)
        _assert_matches_reference(lambda x, b: bias_only_linear(x, W, b),
                                  lambda x, b: bias_only_linear_reference(x, W, b), xg, b)
    assert bo.FAMILY.cached(bo._key(xg, W, b))[2] is torch.nn.functional.linear


def _assert_matches_reference(op, reference, x, b):
    """op(x, b) against reference(x, b) on detached copies: the output, dx and db for one random dy. Returns y."""
    y = op(x, b)
    xr, br = x.detach().requires_grad_(True), b.detach().requires_grad_(True)
    yr = reference(xr, br)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    assert_close(y, yr)
    assert_close(x.grad, xr.grad, name="dx")
    assert_close(b.grad, br.grad, name="db")
    return y


def test_bias_only_master_bias_is_not_served_by_f_linear():
    """An fp32 bias under bf16 activations: its gradient summed and returned in fp32 by the C++ backend, not
    autograd's bf16 sum through F.linear."""
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(6, 8, dtype=torch.bfloat16)
    b = torch.randn(6, requires_grad=True)
    for _ in range(2):
        y = bias_only_linear(x, W, b)
        y.float().sum().backward()
        assert b.grad.dtype == torch.float32
    hit = bo.FAMILY.cached(bo._key(x, W, b))
    assert hit[0] != "linear" and hit[2] is None
    with pytest.raises(ValueError, match="weight requires grad"):
        bias_only_linear(x, W.requires_grad_(True), b)


# --- the BitFit layer on CPU tensors: F.linear where that is what the op would run ------------------------------
def _bitfit_layer(dtype=torch.float32, bias_dtype=None):
    from peft_kernels.patch.bitfit import BitFitLinear

    base = torch.nn.Linear(8, 6, dtype=dtype)
    base.weight.requires_grad_(False)
    if bias_dtype is not None:
        base.bias = torch.nn.Parameter(base.bias.detach().to(bias_dtype))
    return BitFitLinear.wrap(base)


def test_bitfit_layer_on_cpu_runs_f_linear_unless_a_backend_is_forced():
    layer = _bitfit_layer()
    x = torch.randn(3, 8, requires_grad=True)
    y = layer(x)
    assert y.grad_fn.name() == "AddmmBackward0"  # what nn.Linear's F.linear gives
    with peft_kernels.use_backend("aten", strict=True):
        y_forced = layer(x)
    assert "AddmmBackward" not in y_forced.grad_fn.name()  # the op's own backend, as forced
    assert_close(y_forced, y)
    for out in (y, y_forced):
        out.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad.dtype == torch.float32


def test_bitfit_layer_master_bias_and_autocast_take_the_op():
    layer = _bitfit_layer(torch.bfloat16, torch.float32)
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()  # F.linear would refuse the dtype mix; the op sums db in fp32
    assert layer.bias.grad.dtype == torch.float32
    fp32 = _bitfit_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp32(torch.randn(3, 8))
    assert y.dtype == torch.bfloat16 and "AddmmBackward" not in y.grad_fn.name()


@pytest.mark.parametrize("key", [python_signature, signature], ids=["python", "active"])
def test_signature_of_a_nested_tensor_is_none(key):
    nested = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)])
    assert key(nested) is None


def test_bitfit_layer_without_a_bias_is_a_plain_linear():
    from peft_kernels.patch.bitfit import BitFitLinear

    base = torch.nn.Linear(8, 6, bias=False)
    base.weight.requires_grad_(False)
    layer = BitFitLinear.wrap(base)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_adapter_node_half_activations_bit_identical(dtype, activation):
    """Half activations with fp32 master weights: the C++ node's relu backward (threshold_backward on an fp32
    da and a half z) and the others give what the Python backward gives, bit for bit."""
    ad = importlib.import_module("peft_kernels.ops.adapter")
    torch.manual_seed(4)
    h = torch.randn(6, 16, dtype=dtype, requires_grad=True)
    params = [torch.randn(4, 16), torch.randn(4), torch.randn(16, 4), torch.randn(16)]
    params = [p.requires_grad_(True) for p in params]
    y = ad._AUTOGRAD_NODE(h, *params[:2], *params[2:], activation, 0.5, True)
    dy = torch.randn_like(y)
    y.backward(dy)
    rec = ad.AdapterInputs(h.detach(), *(p.detach() for p in params), activation, 0.5, True)
    y_py, z = ad.FAMILY.forward_backends["reference"].run(*rec)
    grads = ad.FAMILY.backward_backends["reference"].run(dy, *ad.FAMILY._save_fn(rec, (y_py, z)), [True] * 5)
    assert torch.equal(y, y_py)
    for t, g in zip((h, *params), grads):
        assert torch.equal(t.grad, g) and t.grad.dtype == t.dtype


# --- fused-linear distillation on CPU: the C++ row loop in the chunked algorithm ---------------------------------
@native
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("labelled, masked, alpha", [(True, False, 0.5), (True, True, 0.3), (False, False, 0.5),
                                                      (True, False, 1.0), (True, True, 0.0)])
def test_fused_linear_distillation_cpp_rows_match_the_reference(divergence, reduction, labelled, masked, alpha):
    """Several chunks, ignored rows, a KD mask, every divergence and reduction: loss and every gradient as the
    reference row math gives them (the C++ loop's per-term weights are rebuilt from the whole batch's counts)."""
    from peft_kernels.ops.distill_linear import fused_linear_distillation_loss

    torch.manual_seed(5)
    N, H, V = 23, 8, 37
    labels = torch.randint(0, V, (N,)) if labelled else None
    if labels is not None:
        labels[::4] = -100
    kd_mask = (torch.rand(N) > 0.3) if masked else None
    th, tW = torch.randn(N, 6), torch.randn(V, 6)
    results = []
    for backend in ("cpp", "reference"):
        h = torch.randn(N, H, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        W = torch.randn(V, H, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        with peft_kernels.use_backend(backend, strict=True):
            loss = fused_linear_distillation_loss(h, W, th, tW, labels, kd_mask=kd_mask, alpha=alpha,
                                                  reduction=reduction, divergence=divergence, chunk_size=5)
        loss.backward()
        results.append((loss.detach(), h.grad, W.grad))
    for got, want, name in zip(results[0], results[1], ("loss", "dh", "dW")):
        assert_close(got, want, rtol=1e-5, atol=1e-6, name=name)


@native
def test_fused_linear_distillation_dispatches_cpp_on_cpu():
    from peft_kernels.ops.distill_linear import FAMILY, LinearDistillInputs

    N, H, V = 6, 4, 9
    inputs = LinearDistillInputs(torch.randn(N, H), torch.randn(V, H), None, None, None, torch.randn(N, H),
                                 torch.randn(V, H), None, None, torch.randint(0, V, (N,)), None, 1.0, 2.0, 0.5,
                                 -100, "mean", "forward_kl", 0.5, 4, 1)
    assert FAMILY.select(inputs) == ("cpp", "reference")


# --- BitFit norms on CPU: F.layer_norm itself, and the RMSNorm reference as one C++ node --------------------------
bn = importlib.import_module("peft_kernels.ops.bias_norm")


def _norm_reference_backend(x, weight, bias, eps, dy, needs):
    """The `reference` backend's own forward and backward (what torch.compile and the custom op run)."""
    rec = bn.BiasNormInputs(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, eps, True)
    outs = bn.FAMILY.forward_backends["reference"].run(*rec)
    grads = bn.FAMILY.backward_backends["reference"].run(dy.reshape(-1, x.shape[-1]), *bn.FAMILY._save_fn(rec, outs),
                                                         needs)
    dx, db = grads
    return outs[0].reshape(x.shape), (None if dx is None else dx.reshape(x.shape), db)


@native
@pytest.mark.parametrize("dtype, pdtype", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, None),
                                           (torch.float16, None), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float32)])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_rms_norm_node_is_bit_identical_to_the_python_backend(dtype, pdtype, lead, needs):
    torch.manual_seed(5)
    pdtype = pdtype or dtype
    x = torch.randn(*lead, 24, dtype=dtype).requires_grad_(needs[0])
    weight = (torch.rand(24, dtype=pdtype) + 0.5)
    bias = torch.randn(24, dtype=pdtype).requires_grad_(needs[1])
    y = bn._RMS_NODE(x, weight, bias, 1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_py, (dx, db) = _norm_reference_backend(x.detach(), weight, bias.detach(), 1e-6, dy, list(needs))
    assert torch.equal(y, y_py) and y.dtype == dtype
    if needs[0]:
        assert torch.equal(x.grad, dx) and x.grad.dtype == dtype
    if needs[1]:
        assert torch.equal(bias.grad, db) and bias.grad.dtype == pdtype
    assert weight.grad is None


@native
@pytest.mark.parametrize("lead, contiguous", [((5,), True), ((2, 3), True), ((2, 3), False)])
def test_bias_only_norm_steady_state_on_cpu(lead, contiguous):
    """Both norms, twice (validate + dispatch, then the cached path), against the float64 reference; the cached
    callable is F.layer_norm for LayerNorm and the C++ node for RMSNorm."""
    torch.manual_seed(6)
    weight = torch.rand(12, dtype=torch.float64) + 0.5
    for rms in (False, True):
        for _ in range(2):
            x = torch.randn(*lead, 12 if contiguous else 24, dtype=torch.float64)
            x = (x if contiguous else x[..., ::2]).requires_grad_(True)
            b = torch.randn(12, dtype=torch.float64, requires_grad=True)
            y = _assert_matches_reference(lambda x, b, rms=rms: bn.bias_only_norm(x, weight, b, 1e-5, rms=rms),
                                          lambda x, b, rms=rms: bn.bias_only_norm_reference(x, weight, b, 1e-5,
                                                                                            rms=rms), x, b)
        node = bn.FAMILY.cached(bn._key(x, weight, b, rms))[2]
        assert node is (bn._reference_eager if rms else bn._layer_norm_eager)
        assert ("BiasRmsNormFunction" if rms else "NativeLayerNormBackward") in y.grad_fn.name()


def test_bias_only_norm_steady_state_still_validates_what_it_does_not_key():
    x, weight, b = torch.randn(3, 8), torch.ones(8), torch.zeros(8, requires_grad=True)
    bn.bias_only_norm(x, weight, b)  # cached
    with pytest.raises(ValueError, match="eps"):
        bn.bias_only_norm(x, weight, b, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        bn.bias_only_norm(x, weight, b, eps=float("nan"))
    with pytest.raises(TypeError, match="rms"):
        bn.bias_only_norm(x, weight, b, rms=1)
    with pytest.raises(ValueError, match="weight requires grad"):
        bn.bias_only_norm(x, weight.clone().requires_grad_(True), b)
    assert torch.equal(bn.bias_only_norm(x, weight, b, eps=1), bn.bias_only_norm(x, weight, b, eps=1.0))


def _bitfit_norms():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from peft_kernels.patch.bitfit import BitFitLayerNorm, BitFitRMSNorm

    ln = torch.nn.LayerNorm(8)
    ln.weight.requires_grad_(False)
    rms = LlamaRMSNorm(8, eps=1e-6)
    rms.weight.requires_grad_(False)
    return BitFitLayerNorm.wrap(ln), BitFitRMSNorm.wrap(rms, torch.nn.Parameter(torch.zeros(8))), ln, rms


def test_bitfit_layer_norm_on_cpu_runs_f_layer_norm_unless_a_backend_is_forced():
    layer, _, ln, _ = _bitfit_norms()
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = layer(x)
    assert y.grad_fn.name() == "NativeLayerNormBackward0"  # what nn.LayerNorm's F.layer_norm gives
    assert torch.equal(y, ln(x))
    with peft_kernels.use_backend("reference", strict=True):
        y_forced = layer(x)
    assert "NativeLayerNorm" not in y_forced.grad_fn.name()
    assert_close(y_forced, y)
    for out in (y, y_forced):
        out.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None


@native
def test_bitfit_rms_norm_runs_the_node_and_matches_the_hf_norm_plus_bias():
    _, layer, _, rms = _bitfit_norms()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, 8, requires_grad=True)
    assert_close(layer(x), rms(x) + layer.bias)  # validates and dispatches
    y = layer(x)  # the cached path: the node over x's leading dims
    assert "BiasRmsNormFunction" in y.grad_fn.name()
    assert_close(y, rms(x) + layer.bias)
    y.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None and x.grad is not None


def test_bitfit_conv1d_on_cpu_runs_f_linear():
    from transformers.pytorch_utils import Conv1D

    from peft_kernels.patch.bitfit import BitFitConv1D

    base = Conv1D(6, 8)
    base.weight.requires_grad_(False)
    layer = BitFitConv1D.wrap(base)
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, base(x))  # F.linear over W's transpose is the addmm HF's Conv1D runs
    assert layer(x[0]).grad_fn.name() == "AddmmBackward0"  # F.linear itself, not the op's autograd.Function
    with peft_kernels.use_backend("aten", strict=True):
        assert_close(layer(x), y)
    y.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None
