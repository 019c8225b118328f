"""patch_peft_model is the one entry point for an existing HF peft model, whatever its method: LoRA (with
bias="all"), Prefix-Tuning and Prompt Tuning models come out with peft's outputs, served by the fused ops."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peft_kernels as pk  # noqa: E402


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg).eval()


def _loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("config, base", [
    (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all"), _bert),
    (lambda: peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"), _llama),
    (lambda: peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"), _llama),
], ids=["lora_bias_all", "prefix_tuning", "prompt_tuning"])
def test_patch_peft_model_serves_every_method_with_peft_outputs(config, base):
    cfg = config()
    model = peft.get_peft_model(base(), cfg)
    for p in model.parameters():  # a trained adapter, not the zero-initialised one
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 97, (2, 9))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    ours = copy.deepcopy(model)
    report = pk.patch_peft_model(ours)
    assert report.method == str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if report.method == "LORA":
        assert report.patched and report.biases, str(report)
    loss, grads = _loss_and_grads(ours, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert pk.unpatch_peft_model(ours)


def test_methods_that_do_not_compose_are_refused_both_ways():
    model = _llama()
    pk.apply_prefix_tuning(model, num_virtual_tokens=4)
    with pytest.raises(ValueError, match="apply_lora"):
        pk.apply_lora(model, r=4)
    pk.remove_prefix(model)
    pk.apply_lora(model, r=4)  # the record is gone with the prefix
    with pytest.raises(ValueError, match="apply_prefix_tuning"):
        pk.apply_prefix_tuning(model, num_virtual_tokens=4)
