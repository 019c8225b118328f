"""save_lora / load_lora in HF peft's adapter format, round trips both ways."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

from peft_kernels.nn import LoRALinear
from peft_kernels.patch import apply_lora, load_lora, save_lora
from tests.helpers import assert_close
from tests.patch.test_apply_lora import batch, build

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def ours_trained(arch, **kw):
    """A base model, and a copy with our LoRA whose B (and trainable biases) are non-zero."""
    torch.manual_seed(0)
    base = build(arch)
    model = apply_lora(copy.deepcopy(base), **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return base, model


def peft_lora_modules(pm):
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.layer.LoraLayer)}


def ours_lora_modules(model):
    return {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# --------------------------------------------------------------------------------------------------
# ours -> peft
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, kw",
    [
        ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16)),
        ("qwen2", dict(target_modules=r".*\.(q|k|v)_proj", r=4, bias="lora_only", use_rslora=True)),
        ("gpt2", dict(target_modules="all-linear", r=4, bias="all")),
        ("t5", dict(target_modules="all-linear", r=2, exclude_modules=None)),
    ],
)
def test_ours_to_peft_from_pretrained(tmp_path, arch, kw):
    base, model = ours_trained(arch, **kw)
    save_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == kw["r"] and cfg["base_model_name_or_path"] is None
    assert cfg["task_type"] == {"t5": "SEQ_2_SEQ_LM"}.get(arch, "CAUSAL_LM")
    assert cfg["bias"] == kw.get("bias", "none") and cfg["use_rslora"] == kw.get("use_rslora", False)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert f"base_model.model.{sorted(ours_lora_modules(model))[0]}.lora_A.weight" in keys

    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert peft_lora_modules(loaded) == ours_lora_modules(model)
    inputs = batch(arch)
    assert_close(logits(loaded, inputs), logits(model, inputs), rtol=1e-4, atol=1e-5)


def test_ours_to_ours(tmp_path):
    base, model = ours_trained("gpt2", target_modules=["c_attn", "mlp.c_proj"], r=4, bias="lora_only")
    save_lora(model, tmp_path)
    loaded = load_lora(copy.deepcopy(base), tmp_path)
    assert ours_lora_modules(loaded) == ours_lora_modules(model)
    inputs = batch("gpt2")
    assert_close(logits(loaded, inputs), logits(model, inputs))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    frozen = load_lora(copy.deepcopy(base), tmp_path, is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_save_lora_of_compiled_model(tmp_path):
    _, model = ours_trained("llama", target_modules=["q_proj"], r=2)
    save_lora(torch.compile(model, backend="aot_eager"), tmp_path)  # the wrapper is unwrapped, no compile runs
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}


def test_config_written_without_peft_installed_loads_in_peft(tmp_path, monkeypatch):
    base, model = ours_trained("llama", target_modules=["q_proj", "v_proj"], r=4)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError: the hand-written config
        save_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "peft_version" not in cfg and cfg["target_modules"] == ["q_proj", "v_proj"]
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    inputs = batch("llama")
    assert_close(logits(loaded, inputs), logits(model, inputs), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# peft -> ours
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, kw",
    [
        ("llama", dict(target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=0.1)),
        ("mistral", dict(target_modules=["q_proj", "o_proj", "gate_proj"], r=4, bias="all")),
        ("gpt2", dict(target_modules=["c_attn", "c_fc"], r=4, fan_in_fan_out=True)),
        ("bert", dict(target_modules=r".*attention.*(query|value)", r=2, use_rslora=True)),
    ],
)
def test_peft_save_pretrained_to_load_lora(tmp_path, arch, kw):
    torch.manual_seed(0)
    base = build(arch)
    fresh = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(init_lora_weights=False, **kw))
    if kw.get("bias", "none") != "none":
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n.endswith(".bias") and p.requires_grad:
                    p.add_(0.1)
    pm.save_pretrained(tmp_path)
    pm.eval()

    model = load_lora(fresh, tmp_path)
    assert ours_lora_modules(model) == peft_lora_modules(pm)
    assert model.peft_kernels_lora_config.lora_dropout == kw.get("lora_dropout", 0.0)
    inputs = batch(arch)
    assert_close(logits(model, inputs), logits(pm, inputs), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_load_lora_rejects_dora_and_leaves_model_alone(tmp_path):
    torch.manual_seed(0)
    base = build("llama")
    fresh = copy.deepcopy(base)
    get_peft_model(base, LoraConfig(target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DoRA"):
        load_lora(fresh, tmp_path)
    assert not ours_lora_modules(fresh) and not hasattr(fresh, "peft_kernels_lora_config")


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"peft_type": "IA3"}, "only LORA"),
        ({"modules_to_save": ["no_such_head"]}, "modules_to_save"),  # supported, but must match a module
        ({"rank_pattern": {"(a+)+": 8}}, "rank_pattern"),  # per-module ranks are served, hostile regexes not
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"some_future_variant": {"x": 1}}, "unknown key 'some_future_variant'"),
        ({"bias": "bogus"}, "bias"),
        # peft rewrites the base weights when it loads these: the saved A/B alone are not the model
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*base weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
        ({"init_lora_weights": "olora"}, "olora"),
        ({"init_lora_weights": "corda"}, "corda"),
        ({"init_lora_weights": "loftq"}, "loftq"),
    ],
)
def test_load_lora_rejects_unsupported_configs(tmp_path, edit, match):
    base, model = ours_trained("llama", target_modules=["q_proj"], r=2)
    save_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ValueError, match=match):
        load_lora(base, tmp_path)
    assert not ours_lora_modules(base)


def test_load_lora_of_a_real_pissa_checkpoint_is_refused_and_peft_then_patch_matches(tmp_path):
    """A PiSSA adapter as peft saves it: refused by name (loaded as-is it was 0.4 off in logits); loaded by peft and
    patched, peft's numbers."""
    from peft_kernels import patch_peft_model

    torch.manual_seed(0)
    base = build("llama")
    fresh = copy.deepcopy(base)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="pissa"):
        load_lora(fresh, tmp_path)
    assert not ours_lora_modules(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(3, 90, (2, 6))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        patch_peft_model(theirs)
        assert_close(theirs(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_load_lora_checkpoint_mismatch(tmp_path):
    base, model = ours_trained("llama", target_modules=["q_proj", "v_proj"], r=2)
    save_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "k_proj"]}))
    with pytest.raises(ValueError, match="missing .*k_proj.*unexpected .*v_proj"):
        load_lora(base, tmp_path)
    assert not ours_lora_modules(base)  # rolled back
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3}))
    with pytest.raises(ValueError, match="shape"):
        load_lora(base, tmp_path)
    assert all(type(m) is nn.Linear for m in base.modules() if isinstance(m, nn.Linear))


def test_missing_files_and_no_lora(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(build("llama"), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no LoRA applied"):
        save_lora(build("llama"), tmp_path)


def test_second_adapter_on_other_layers_is_refused_by_load_lora_with_the_layers_named(tmp_path):
    """The LoRA layers hold every adapter of a model: a second adapter must adapt the same layers. load_lora says
    so under its own name, with the layers it would add and leave out, and changes nothing."""
    base = build("llama")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    peft_model.save_pretrained(tmp_path / "qk")
    model = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], r=4)
    with pytest.raises(ValueError, match=r"load_lora: every adapter of one model adapts the same layers.*also selects "
                                         r"\['model.layers.0.self_attn.k_proj'.*leaves out \['model.layers.0.self_attn"
                                         r".v_proj'"):
        load_lora(model, tmp_path / "qk", adapter_name="other")
    assert all(m.adapter_names == ["default"] for m in model.modules() if isinstance(m, LoRALinear))
