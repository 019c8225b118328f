"""patch_peft_model: an existing HF peft model, patched in place, behaves exactly as before (but fused)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

import peft_kernels.patch.peft_model as lora_patch
from peft_kernels.patch import patch_peft_model, unpatch_peft_model
from tests.helpers import assert_close
from tests.patch.test_apply_lora import ARCHS, CASES, aot_eager_recording, batch, build, loss_and_grads

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


@pytest.fixture
def op_calls(monkeypatch):
    """The dropout p of every call the patched layers make to the fused op."""
    calls = []
    real = lora_patch.lora_linear

    def spy(*args):
        calls.append(args[6])
        return real(*args)

    monkeypatch.setattr(lora_patch, "lora_linear", spy)
    return calls


def make_peft(arch="llama", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8, **kw}
    # init_lora_weights=False: B random too, so the adapters change the output. peft's new dropout modules
    # start in train mode: eval() again.
    return get_peft_model(build(arch), LoraConfig(init_lora_weights=False, **kw)).eval()


def lora_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, PeftLoraLinear)]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# --------------------------------------------------------------------------------------------------
# Same numbers, same objects
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_matches_unpatched(arch, op_calls):
    pm = make_peft(arch, **CASES[arch])
    inputs = batch(arch)
    params = dict(pm.named_parameters())
    keys = list(pm.state_dict())
    loss_ref, grads_ref = loss_and_grads(pm, inputs)

    report = patch_peft_model(pm)
    layers = lora_layers(pm)
    assert sorted(report.patched) == sorted(layers) and layers and not report.skipped
    assert all(type(pm.get_submodule(n)).__name__ == "FusedPeftLoraLinear" for n in layers)
    loss, grads = loss_and_grads(pm, inputs)
    assert len(op_calls) == len(layers)  # every layer took the fused path
    assert_close(loss, loss_ref, name="loss")
    assert grads.keys() == grads_ref.keys()
    for n, g in grads.items():
        assert_close(g, grads_ref[n], rtol=1e-4, atol=1e-5, name=n)
    assert all(p is params[n] for n, p in pm.named_parameters()) and len(params) == len(dict(pm.named_parameters()))
    assert list(pm.state_dict()) == keys


def test_save_pretrained_identical(tmp_path):
    pm = make_peft()
    pm.save_pretrained(tmp_path / "before")
    patch_peft_model(pm)
    pm.save_pretrained(tmp_path / "after")
    for f in ("adapter_config.json",):
        assert json.loads((tmp_path / "before" / f).read_text()) == json.loads((tmp_path / "after" / f).read_text())
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("before", "after"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "before" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "after" / "adapter_model.safetensors"
    ).read_bytes()


def test_optimizer_built_before_patching_still_updates():
    pm = make_peft()
    twin = copy.deepcopy(pm)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, twin)]
    patch_peft_model(pm)
    inputs = batch("llama")
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    for _ in range(2):
        for m, opt in zip((pm, twin), opts):
            opt.zero_grad()
            m(**inputs).loss.backward()
            opt.step()
    for (n, p), (_, q) in zip(pm.named_parameters(), twin.named_parameters()):
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} was not updated"
            assert_close(p, q, rtol=1e-4, atol=1e-5, name=n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_after_patching(arch):
    pm = make_peft(arch, target_modules="all-linear")
    patch_peft_model(pm)
    inputs = batch(arch)
    out = logits(pm, inputs)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    assert_close(logits(merged, inputs), out, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# States the fused path does not serve fall back to peft
# --------------------------------------------------------------------------------------------------
def test_disable_adapter_falls_back(op_calls):
    pm = make_peft()
    inputs = batch("llama")
    with pm.disable_adapter():
        base_out = logits(pm, inputs)  # peft's own forward, unpatched
    with_lora = logits(pm, inputs)
    patch_peft_model(pm)
    with pm.disable_adapter():
        assert_close(logits(pm, inputs), base_out)
    assert op_calls == []
    assert_close(logits(pm, inputs), with_lora, rtol=1e-4, atol=1e-5)
    assert len(op_calls) == len(lora_layers(pm))


def test_merged_adapter_falls_back(op_calls):
    pm = make_peft()
    inputs = batch("llama")
    ref = logits(pm, inputs)
    patch_peft_model(pm)
    pm.merge_adapter()
    assert_close(logits(pm, inputs), ref, rtol=1e-4, atol=1e-5)
    assert op_calls == []
    pm.unmerge_adapter()
    assert_close(logits(pm, inputs), ref, rtol=1e-4, atol=1e-5)
    assert len(op_calls) == len(lora_layers(pm))


def test_mixed_batch_adapter_names_falls_back(op_calls):
    pm = make_peft()
    pm.add_adapter("other", LoraConfig(init_lora_weights=False, target_modules=["q_proj", "v_proj"], r=2))
    pm.eval()
    inputs = {"input_ids": batch("llama")["input_ids"]}
    names = ["default", "other"]
    ref = logits(pm, dict(inputs, adapter_names=names))
    report = patch_peft_model(pm)
    assert report.patched and not report.skipped
    assert_close(logits(pm, dict(inputs, adapter_names=names)), ref, rtol=1e-4, atol=1e-5)
    assert op_calls == []


def test_dora_layers_left_alone_and_reported(op_calls):
    pm = make_peft(target_modules=["q_proj", "v_proj"], use_dora=True)
    inputs = batch("llama")
    ref = logits(pm, inputs)
    report = patch_peft_model(pm)
    assert report.patched == [] and sorted(report.skipped) == sorted(lora_layers(pm))
    assert all("DoRA" in why for why in report.skipped.values()), report.skipped
    assert all(type(pm.get_submodule(n)) is PeftLoraLinear for n in lora_layers(pm))
    assert "DoRA" in str(report)
    assert_close(logits(pm, inputs), ref)
    assert op_calls == []


def test_unservable_layers_reported_rest_patched(op_calls):
    pm = make_peft(target_modules=["q_proj", "v_proj", "embed_tokens"])
    hooked = "base_model.model.model.layers.1.self_attn.v_proj"
    pm.get_submodule(hooked).base_layer.register_forward_hook(lambda mod, inp, out: out * 1.5)
    inputs = batch("llama")
    ref = logits(pm, inputs)
    report = patch_peft_model(pm)
    assert "hooks" in report.skipped[hooked]
    assert "lora.layer.Embedding is not served" in report.skipped["base_model.model.model.embed_tokens"]
    assert len(report.patched) == 3 and len(report.skipped) == 2
    assert_close(logits(pm, inputs), ref, rtol=1e-4, atol=1e-5)  # the hook still runs on the skipped layer
    assert len(op_calls) == 3


def test_dora_adapter_added_after_patching(op_calls):
    pm = make_peft(target_modules=["q_proj", "v_proj"])
    twin = copy.deepcopy(pm)
    patch_peft_model(pm)
    for m in (pm, twin):
        torch.manual_seed(7)
        m.add_adapter("dora", LoraConfig(init_lora_weights=False, target_modules=["q_proj"], r=2, use_dora=True))
        m.set_adapter("dora")
        m.eval()
    inputs = batch("llama")
    assert_close(logits(pm, inputs), logits(twin, inputs))  # the runtime guard falls back on every layer
    assert op_calls == []
    report = patch_peft_model(pm)  # re-patching re-evaluates: nothing is servable now
    assert report.patched == []
    assert any("DoRA" in why for why in report.skipped.values())
    assert any("no LoRA weights" in why for why in report.skipped.values())


def test_lora_dropout_p_follows_train_and_eval(op_calls):
    pm = make_peft(lora_dropout=0.25)
    inputs = batch("llama")
    ref = logits(pm, inputs)
    patch_peft_model(pm)
    assert_close(logits(pm, inputs), ref, rtol=1e-4, atol=1e-5)
    assert set(op_calls) == {0.0}
    op_calls.clear()
    pm.train()
    logits(pm, inputs)
    assert set(op_calls) == {0.25}


# --------------------------------------------------------------------------------------------------
# Training features on a patched peft model
# --------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_patched():
    pm = make_peft(lora_dropout=0.2).train()
    patch_peft_model(pm)
    inputs = batch("llama")
    calls = []
    pm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").register_forward_pre_hook(
        lambda *_: calls.append(1))
    torch.manual_seed(3)
    loss, grads = loss_and_grads(pm, inputs)
    pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3)  # the recomputed forward must regenerate the same dropout masks
    loss_ckpt, grads_ckpt = loss_and_grads(pm, inputs)
    assert len(calls) == 3  # once without checkpointing, twice (forward + recompute) with it
    assert_close(loss_ckpt, loss)
    for n, g in grads.items():
        assert_close(grads_ckpt[n], g, rtol=1e-5, atol=1e-6, name=n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_autocast_bf16_patched(arch, op_calls):
    pm = make_peft(arch, target_modules="all-linear")
    inputs = batch(arch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = loss_and_grads(pm, inputs)
        patch_peft_model(pm)
        loss, grads = loss_and_grads(pm, inputs)
    assert op_calls  # autocast is served, not a fallback
    assert torch.isfinite(loss) and abs(loss - loss_ref) < 0.05
    for n, g in grads.items():
        assert g.dtype == torch.float32 and (g - grads_ref[n]).norm() <= 0.1 * grads_ref[n].norm() + 1e-6, n


def test_torch_compile_patched_peft():
    torch._dynamo.reset()
    pm = make_peft()
    inputs = batch("llama")
    loss_ref, _ = loss_and_grads(pm, inputs)
    patch_peft_model(pm)
    ops = []
    compiled = torch.compile(pm, backend=aot_eager_recording(ops))
    loss, _ = loss_and_grads(compiled, inputs)
    assert_close(loss, loss_ref)
    assert sum("peft_kernels.lora_linear" in op for op in ops) == len(lora_layers(pm))


# --------------------------------------------------------------------------------------------------
# unpatch, idempotence, copies, errors
# --------------------------------------------------------------------------------------------------
def test_unpatch_restores_peft_forward(op_calls):
    pm = make_peft()
    inputs = batch("llama")
    ref = logits(pm, inputs)
    first = patch_peft_model(pm)
    again = patch_peft_model(pm)  # idempotent
    assert again.patched == first.patched
    names = unpatch_peft_model(pm)
    assert sorted(names) == sorted(first.patched)
    assert all(type(pm.get_submodule(n)) is PeftLoraLinear for n in names)
    op_calls.clear()
    assert_close(logits(pm, inputs), ref)
    assert op_calls == []


def test_patched_model_deepcopies_and_pickles(op_calls):
    pm = make_peft()
    inputs = batch("llama")
    patch_peft_model(pm)
    ref = logits(pm, inputs)
    for clone in (copy.deepcopy(pm), pickle.loads(pickle.dumps(pm))):
        op_calls.clear()
        assert_close(logits(clone, inputs), ref)
        assert len(op_calls) == len(lora_layers(pm))


def test_not_a_peft_model_raises():
    with pytest.raises(ValueError, match="no HF peft LoRA layers"):
        patch_peft_model(build("llama"))
