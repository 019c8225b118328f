"""peft_kernels.nn.LoRALinear as a drop-in nn.Linear."""

import warnings

import pytest
import torch
from torch import nn

from peft_kernels.nn import LoRALinear
from tests.helpers import assert_close


def test_constructor_mirrors_nn_linear():
    layer = LoRALinear(40, 24, bias=True, r=4, lora_alpha=8)
    ref = nn.Linear(40, 24)
    assert layer.weight.shape == ref.weight.shape and layer.bias.shape == ref.bias.shape
    assert (layer.in_features, layer.out_features) == (40, 24)
    assert layer.lora_A.shape == (4, 40) and layer.lora_B.shape == (24, 4)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert layer.scaling == 2.0
    assert LoRALinear(40, 24, r=4, lora_alpha=8, use_rslora=True).scaling == pytest.approx(4.0)
    assert repr(layer) == "LoRALinear(in_features=40, out_features=24, bias=True, r=4, lora_alpha=8, lora_dropout=0)"


def test_new_adapter_changes_nothing_and_any_leading_dims():
    linear = nn.Linear(32, 16)
    layer = LoRALinear.from_linear(linear, r=8, lora_alpha=16)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    for shape in [(32,), (5, 32), (2, 3, 32), (2, 3, 4, 32)]:
        x = torch.randn(shape)
        assert_close(layer(x), linear(x).detach())


def test_forward_and_grads_match_manual_math():
    layer = LoRALinear(20, 12, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 7, 20, requires_grad=True)
    y = layer(x)
    expected = x @ layer.weight.t() + layer.bias + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert_close(y, expected.detach())
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], g)
    grads_ref = torch.autograd.grad(expected, [x, layer.lora_A, layer.lora_B], g)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_merge_unmerge_round_trip_exact():
    layer = LoRALinear(24, 16, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 24)
    y = layer(x).detach()
    layer.merge()
    assert layer.merged
    assert_close(layer(x).detach(), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    layer.merge(keep_original=False)
    layer.unmerge()
    assert_close(layer.weight.detach(), w0, rtol=1e-6, atol=1e-6)


def test_dropout_only_in_training():
    layer = LoRALinear(64, 32, r=8, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 64)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_state_dict_keys_and_dtypes():
    layer = LoRALinear(16, 8, r=2, dtype=torch.bfloat16)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "lora_A", "lora_B"}
    assert sd["weight"].dtype == torch.bfloat16 and sd["lora_A"].dtype == torch.float32
    other = LoRALinear(16, 8, r=2, dtype=torch.bfloat16)
    other.load_state_dict(sd)
    assert torch.equal(other.lora_A, layer.lora_A)


def test_bf16_activations_with_fp32_adapters_and_autocast():
    layer = LoRALinear(32, 16, r=4, dtype=torch.bfloat16)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    layer32 = LoRALinear(32, 16, r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer32(torch.randn(6, 32))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-1), dict(lora_dropout=-0.1), dict(lora_dropout=1.0)])
def test_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match="LoRALinear"):
        LoRALinear(8, 8, **bad)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="from_linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_compiles_fullgraph():
    layer = LoRALinear(16, 8, r=4, lora_dropout=0.1)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(4, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), layer(x))


def test_disabling_a_merged_adapter_gives_the_base_output():
    layer = LoRALinear(16, 8, r=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias).detach()
    layer.merge()
    layer.adapter_enabled = False
    assert_close(layer(x).detach(), base)
    assert not layer.merged


# --------------------------------------------------------------------------------------------------
# Validation at the public boundary: the function and the argument are named
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lora_dropout="0.1"), TypeError, "LoRALinear: lora_dropout must be a real number"),
    (dict(lora_dropout=float("nan")), ValueError, "LoRALinear: lora_dropout must be in"),
    (dict(lora_alpha=None), TypeError, "LoRALinear: lora_alpha must be a real number"),
    (dict(lora_alpha=float("nan")), ValueError, "LoRALinear: lora_alpha must be finite"),
    (dict(lora_alpha=float("inf")), ValueError, "LoRALinear: lora_alpha must be finite"),
    (dict(lora_alpha=True), TypeError, "LoRALinear: lora_alpha"),
    (dict(adapter_dtype=torch.int32), TypeError, "LoRALinear: adapter_dtype must be a floating torch.dtype"),
    (dict(adapter_dtype="float32"), TypeError, "LoRALinear: adapter_dtype"),
    (dict(dtype=torch.int64), TypeError, "LoRALinear: dtype must be a floating"),
    (dict(r=0), ValueError, "LoRALinear: r must be a positive int"),
    (dict(r="8"), TypeError, "LoRALinear: r must be a positive int"),
    (dict(r=True), TypeError, "LoRALinear: r"),
    (dict(use_rslora=1), TypeError, "LoRALinear: use_rslora must be a bool"),
    (dict(bias="yes"), TypeError, "LoRALinear: bias must be a bool"),
    (dict(freeze_base=None), TypeError, "LoRALinear: freeze_base must be a bool"),
])
def test_constructor_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LoRALinear(8, 8, **kwargs)


@pytest.mark.parametrize("sizes, exc, match", [
    ((0, 8), ValueError, "LoRALinear: in_features must be a positive int, got 0"),
    ((8, 0), ValueError, "LoRALinear: out_features must be a positive int"),
    ((8.0, 8), ValueError, "in_features"),
    (("8", 8), TypeError, "in_features"),
])
def test_degenerate_sizes(sizes, exc, match):
    with pytest.raises(exc, match=match):
        LoRALinear(*sizes)


def test_forward_argument_errors():
    layer = LoRALinear(8, 4, r=2)
    with pytest.raises(ValueError, match=r"LoRALinear.forward: x must be a tensor \[..., in_features=8\], got shape"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="LoRALinear.forward: x must be a tensor"):
        layer([1.0] * 8)
    with pytest.raises(ValueError, match="LoRALinear.forward"):
        layer(torch.tensor(1.0))


def test_from_linear_validates_once_with_its_name():
    with pytest.raises(TypeError, match="LoRALinear.from_linear: lora_dropout"):
        LoRALinear.from_linear(nn.Linear(4, 4), lora_dropout="0.1")
    with pytest.raises(ValueError, match="LoRALinear.from_linear: r must be a positive int"):
        LoRALinear.from_linear(nn.Linear(4, 4), r=0)
    empty = nn.Linear(4, 4)
    empty.weight = nn.Parameter(torch.empty(0, 4))
    with pytest.raises(ValueError, match="LoRALinear.from_linear: Linear has a weight .*non-empty floating"):
        LoRALinear.from_linear(empty)


def test_merge_in_fp64_keeps_fp64_precision():
    layer = LoRALinear(16, 8, r=4, dtype=torch.float64, adapter_dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    layer.merge(keep_original=False)  # B = 0: the merged weight must be the very same fp64 weight
    assert torch.equal(layer.weight, w0)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16, dtype=torch.float64)
    y = layer(x).detach()
    layer.merge(keep_original=False)
    expected = x @ (w0 + layer.scaling * layer.lora_B @ layer.lora_A).t() + layer.bias
    assert_close(layer(x).detach(), expected.detach(), name="merged fp64")
    assert_close(y, expected.detach(), name="unmerged fp64")
    layer.unmerge()
    assert (layer.weight - w0).abs().max() < 1e-12


def test_named_adapters_on_a_layer():
    layer = LoRALinear(12, 6, r=2, lora_alpha=4)
    nn.init.normal_(layer.lora_B)
    other = layer.add_adapter("other", r=3, lora_alpha=6)
    nn.init.normal_(other.lora_B)
    x = torch.randn(4, 12)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    y0 = base + 2.0 * x @ layer.lora_A.t() @ layer.lora_B.t()
    y1 = base + 2.0 * x @ other.lora_A.t() @ other.lora_B.t()
    assert_close(layer(x).detach(), y0.detach(), rtol=1e-4, atol=1e-5)
    layer.set_adapter("other")
    assert_close(layer(x).detach(), y1.detach(), rtol=1e-4, atol=1e-5)
    layer.merge()
    assert_close(layer(x).detach(), y1.detach(), rtol=1e-4, atol=1e-5)
    layer.set_adapter("default")  # unmerges "other" first
    assert not layer.merged
    assert_close(layer(x).detach(), y0.detach(), rtol=1e-4, atol=1e-5)
    assert layer.adapter_names == ["default", "other"]
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_adapters.other.lora_A",
                                       "lora_adapters.other.lora_B"}
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("other")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        layer.set_adapter("nope")
    with pytest.raises(ValueError, match="first adapter"):
        layer.delete_adapter("default")
    layer.delete_adapter("other")
    assert layer.adapter_names == ["default"]


def test_lora_conv1d_lives_in_nn():
    from peft_kernels.nn import LoRAConv1D

    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    conv = Conv1D(6, 4)
    layer = LoRAConv1D.from_conv1d(conv, r=2)
    assert layer.weight is conv.weight and (layer.nx, layer.nf) == (4, 6)
    with pytest.raises(TypeError, match="LoRAConv1D.from_conv1d: lora_alpha"):
        LoRAConv1D.from_conv1d(conv, lora_alpha=None)


def test_a_merged_layer_in_training_says_its_adapters_get_no_gradient():
    layer = LoRALinear(16, 8, r=4)
    layer.merge()
    with pytest.warns(UserWarning, match="merged.*no gradient.*unmerge"):
        layer.train()(torch.randn(3, 16))
    with warnings.catch_warnings():  # inference with a merged layer: nothing to say
        warnings.simplefilter("error")
        layer.eval()(torch.randn(3, 16))
        with torch.no_grad():
            layer.train()(torch.randn(3, 16))
