"""The edges a peft / transformers user hits first with apply_lora: guards, the transformers save
paths, task heads, Falcon, named adapters, damaged files, and all-or-nothing under injected faults."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import peft_kernels
from peft_kernels.nn import LoRALinear
from peft_kernels.patch import (
    _methods,
    add_lora_adapter,
    apply_lora,
    delete_lora_adapter,
    disable_adapter,
    load_lora,
    merge_and_unload,
    patch_peft_model,
    remove_lora,
    save_lora,
    set_adapter,
    unload,
)
from tests.helpers import assert_close
from tests.patch.test_apply_lora import VOCAB, batch, build, loss_and_grads

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def perturb_trainable(model, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def lora_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_same_state(model, snap):
    now = model.state_dict()
    assert set(now) == set(snap)
    for n, t in snap.items():
        assert torch.equal(now[n], t), n


# --------------------------------------------------------------------------------------------------
# 1. Guards
# --------------------------------------------------------------------------------------------------
def test_apply_lora_on_peft_model_points_to_patch_peft_model():
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    before = {n for n, p in pm.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"apply_lora: PeftModel is already an HF peft model.*"
                                         r"patch_peft_model\(model\)"):
        apply_lora(pm)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == before  # peft's adapter still trains
    assert not lora_names(pm)


def test_apply_lora_twice_and_after_another_method():
    model = build("llama")
    apply_lora(model, target_modules=["q_proj"], r=2)
    with pytest.raises(ValueError, match=r"already has LoRA applied by peft_kernels; call remove_lora"):
        apply_lora(model, target_modules=["v_proj"], r=2)
    remove_lora(model)
    apply_lora(model, target_modules=["v_proj"], r=2)  # fine again after remove_lora

    other = build("llama")
    _methods.register_method(other, "prefix", None)  # what apply_prefix_tuning records
    with pytest.raises(ValueError, match=r"already has prefix tuning .*LoRA does not compose.*remove_prefix"):
        apply_lora(other)
    assert not lora_names(other)


# --------------------------------------------------------------------------------------------------
# 2. save_pretrained / from_pretrained and Trainer save + resume
# --------------------------------------------------------------------------------------------------
def test_save_pretrained_from_pretrained_keeps_the_adapter(tmp_path):
    torch.manual_seed(0)
    base = build("llama")
    model = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], r=4)
    perturb_trainable(model)
    inputs = batch("llama")
    trained = logits(model, inputs)
    assert (trained - logits(base, inputs)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    assert {"config.json", "adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # base + adapter (peft)
    assert_close(logits(reloaded, inputs), trained, rtol=1e-4, atol=1e-5, name="from_pretrained")
    assert len(patch_peft_model(reloaded).patched) == 4  # and the fused kernels can serve it
    assert_close(logits(reloaded, inputs), trained, rtol=1e-4, atol=1e-5, name="patched")

    ours = load_lora(copy.deepcopy(base), tmp_path)  # or our layers on a plain base
    assert_close(logits(ours, inputs), trained, rtol=1e-4, atol=1e-5, name="load_lora")


def test_save_pretrained_refuses_merged_layers(tmp_path):
    model = apply_lora(build("llama"), target_modules=["q_proj"], r=2)
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged into their weights.*merge_and_unload"):
        model.save_pretrained(tmp_path)
    assert not os.listdir(tmp_path) if tmp_path.exists() else True


def test_save_pretrained_after_remove_lora_is_transformers_own():
    model = apply_lora(build("llama"), target_modules=["q_proj"], r=2)
    assert "save_pretrained" in model.__dict__
    remove_lora(model)
    assert "save_pretrained" not in model.__dict__


def _trainer(model, out, max_steps, save_steps=2):
    ids = torch.randint(1, VOCAB, (16, 8), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=save_steps, per_device_train_batch_size=2,
        learning_rate=5e-2, report_to=[], use_cpu=True, logging_steps=1000, seed=0, data_seed=0,
        dataloader_num_workers=0, save_only_model=False)
    return transformers.Trainer(model=model, args=args, train_dataset=data)


def test_trainer_save_and_resume_keep_the_adapter(tmp_path):
    def fresh(seed):
        torch.manual_seed(0)
        base = build("llama").train()
        torch.manual_seed(seed)  # a different LoRA init: resume must bring the checkpoint's back
        return apply_lora(base, target_modules=["q_proj", "v_proj"], r=4)

    straight = fresh(1)
    _trainer(straight, tmp_path / "a", max_steps=4).train()
    resumed = fresh(2)
    _trainer(resumed, tmp_path / "b", max_steps=4).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        if p.requires_grad:
            assert_close(q, p, rtol=1e-4, atol=1e-6, name=n)
    inputs = batch("llama")
    assert_close(logits(resumed.eval(), inputs), logits(straight.eval(), inputs), rtol=1e-4, atol=1e-5)

    trainer = _trainer(straight, tmp_path / "final", max_steps=1)
    trainer.save_model(str(tmp_path / "final"))
    torch.manual_seed(0)
    back = load_lora(build("llama"), tmp_path / "final")
    assert_close(logits(back, inputs), logits(straight, inputs), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 3. Task heads: modules_to_save and peft's task-type defaults
# --------------------------------------------------------------------------------------------------
def build_seq_cls():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


def test_seq_cls_head_trains_and_matches_peft_step_for_step(tmp_path):
    torch.manual_seed(0)
    base = build_seq_cls()
    ours = apply_lora(copy.deepcopy(base), target_modules="all-linear", r=4)
    ref = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear")).eval()
    cfg = ours.peft_kernels_lora_config
    assert cfg.task_type == "SEQ_CLS" and cfg.saved_modules == ["score"] and "score" not in cfg.modules
    assert ours.score.weight.requires_grad and not isinstance(ours.score, LoRALinear)
    # the same LoRA init in both
    with torch.no_grad():
        for name in lora_names(ours):
            layer = ref.base_model.model.get_submodule(name)
            ours.get_submodule(name).lora_A.copy_(layer.lora_A["default"].weight)
    counts, (trainable_ref, total_ref) = peft_kernels.trainable_parameters(ours), ref.get_nb_trainable_parameters()
    assert counts.trainable == trainable_ref
    assert counts.total + ours.score.weight.numel() == total_ref  # peft also counts its copy of the head
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (4, 7), generator=g)
    labels = torch.randint(0, 3, (4,), generator=g)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_r = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        losses = []
        for model, opt in ((ours, opt_o), (ref, opt_r)):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6, name=f"loss step {step}")
    head_ref = ref.base_model.model.score.modules_to_save["default"].weight
    assert_close(ours.score.weight, head_ref, rtol=1e-4, atol=1e-6, name="trained head")

    save_lora(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "score" in saved["modules_to_save"]
    loaded = PeftModel.from_pretrained(build_seq_cls_like(base), tmp_path / "ours").eval()
    inputs = {"input_ids": ids}
    assert_close(logits(loaded, inputs), logits(ours, inputs), rtol=1e-4, atol=1e-5, name="ours -> peft")

    ref.save_pretrained(tmp_path / "peft")  # peft's adapter with modules_to_save, into our layers
    back = load_lora(build_seq_cls_like(base), tmp_path / "peft")
    assert back.peft_kernels_lora_config.saved_modules == ["score"]
    assert_close(logits(back, inputs), logits(ref, inputs), rtol=1e-4, atol=1e-5, name="peft -> ours")


def build_seq_cls_like(model):
    """A fresh sequence-classification model with ``model``'s untrained base weights (its original head)."""
    fresh = build_seq_cls()
    base = model.base_model.model if isinstance(model, PeftModel) else model
    sd = {k: v for k, v in base.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    sd = {k.replace(".original_module", "").replace(".base_layer", ""): v for k, v in sd.items()}
    fresh.load_state_dict(sd)
    return fresh


def test_explicit_modules_to_save_and_no_task_heads():
    model = apply_lora(build("llama"), target_modules=["q_proj"], r=2, modules_to_save=["embed_tokens"])
    assert model.model.embed_tokens.weight.requires_grad
    with pytest.raises(ValueError, match=r"modules_to_save entries \['nope'\] match no module"):
        apply_lora(build("llama"), modules_to_save=["nope"])
    plain = apply_lora(build_seq_cls(), task_type=None, r=2)  # peft without task_type: LoRA on the head too
    assert isinstance(plain.score, LoRALinear)


# --------------------------------------------------------------------------------------------------
# 4. Architectures: Falcon's FalconLinear
# --------------------------------------------------------------------------------------------------
def build_falcon():
    cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                    max_position_embeddings=64)
    return transformers.FalconForCausalLM(cfg).eval()


def test_falcon_matches_peft_and_patch_peft_model_fuses_it():
    torch.manual_seed(0)
    base = build_falcon()
    ours = apply_lora(copy.deepcopy(base), target_modules="all-linear", r=4)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear",
                                                         init_lora_weights=False)).eval()
    assert lora_names(ours) == {n.removeprefix("base_model.model.") for n, m in ref.named_modules()
                                if isinstance(m, peft.tuners.lora.layer.LoraLayer)}
    with torch.no_grad():
        for name in lora_names(ours):
            layer = ref.base_model.model.get_submodule(name)
            ours.get_submodule(name).lora_A.copy_(layer.lora_A["default"].weight)
            ours.get_submodule(name).lora_B.copy_(layer.lora_B["default"].weight)
    inputs = batch("llama")
    loss_o, _ = loss_and_grads(ours, inputs)
    loss_r, _ = loss_and_grads(ref, inputs)
    assert_close(loss_o, loss_r, name="loss")
    report = patch_peft_model(ref)
    assert len(report.patched) == 8 and not report.skipped
    assert_close(loss_and_grads(ref, inputs)[0], loss_r, name="patched loss")


def test_refusal_names_the_real_reason():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = build("llama")
    model.model.layers[0].mlp.up_proj = Scaled(32, 64, bias=False)
    with pytest.raises(ValueError, match=r"overrides forward .*LINEAR_MAP_CLASSES"):
        apply_lora(model)
    quantized = nn.Linear(32, 64, bias=False)
    quantized.weight = nn.Parameter(torch.ones(64, 32, dtype=torch.int8), requires_grad=False)
    model.model.layers[0].mlp.up_proj = quantized
    with pytest.raises(ValueError, match=r"dtype torch.int8 \(quantized"):
        apply_lora(model)


def build_moe(arch: str, layers: int = 2):
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=64, num_experts_per_tok=2)
    if arch == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=64, num_local_experts=4, **common)).eval()
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        intermediate_size=64, moe_intermediate_size=16, num_experts=4, head_dim=8, **common)).eval()


def copy_from_peft_moe(ref, ours, inputs):
    """Give ours peft's (random, non-zero) adapter weights, through peft's own file format."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        from safetensors.torch import load_file

        state = load_file(os.path.join(d, "adapter_model.safetensors"))
    from peft_kernels.patch.lora_checkpoint import _plan_copies

    plan = _plan_copies(ours, ours.peft_kernels_lora_config, state, "test")
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_all_linear_matches_peft_targets_and_numbers(tmp_path, arch):
    torch.manual_seed(0)
    base = build_moe(arch)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear",
                                                         init_lora_weights=False)).eval()
    ours = apply_lora(copy.deepcopy(base), target_modules="all-linear", r=4)
    assert tuple(peft_kernels.trainable_parameters(ours)) == ref.get_nb_trainable_parameters()
    cfg = ours.peft_kernels_lora_config
    assert cfg.target_parameters == ["down_proj", "gate.weight", "gate_up_proj"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in cfg.parameters and "model.layers.0.mlp.gate.weight" in \
        cfg.parameters
    inputs = batch("llama")
    copy_from_peft_moe(ref, ours, inputs)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    loss_r, grads_r = loss_and_grads(ref, inputs)
    assert_close(loss_o, loss_r, rtol=1e-5, atol=1e-6, name="loss")
    g_o = sorted(g.norm().item() for g in grads_o.values())
    g_r = sorted(g.norm().item() for g in grads_r.values())
    assert len(g_o) == len(g_r) and all(abs(a - b) <= 1e-4 * max(b, 1e-3) for a, b in zip(g_o, g_r))

    save_lora(ours, tmp_path / "ours")  # ours -> peft
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_close(logits(back, inputs), logits(ours, inputs), rtol=1e-4, atol=1e-5, name="ours -> peft")
    ref.save_pretrained(tmp_path / "peft")  # peft -> ours
    loaded = load_lora(copy.deepcopy(base), tmp_path / "peft")
    assert_close(logits(loaded, inputs), logits(ref, inputs), rtol=1e-4, atol=1e-5, name="peft -> ours")
    with disable_adapter(loaded):
        assert_close(logits(loaded, inputs), logits(base, inputs), name="disabled")
    merged = merge_and_unload(copy.deepcopy(loaded))
    assert not any("lora" in n for n in merged.state_dict())
    assert_close(logits(merged, inputs), logits(ref, inputs), rtol=1e-4, atol=1e-5, name="merged")
    plain = unload(loaded)
    assert set(plain.state_dict()) == set(base.state_dict())
    assert_close(logits(plain, inputs), logits(base, inputs), name="unloaded")


def test_moe_parameter_lora_refuses_dropout_and_extra_adapters():
    with pytest.raises(ValueError, match="lora_dropout=0.1 with target_parameters"):
        apply_lora(build_moe("mixtral", 1), lora_dropout=0.1)
    model = apply_lora(build_moe("mixtral", 1), target_modules=["q_proj"], r=2)  # no MoE params: as peft
    assert model.peft_kernels_lora_config.target_parameters is None
    moe = apply_lora(build_moe("mixtral", 1), r=2)
    with pytest.raises(ValueError, match="LoRA on parameters"):
        add_lora_adapter(moe, "other")
    with pytest.raises(ValueError, match=r"apply_lora: target_modules=\['q_proj', 'w1'\]: .*w3"):
        apply_lora(build_moe("mixtral", 1), target_modules=["q_proj", "w1"])  # peft's v4 names, half of a fusion
    v4 = apply_lora(build_moe("mixtral", 1), target_modules=["q_proj", "w1", "w3"], r=2)
    assert v4.peft_kernels_lora_config.parameters == ["model.layers.0.mlp.experts.gate_up_proj"]


# --------------------------------------------------------------------------------------------------
# 5. Named adapters, set_adapter, disable_adapter, merge_and_unload / unload
# --------------------------------------------------------------------------------------------------
def test_named_adapters_match_peft(tmp_path):
    torch.manual_seed(0)
    base = build("llama")
    inputs = batch("llama")
    ours = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], r=4)
    add_lora_adapter(ours, "other", r=2, lora_alpha=4)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False)).eval()
    ref.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
    ref.eval()
    with torch.no_grad():
        for name in lora_names(ours):
            layer, m = ref.base_model.model.get_submodule(name), ours.get_submodule(name)
            for adapter in ("default", "other"):
                A, B, _, _ = m.adapter_weights(adapter)
                A.copy_(layer.lora_A[adapter].weight)
                B.copy_(layer.lora_B[adapter].weight)
    assert_close(logits(ours, inputs), logits(ref, inputs), rtol=1e-4, atol=1e-5, name="default")
    set_adapter(ours, "other")
    ref.set_adapter("other")
    assert_close(logits(ours, inputs), logits(ref, inputs), rtol=1e-4, atol=1e-5, name="other")
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_adapters.other." in n for n in trainable)
    with disable_adapter(ours), ref.disable_adapter():
        assert_close(logits(ours, inputs), logits(base, inputs), name="disabled")
        assert_close(logits(ref, inputs), logits(base, inputs), name="peft disabled")
    assert_close(logits(ours, inputs), logits(ref, inputs), rtol=1e-4, atol=1e-5, name="re-enabled")

    save_lora(ours, tmp_path)  # the active adapter
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    delete_lora_adapter(ours, "other")
    assert ours.peft_kernels_lora_config.adapter_name == "default"
    load_lora(ours, tmp_path, adapter_name="other")  # peft's load_adapter: a second adapter from a file
    set_adapter(ours, "other")
    assert_close(logits(ours, inputs), logits(ref, inputs), rtol=1e-4, atol=1e-5, name="loaded other")

    merged = merge_and_unload(copy.deepcopy(ours))
    assert not lora_names(merged)
    assert_close(logits(merged, inputs), logits(ref, inputs), rtol=1e-4, atol=1e-5, name="merge_and_unload")
    plain = unload(ours)
    assert_close(logits(plain, inputs), logits(base, inputs), name="unload")
    with pytest.raises(ValueError, match="merge_and_unload: LlamaForCausalLM has no LoRA"):
        merge_and_unload(plain)


def test_disable_adapter_uses_the_untrained_head():
    torch.manual_seed(0)
    base = build_seq_cls()
    model = apply_lora(copy.deepcopy(base), r=2)
    perturb_trainable(model)
    inputs = {"input_ids": batch("llama")["input_ids"]}
    with disable_adapter(model):
        assert_close(logits(model, inputs), logits(base, inputs), name="disabled")
    assert (logits(model, inputs) - logits(base, inputs)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# 6. Damaged files: the file named, the model unchanged
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    base = build("qwen2")  # q/k/v carry biases
    model = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], r=2, bias="all")
    perturb_trainable(model)
    save_lora(model, tmp_path)
    return base, model, tmp_path


def test_truncated_weights_and_bad_config(saved):
    base, _, path = saved
    snap = snapshot(base)
    weights = path / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"load_lora: .*adapter_model\.safetensors.*truncated or damaged"):
        load_lora(base, path)
    assert_same_state(base, snap) and not lora_names(base)
    weights.write_bytes(good)
    cfg = path / "adapter_config.json"
    cfg.write_text(cfg.read_text()[:40])
    with pytest.raises(ValueError, match=r"load_lora: .*adapter_config\.json.*not valid JSON"):
        load_lora(base, path)
    assert_same_state(base, snap) and not lora_names(base)
    assert not _methods.applied_methods(base)


@pytest.mark.parametrize("kind", ["int", "nan"])
def test_integer_or_nan_adapter_tensors_refused(saved, kind):
    from safetensors.torch import load_file, save_file

    base, _, path = saved
    snap = snapshot(base)
    f = path / "adapter_model.safetensors"
    state = load_file(f)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = state[key].to(torch.int32) if kind == "int" else torch.full_like(state[key], float("nan"))
    save_file(state, f)
    with pytest.raises(ValueError, match=rf"load_lora: .*adapter_model\.safetensors.*{key}.*"
                                         + ("dtype torch.int32" if kind == "int" else "all NaN")):
        load_lora(base, path)
    assert_same_state(base, snap) and not lora_names(base)


# --------------------------------------------------------------------------------------------------
# 7. Nothing half-done, nothing lost (fault injection)
# --------------------------------------------------------------------------------------------------
def test_apply_lora_failing_allocation_leaves_model_unchanged(monkeypatch):
    model = build("llama")
    snap = snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    real, calls = LoRALinear._init_lora, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(self, *args)

    monkeypatch.setattr(LoRALinear, "_init_lora", failing)
    with pytest.raises(RuntimeError, match="injected"):
        apply_lora(model, r=4)
    assert not lora_names(model) and not hasattr(model, "peft_kernels_lora_config")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads  # nothing frozen
    assert_same_state(model, snap)
    monkeypatch.setattr(LoRALinear, "_init_lora", real)
    apply_lora(model, r=4)  # a retry works
    assert len(lora_names(model)) == 14


def test_load_lora_mismatch_after_bias_keys_overwrites_nothing(saved):
    from safetensors.torch import load_file, save_file

    base, _, path = saved
    snap = snapshot(base)
    f = path / "adapter_model.safetensors"
    state = load_file(f)
    last = sorted(k for k in state if "lora_A" in k)[-1]  # biases come first in the file, then a bad shape
    state[last] = torch.randn(3, state[last].shape[1])
    save_file(state, f)
    with pytest.raises(ValueError, match="shape"):
        load_lora(base, path)
    assert_same_state(base, snap) and not lora_names(base)


def test_bias_none_adapter_cannot_write_biases(saved):
    from safetensors.torch import load_file, save_file

    base, model, path = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "none"}))
    state = load_file(path / "adapter_model.safetensors")
    assert any(k.endswith(".bias") for k in state)
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"unexpected .*bias"):
        load_lora(base, path)
    assert_same_state(base, snap)
    save_file({k: v for k, v in state.items() if "lora_" in k}, path / "adapter_model.safetensors")
    load_lora(base, path)  # the same adapter without the stray biases loads


_KILLED_SAVE_LORA = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from safetensors import torch as st
    from tests.patch.test_apply_lora import build
    from peft_kernels.patch import apply_lora, save_lora
    real = st.save_file
    def stalled(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)  # part of the new weights are on disk
        print("WRITING", flush=True)
        sys.stdin.read()
    st.save_file = stalled
    torch.manual_seed(1)
    model = apply_lora(build("llama"), target_modules=["q_proj", "k_proj"], r=3)  # a different adapter
    save_lora(model, sys.argv[1])
""")


def test_killed_save_lora_leaves_the_old_adapter_loadable(saved):
    base, model, path = saved
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE_LORA, str(path), root], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=120)
    loaded = load_lora(base, path)
    inputs = batch("llama")
    assert_close(logits(loaded, inputs), logits(model, inputs), name="old adapter")


@pytest.mark.parametrize("pattern", [r"(.*.*)*\.zzz", r"(a+)+b", r"(\w+\.)*zzz", r".*.*.*.*.*.*\.zzz", r"(a|aa)*b",
                                     r"(a?)*b", r"(.)\1.*"])
def test_hostile_target_regex_refused_fast(saved, pattern):
    base, _, path = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": pattern}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="target_modules=.*is refused.*exponential time"):
        load_lora(base, path)
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ValueError, match="is refused"):
        apply_lora(build("llama"), target_modules=pattern)


def test_ordinary_regexes_still_work():
    for pattern in (r".*\.(q|v)_proj", r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)", r"^(?!.*mlp).*_proj"):
        model = apply_lora(build("llama"), target_modules=pattern, r=2)
        assert lora_names(model)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        apply_lora(build("llama"), target_modules="q_proj(")


def test_rank_and_alpha_patterns_match_peft(tmp_path):
    torch.manual_seed(0)
    base = build("llama")
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 6},
              alpha_pattern={"v_proj": 12})
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw)).eval()
    pm.save_pretrained(tmp_path)
    ours = load_lora(copy.deepcopy(base), tmp_path)
    assert ours.model.layers[1].self_attn.q_proj.r == 6 and ours.model.layers[0].self_attn.q_proj.r == 2
    assert ours.model.layers[0].self_attn.v_proj.scaling == 6.0
    inputs = batch("llama")
    assert_close(logits(ours, inputs), logits(pm, inputs), rtol=1e-4, atol=1e-5)
    fresh = apply_lora(copy.deepcopy(base), **kw)
    assert {n: m.r for n, m in fresh.named_modules() if isinstance(m, LoRALinear)} == {
        n: m.r for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    with pytest.raises(ValueError, match=r"apply_lora: rank_pattern\['q_proj'\] must be a positive int"):
        apply_lora(copy.deepcopy(base), rank_pattern={"q_proj": 0})


def test_composing_method_applied_first_keeps_its_parameters_trainable(monkeypatch):
    model = build("qwen2")
    model.requires_grad_(False)
    biases = {n for n, p in model.named_parameters() if n.endswith(".bias")}
    for n, p in model.named_parameters():
        p.requires_grad_(n in biases)  # what a bias-only method leaves trainable
    _methods.register_method(model, "bitfit", None)
    monkeypatch.setattr(_methods, "COMPOSES", {frozenset(("bitfit", "lora"))})
    apply_lora(model, target_modules=["o_proj"], r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert biases <= trainable and any(n.endswith("lora_A") for n in trainable)


def test_peft_methods_on_the_model(capsys):
    import pickle

    torch.manual_seed(0)
    base = build("llama")
    model = apply_lora(copy.deepcopy(base), target_modules=["q_proj"], r=2)
    perturb_trainable(model)
    counts = model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith(f"trainable params: {counts.trainable:,d} || all params:")
    assert model.get_nb_trainable_parameters() == tuple(counts) and counts.trainable == 2 * 2 * (32 + 32)
    inputs = batch("llama")
    with model.disable_adapter():
        assert_close(logits(model, inputs), logits(base, inputs), name="disabled")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.print_trainable_parameters.model is clone  # bound to the copy, not the original
        assert_close(logits(clone, inputs), logits(model, inputs), name="copy")
    merged = model.merge_and_unload()
    assert "merge_and_unload" not in merged.__dict__ and not lora_names(merged)


# --------------------------------------------------------------------------------------------------
# Argument errors of apply_lora / load_lora / save_lora name the function and the argument
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lora_dropout="0.1"), TypeError, "apply_lora: lora_dropout must be a real number"),
    (dict(lora_alpha=None), TypeError, "apply_lora: lora_alpha must be a real number"),
    (dict(lora_alpha=float("nan")), ValueError, "apply_lora: lora_alpha must be finite"),
    (dict(adapter_dtype=torch.int8), TypeError, "apply_lora: adapter_dtype must be a floating torch.dtype"),
    (dict(r=0), ValueError, "apply_lora: r must be a positive int"),
    (dict(r="4"), TypeError, "apply_lora: r must be a positive int"),
    (dict(use_rslora="yes"), TypeError, "apply_lora: use_rslora must be a bool"),
    (dict(target_modules=3), TypeError, "apply_lora: target_modules must be a str"),
    (dict(modules_to_save="score"), TypeError, "apply_lora: modules_to_save must be a list"),
    (dict(task_type="SEQ_CLASS"), ValueError, "apply_lora: task_type must be one of"),
    (dict(adapter_name="a.b"), ValueError, "apply_lora: adapter_name"),
    (dict(rank_pattern=[("q_proj", 2)]), TypeError, "apply_lora: rank_pattern must be a dict"),
    (dict(alpha_pattern={"q_proj": float("inf")}), ValueError, r"apply_lora: alpha_pattern\['q_proj'\]"),
    (dict(target_parameters="gate.weight"), TypeError, "apply_lora: target_parameters must be a list"),
])
def test_apply_lora_argument_errors(kwargs, exc, match):
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        apply_lora(model, **kwargs)
    assert_same_state(model, snap) and not lora_names(model)


def test_apply_lora_rejects_non_modules():
    with pytest.raises(TypeError, match="apply_lora: model must be an nn.Module"):
        apply_lora("model")


def test_load_and_save_argument_errors(saved, tmp_path):
    base, model, path = saved
    with pytest.raises(TypeError, match="load_lora: path must be a str or os.PathLike"):
        load_lora(base, 3)
    with pytest.raises(TypeError, match="load_lora: adapter_dtype"):
        load_lora(base, path, adapter_dtype=torch.int32)
    with pytest.raises(TypeError, match="load_lora: is_trainable must be a bool"):
        load_lora(base, path, is_trainable="no")
    with pytest.raises(TypeError, match="load_lora: model must be an nn.Module"):
        load_lora(None, path)
    with pytest.raises(TypeError, match="save_lora: path must be a str"):
        save_lora(model, None)
    with pytest.raises(ValueError, match="save_lora: no adapter 'nope'"):
        save_lora(model, tmp_path / "x", adapter_name="nope")
    with pytest.raises(ValueError, match="save_lora: LlamaForCausalLM has no LoRA applied"):
        save_lora(build("llama"), tmp_path / "y")
    with pytest.raises(TypeError, match="remove_lora: merge must be a bool"):
        remove_lora(model, merge="yes")


def test_save_pretrained_with_two_adapters_uses_peft_layout(tmp_path):
    torch.manual_seed(0)
    base = build("llama")
    model = apply_lora(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], r=2)
    add_lora_adapter(model, "other", r=3, lora_alpha=6)
    perturb_trainable(model, seed=1)  # the default adapter
    set_adapter(model, "other")
    perturb_trainable(model, seed=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    inputs = batch("llama")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    pm.load_adapter(tmp_path / "other", "other")
    pm.eval()
    pm.set_adapter("other")
    assert_close(logits(pm, inputs), logits(model, inputs), rtol=1e-4, atol=1e-5, name="other")
    pm.set_adapter("default")
    set_adapter(model, "default")
    assert_close(logits(pm, inputs), logits(model, inputs), rtol=1e-4, atol=1e-5, name="default")


def test_set_adapter_leaves_other_trainable_parameters_alone():
    model = apply_lora(build("qwen2"), target_modules=["q_proj"], r=2)
    add_lora_adapter(model, "other", r=2)
    extra = model.model.layers[0].self_attn.k_proj.bias
    extra.requires_grad_(True)  # e.g. BitFit applied after LoRA
    set_adapter(model, "other")
    assert extra.requires_grad
    trainable_lora = {n for n, p in model.named_parameters() if p.requires_grad and "lora" in n}
    assert trainable_lora and all(".lora_adapters.other." in n for n in trainable_lora)
