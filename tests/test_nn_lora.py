"""peft_kernels.nn.LoRALinear as a drop-in nn.Linear."""

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
