"""peft_kernels.patch._methods: the record of applied methods, the compatibility guard, the parameter report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peft_kernels
from peft_kernels.patch import _methods


def _model():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_record_and_guard():
    m = _model()
    assert _methods.applied_methods(m) == {}
    _methods.check_compatible(m, "lora")
    _methods.register_method(m, "lora", {"r": 4})
    assert _methods.applied_methods(m) == {"lora": {"r": 4}}
    with pytest.raises(ValueError, match=r"apply_lora: Sequential already has LoRA .*remove_lora\(model\) first"):
        _methods.check_compatible(m, "lora")
    with pytest.raises(ValueError, match=r"apply_prefix_tuning: .*LoRA.*prefix tuning does not compose.*remove_lora"):
        _methods.check_compatible(m, "prefix")
    with pytest.raises(ValueError, match=r"apply_frob: .*remove_lora"):  # methods this file does not list
        _methods.check_compatible(m, "frob")
    assert _methods.unregister_method(m, "lora") == {"r": 4}
    assert "peft_kernels_methods" not in m.__dict__
    _methods.check_compatible(m, "prefix")


def test_composable_pairs(monkeypatch):
    m = _model()
    _methods.register_method(m, "bitfit")
    monkeypatch.setattr(_methods, "COMPOSES", {frozenset(("bitfit", "lora"))})
    _methods.check_compatible(m, "lora")
    with pytest.raises(ValueError, match="already has BitFit"):
        _methods.check_compatible(m, "bitfit")


def test_compiled_model_shares_the_record():
    m = _model()
    c = torch.compile(m)
    _methods.register_method(c, "lora")
    assert _methods.applied_methods(m) == {"lora": None}
    with pytest.raises(ValueError, match="already has LoRA"):
        _methods.check_compatible(c, "lora")


def test_peft_model_is_refused():
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["0", "2"]))
    with pytest.raises(ValueError, match=r"apply_lora: PeftModel is already an HF peft model.*patch_peft_model"):
        _methods.check_compatible(peft_model, "lora")
    with pytest.raises(ValueError, match=r"apply_prefix_tuning: .*HF peft model.*base transformers model"):
        _methods.check_compatible(peft_model, "prefix")
    injected = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"]), _model())
    with pytest.raises(ValueError, match=r"HF peft model \(peft\.tuners\.lora"):
        _methods.check_compatible(injected, "lora")


def test_trainable_parameters(capsys):
    m = _model()
    m[0].requires_grad_(False)
    got = peft_kernels.trainable_parameters(m)
    assert got == (6 * 3 + 3, 4 * 6 + 6 + 6 * 3 + 3)
    assert got.share == pytest.approx(21 / 51)
    peft_kernels.print_trainable_parameters(m)
    assert capsys.readouterr().out.strip() == "trainable params: 21 || all params: 51 || trainable%: 41.1765"
    tied = nn.Linear(3, 3, bias=False)
    pair = nn.Sequential(tied, nn.Sequential(tied))
    assert peft_kernels.trainable_parameters(pair) == (9, 9)
    with pytest.raises(TypeError, match="trainable_parameters: model must be an nn.Module"):
        peft_kernels.trainable_parameters("x")


def test_matches_peft_count():
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["0", "2"]))
    assert tuple(peft_kernels.trainable_parameters(peft_model)) == peft_model.get_nb_trainable_parameters()
