"""apply_prompt_tuning / apply_p_tuning on tiny random transformers models (Llama, GPT-2, BERT), against HF peft's
PromptTuningConfig / PromptEncoderConfig models: loss, logits, gradients, generate() tokens; template positions,
left padding, only the prompt (and head) training, save/load in peft's format both ways, remove, Trainer,
gradient checkpointing, torch.compile(fullgraph=True), patch_peft_prompt_model, bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peft_kernels
import peft_kernels.ops.prompt as prompt_op
from peft_kernels.nn.prompt import PromptEncoder, SoftPrompt
from peft_kernels.patch.prompt import (
    apply_p_tuning,
    apply_prompt_tuning,
    freeze_prompt,
    get_prompt_state,
    load_prompt,
    patch_peft_prompt_model,
    remove_prompt_tuning,
    save_prompt,
    unpatch_peft_prompt_model,
)
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V, P = 61, 5


def llama(cls="LlamaForCausalLM", **kw):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=None, eos_token_id=None, **kw)
    return getattr(transformers, cls)(cfg).eval()  # no EOS: generate() runs every step


def gpt2(cls="GPT2LMHeadModel", n_positions=40):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=n_positions,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                  bos_token_id=None, eos_token_id=None)
    return getattr(transformers, cls)(cfg).eval()


def bert(cls="BertForSequenceClassification"):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    return getattr(transformers, cls)(cfg).eval()


def peft_model(base, method, task, encoder="MLP"):
    if method == "prompt":
        cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    else:
        cfg = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=16,
                                       encoder_reparameterization_type=encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, cfg)


def ours_like(base, pm, method, encoder="mlp"):
    """Our patch on a copy of the base model, with peft's prompt weights."""
    model = copy.deepcopy(base)
    enc = pm.prompt_encoder.default
    if method == "prompt":
        apply_prompt_tuning(model, P, prompt=enc.embedding.weight.detach())
    else:
        apply_p_tuning(model, P, encoder=encoder, encoder_hidden_size=16)
        model.peft_kernels_prompt.load_state_dict(enc.state_dict())
    head = [n for n in ("classifier", "score") if hasattr(base, n)]
    for n in head:  # peft trains a copy of the head (modules_to_save); start ours from the same weights
        wrapped = pm.base_model.get_submodule(n)
        head_copy = wrapped.modules_to_save["default"] if hasattr(wrapped, "modules_to_save") else wrapped
        getattr(model, n).load_state_dict(head_copy.state_dict())
    return model


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def batch(B=3, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, S), generator=g)
    ids[0, 0], ids[-1, -1] = 1, V - 1
    return ids


# --------------------------------------------------------------------------------------------------
# Parity with HF peft
# --------------------------------------------------------------------------------------------------
CAUSAL = [("llama", "prompt", "mlp"), ("llama", "p_tuning", "mlp"), ("llama", "p_tuning", "lstm"),
          ("gpt2", "prompt", "mlp"), ("gpt2", "p_tuning", "mlp")]


@pytest.mark.parametrize("arch, method, encoder", CAUSAL)
def test_causal_lm_matches_peft_loss_logits_grads(arch, method, encoder):
    base = llama() if arch == "llama" else gpt2()
    pm = peft_model(copy.deepcopy(base), method, "CAUSAL_LM", encoder.upper())
    ours = ours_like(base, pm, method, encoder)
    ids = batch()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # some padding: the mask is extended, the padded labels stay ignored
    labels = ids.masked_fill(mask == 0, -100)
    a = pm(input_ids=ids, attention_mask=mask, labels=labels)
    b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits.shape == (3, P + 9, V)
    assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5, name="logits")
    assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6, name="loss")
    ga = torch.autograd.grad(a.loss, list(trainable(pm).values()))
    gb = torch.autograd.grad(b.loss, list(trainable(ours).values()))
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        assert_close(y, x, rtol=1e-4, atol=1e-6, name="grad")
    assert all(g.abs().sum() > 0 for g in gb)


def greedy_without_cache(model, ids, n):
    x = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[:, -1]
            x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)
    return x[:, ids.shape[1]:]


@pytest.mark.parametrize("arch, method, encoder", CAUSAL[:2] + CAUSAL[3:4])
def test_generate_with_kv_cache_gives_peft_tokens(arch, method, encoder):
    """Our generate() (KV cache holding the virtual tokens) picks the tokens peft's forward picks step by step.
    (peft's own generate() re-injects the prompt every step with this transformers version's `cache` kwarg, so
    its forward, recomputed without a cache, is the reference.)"""
    base = llama() if arch == "llama" else gpt2()
    pm = peft_model(copy.deepcopy(base), method, "CAUSAL_LM", encoder.upper())
    ours = ours_like(base, pm, method, encoder)
    ids = batch(B=2, S=6, seed=3)
    expected = greedy_without_cache(pm, ids, 7)
    out = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(out[:, 6:], expected)
    assert torch.equal(greedy_without_cache(ours, ids, 7), expected)


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_bert_sequence_classification_matches_peft(method):
    base = bert()
    pm = peft_model(copy.deepcopy(base), method, "SEQ_CLS")
    ours = ours_like(base, pm, method)
    ids = batch(B=4, S=7)
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    labels = torch.tensor([0, 2, 1, 2])
    a = pm(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    b = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-6, name="logits")
    ga = torch.autograd.grad(a.loss, list(trainable(pm).values()))
    gb = torch.autograd.grad(b.loss, list(trainable(ours).values()))
    assert len(ga) == len(gb)  # the prompt (encoder) and the classifier head, nothing else
    for x, y in zip(ga, gb):
        assert_close(y, x, rtol=1e-4, atol=1e-6, name="grad")


def test_llama_sequence_classification_trains_head_and_runs():
    model = llama("LlamaForSequenceClassification", num_labels=2)
    apply_prompt_tuning(model, P)
    assert set(trainable(model)) == {"peft_kernels_prompt.embedding.weight", "score.weight"}
    out = model(input_ids=batch(), labels=torch.tensor([0, 1, 1]))
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method, positions", [("prompt", None), ("p_tuning", None), ("p_tuning", (0, 2, 2, 4, 9))])
def test_decoder_sequence_classifier_pools_the_last_real_token_under_right_padding(arch, method, positions):
    """The classifier head pools the last non-pad token of input_ids; given inputs_embeds (prompt tuning gives it
    them) it took the last position, a pad token in a right-padded row (7.2 off; as peft does). A padded row now
    scores as the row alone, with the prompt in front or at template positions; gradients reach the prompt."""
    model = (llama if arch == "llama" else gpt2)(f"{'Llama' if arch == 'llama' else 'GPT2'}ForSequenceClassification",
                                                 **({"num_labels": 3} if arch == "llama" else {}))
    if method == "prompt":
        apply_prompt_tuning(model, P)
    else:
        apply_p_tuning(model, P, positions=positions)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    ids = batch()
    ids[0, -3:] = 0  # right padding (pad_token_id 0), a mask to match
    mask = (ids != 0).long()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))
    with torch.no_grad():
        alone = model(input_ids=ids[:1, :-3]).logits
    assert_close(out.logits.detach()[:1], alone, rtol=1e-4, atol=1e-5, name="padded row")
    out.loss.backward()
    assert model.peft_kernels_prompt.parameters().__next__().grad is not None
    clone = copy.deepcopy(model)  # its own state: the hook pools the clone's rows
    with torch.no_grad():
        assert_close(clone(input_ids=ids, attention_mask=mask).logits[:1], alone, rtol=1e-4, atol=1e-5)
    remove_prompt_tuning(model)
    assert not model.score._forward_hooks and "_peft_kernels_prompt_pooling" not in model.score.__dict__


def test_patch_peft_prompt_model_runs_the_fused_op(monkeypatch):
    base = llama()
    for method in ("prompt", "p_tuning"):
        pm = peft_model(copy.deepcopy(base), method, "CAUSAL_LM")
        ids = batch()
        a = pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        ga = torch.autograd.grad(a.loss, list(trainable(pm).values()))
        backend = prompt_op.FAMILY.forward_backends["reference"]
        calls, real = [], backend.run

        def counting(*args, calls=calls, real=real):
            calls.append(1)
            return real(*args)

        monkeypatch.setattr(backend, "run", counting)
        patch_peft_prompt_model(pm)
        # The reference backend forced, so that its counted run shows the op was called (CPU dispatch prefers the
        # C++ backend, whose eager path is a C++ autograd node); then the default dispatch, with the same checks.
        with peft_kernels.use_backend("reference"):
            b = pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        monkeypatch.undo()
        assert calls, "the patched peft model did not call soft_prompt_embed"
        for out in (b, pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)):
            assert torch.equal(out.logits, a.logits) and torch.equal(out.loss, a.loss)
            for x, y in zip(ga, torch.autograd.grad(out.loss, list(trainable(pm).values()))):
                assert_close(y, x, rtol=1e-6, atol=1e-7)
        unpatch_peft_prompt_model(pm)
        assert "forward" not in pm.__dict__


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_patched_peft_generate_uses_the_kv_cache_and_gives_peft_forward_tokens(method):
    pm = peft_model(llama(), method, "CAUSAL_LM")
    ids = batch(B=2, S=6, seed=4)
    expected = greedy_without_cache(pm, ids, 6)
    patch_peft_prompt_model(pm)
    out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(out[:, 6:], expected)
    assert get_prompt_state(pm.get_base_model()) is None  # the hook is gone after generate()
    unpatch_peft_prompt_model(pm)
    assert "generate" not in pm.__dict__


def test_patch_peft_prompt_model_refuses_other_methods():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="expected a peft PromptTuningConfig"):
        patch_peft_prompt_model(pm)


# --------------------------------------------------------------------------------------------------
# Placement, positions, padding
# --------------------------------------------------------------------------------------------------
def test_template_positions_equal_literal_inputs_embeds():
    model = llama()
    ref = copy.deepcopy(model)
    apply_p_tuning(model, 3, positions=[0, 4, 4])
    ids = batch(B=2, S=7)
    labels = ids.clone()
    out = model(input_ids=ids, labels=labels)
    prompt = model.peft_kernels_prompt().detach()
    emb = ref.get_input_embeddings().weight
    rows, lab = [], []
    for b in range(2):
        e, l_ = [emb[i] for i in ids[b]], labels[b].tolist()
        for p, at in reversed(list(enumerate([0, 4, 4]))):
            e.insert(at, prompt[p])
            l_.insert(at, -100)
        rows.append(torch.stack(e))
        lab.append(l_)
    expected = ref(inputs_embeds=torch.stack(rows), labels=torch.tensor(lab))
    assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("positions", [None, [0, 2, 2]])
def test_left_padded_generation_matches_each_unpadded_row(positions):
    """Left padding: the virtual tokens, the mask and the position ids line up, so every row generates what it
    generates alone."""
    model = llama()
    if positions is None:
        apply_prompt_tuning(model, 3)
    else:
        apply_p_tuning(model, 3, positions=positions)
    long, short = batch(B=1, S=8, seed=1)[0], batch(B=1, S=5, seed=2)[0]
    ids = torch.stack([long, torch.cat([torch.zeros(3, dtype=long.dtype), short])])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, seq in ((0, long), (1, short)):
        alone = model.generate(input_ids=seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                               max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row, 8:], alone[0, len(seq):]), row


def test_position_ids_given_are_extended():
    model = llama()
    apply_prompt_tuning(model, P)
    ids = batch(B=2, S=6)
    pos = torch.arange(6).expand(2, 6)
    a = model(input_ids=ids, position_ids=pos).logits
    b = model(input_ids=ids).logits  # the model numbers the P + S embeddings 0.. itself
    assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Training, state, save / load
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_only_the_prompt_trains_and_a_short_run_lowers_the_loss(method):
    model = llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    if method == "prompt":
        apply_prompt_tuning(model, P, init="sample_vocab")
    else:
        apply_p_tuning(model, P, encoder="lstm")
    names = set(trainable(model))
    assert names and all(n.startswith("peft_kernels_prompt.") for n in names)
    model.train()
    opt = torch.optim.AdamW(trainable(model).values(), lr=3e-2)
    ids = batch(B=4, S=10, seed=5)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in names), n
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_text_init_uses_the_tokens_embeddings():
    model = llama()
    tokenizer = lambda text: {"input_ids": [3, 7, 11]}  # noqa: E731  (any callable text -> ids)
    apply_prompt_tuning(model, 7, init_text="a b c", tokenizer=tokenizer)
    emb = model.get_input_embeddings().weight
    assert torch.equal(model.peft_kernels_prompt.embedding.weight, emb[[3, 7, 11, 3, 7, 11, 3]].float())


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_save_loads_in_peft_and_peft_checkpoint_loads_in_ours(method, tmp_path):
    base = bert()
    ours = copy.deepcopy(base)
    if method == "prompt":
        apply_prompt_tuning(ours, P, init="sample_vocab")
    else:
        apply_p_tuning(ours, P, encoder_hidden_size=16)
    with torch.no_grad():
        ours.classifier.weight.add_(1.0)  # a trained head travels too
    save_prompt(ours, tmp_path / "ours")
    ids = batch(B=2, S=6)
    expected = ours(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6, name="peft loads ours")
    loaded.save_pretrained(tmp_path / "peft")
    fresh = load_prompt(copy.deepcopy(base), tmp_path / "peft")
    assert get_prompt_state(fresh).method == method
    assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6, name="ours loads peft's")
    again = load_prompt(copy.deepcopy(base), tmp_path / "ours")  # ours: P-Tuning's encoder comes back too
    assert isinstance(again.peft_kernels_prompt, SoftPrompt if method == "prompt" else PromptEncoder)
    assert_close(again(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)


def test_freeze_and_remove():
    model = llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = batch()
    plain = model(input_ids=ids).logits
    apply_p_tuning(model, P, encoder="lstm")
    out = model(input_ids=ids).logits
    freeze_prompt(model)
    assert isinstance(model.peft_kernels_prompt, SoftPrompt)
    assert_close(model(input_ids=ids).logits, out, rtol=1e-5, atol=1e-6)
    remove_prompt_tuning(model)
    assert not hasattr(model, "peft_kernels_prompt") and get_prompt_state(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert torch.equal(model(input_ids=ids).logits, plain)
    apply_prompt_tuning(model, P)  # applicable again after remove


def test_deepcopy_gets_its_own_prompt():
    model = llama()
    apply_prompt_tuning(model, P)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.peft_kernels_prompt.embedding.weight.add_(1.0)
    ids = batch()
    assert not torch.allclose(model(input_ids=ids).logits, twin(input_ids=ids).logits)


def test_gradient_checkpointing_same_grads():
    model = llama()
    apply_p_tuning(model, P)
    model.train()
    ids = batch()
    ref = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, list(trainable(model).values()))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    loss = model(input_ids=ids, labels=ids).loss
    for x, y in zip(ref, torch.autograd.grad(loss, list(trainable(model).values()))):
        assert_close(y, x, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("positions", [None, [0, 2, 2, 6, 9]])
def test_torch_compile_fullgraph(positions):
    model = llama()
    apply_p_tuning(model, P, encoder="lstm", positions=positions)
    ids = batch()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the template shifts per example, on the device
    eager = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(out.loss, list(trainable(model).values()))
    ge = torch.autograd.grad(eager.loss, list(trainable(model).values()))
    for x, y in zip(ge, g):
        assert_close(y, x, rtol=1e-4, atol=1e-6)


def test_hf_trainer(tmp_path):
    model = gpt2()
    apply_prompt_tuning(model, P)
    ids = batch(B=8, S=8, seed=9)
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    before = model.peft_kernels_prompt.embedding.weight.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 3
    assert not torch.equal(model.peft_kernels_prompt.embedding.weight, before)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="40 virtual tokens leave no room"):
        apply_prompt_tuning(gpt2(n_positions=40), 40)
    model = gpt2(n_positions=20)
    apply_prompt_tuning(model, P)
    with pytest.raises(ValueError, match=r"5 virtual tokens \+ 16 tokens = 21 positions.* only 20"):
        model(input_ids=batch(B=1, S=16))
    bad = batch(B=2, S=4)
    bad[1, 2] = V
    with pytest.raises(ValueError, match=rf"soft_prompt_embed: input_ids must be in \[0, {V}\)"):
        model(input_ids=bad)
    with pytest.raises(ValueError, match="hidden size 31, the model's embeddings have 32"):
        apply_prompt_tuning(gpt2(), prompt=torch.randn(4, 31))
    with pytest.raises(ValueError, match="already has prompt"):
        apply_prompt_tuning(model, P)
    with pytest.raises(ValueError, match="positions has 2 entries"):
        apply_p_tuning(llama(), 3, positions=[0, 1])
    with pytest.raises(ValueError, match="non-decreasing"):
        apply_p_tuning(llama(), 3, positions=[2, 1, 3])
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        apply_prompt_tuning(llama(), 0)
    with pytest.raises(ValueError, match="already an HF peft model"):
        apply_prompt_tuning(peft_model(llama(), "prompt", "CAUSAL_LM"), P)
    with pytest.raises(ValueError, match="has no soft prompt"):
        save_prompt(llama(), "/nonexistent")


def test_is_peft_prompt_model():
    from peft_kernels.patch.prompt import is_peft_prompt_model

    assert is_peft_prompt_model(peft_model(llama(), "p_tuning", "CAUSAL_LM"))
    assert not is_peft_prompt_model(llama())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not is_peft_prompt_model(peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])))


def test_example_trains_generates_and_saves(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "examples"))
    try:
        spec = importlib.util.spec_from_file_location("prompt_tuning_example", root / "examples" / "prompt_tuning.py")
        ex = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ex)
        model, first, last, n = ex.train(steps=8, num_virtual_tokens=4, batch_size=4, seq_len=32, progress=False)
        assert last < first and n == 4 * model.config.hidden_size
        assert isinstance(ex.generate(model, "anna ", max_new_tokens=5), str)
        save_prompt(model, tmp_path)
        assert (tmp_path / "adapter_model.safetensors").exists()
    finally:
        sys.path.remove(str(root / "examples"))


def test_template_positions_survive_save_and_load(tmp_path):
    base = llama()
    model = apply_p_tuning(copy.deepcopy(base), 3, positions=[0, 2, 2], encoder="lstm")
    save_prompt(model, tmp_path)
    again = load_prompt(base, tmp_path)
    assert get_prompt_state(again).positions == (0, 2, 2)
    ids = batch()
    assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


def test_explicit_arguments_are_never_silently_replaced():
    """An explicit value that cannot apply is an error naming it, not a default in its place (0 was taken as
    'unset'; a prompt's row count overrode num_virtual_tokens; init_text was ignored under init='random')."""
    with pytest.raises(ValueError, match=r"apply_prompt_tuning: num_virtual_tokens=4, but prompt has 6 rows"):
        apply_prompt_tuning(llama(), 4, prompt=torch.randn(6, 32))
    assert get_prompt_state(apply_prompt_tuning(llama(), prompt=torch.randn(6, 32))).num_virtual_tokens == 6
    with pytest.raises(ValueError, match=r"apply_prompt_tuning: init_text applies only with init='text'"):
        apply_prompt_tuning(llama(), 4, init="random", init_text="hello")
    with pytest.raises(ValueError, match=r"apply_prompt_tuning: init='text' needs init_text"):
        apply_prompt_tuning(llama(), 4, init="text")
    with pytest.raises(ValueError, match=r"PromptEncoder: encoder_hidden_size must be"):
        apply_p_tuning(llama(), 4, encoder_hidden_size=0)


def test_classifier_pooling_is_per_forward_under_concurrent_forwards():
    """DataParallel replicas share the prompt state and run their forwards in threads: each head pools its own
    forward's rows (two threads interleaved at the final norm; one took the other's rows, 0.12 off)."""
    import threading

    model = llama("LlamaForSequenceClassification", num_labels=3)
    apply_prompt_tuning(model, P)
    a, b = torch.tensor([[5, 6, 7, 8, 0]]), torch.tensor([[5, 6, 7, 0, 0]])
    with torch.no_grad():
        want = {n: model(input_ids=x, attention_mask=(x != 0).long()).logits for n, x in (("a", a), ("b", b))}
    barrier = threading.Barrier(2, timeout=60)

    def interleave(*_):
        barrier.wait()  # both forwards past their pre-hooks before either head runs

    model.model.norm.register_forward_hook(interleave)
    got = {}

    def run(name, ids):
        with torch.no_grad():
            got[name] = model(input_ids=ids, attention_mask=(ids != 0).long()).logits

    threads = [threading.Thread(target=run, args=(n, x)) for n, x in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in ("a", "b"):
        assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, name=n)


def test_classifier_pooling_without_a_pad_token_follows_the_template():
    """No pad token: the head's own token is the last one, mapped through the template (a virtual token after it
    was pooled instead)."""
    model = llama("LlamaForSequenceClassification", num_labels=3)
    model.config.pad_token_id = None
    apply_p_tuning(model, 4, positions=[0, 1, 2, 9])  # the last virtual token after the 9 tokens
    ids = batch(B=1)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        model.config.pad_token_id = 0  # (no 0 in ids: the same token, found by the pad rule)
        assert_close(model(input_ids=ids).logits, full, rtol=1e-6, atol=1e-7)
