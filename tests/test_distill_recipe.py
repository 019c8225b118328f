"""The DistilBERT recipe (peft_kernels.distill): student initialisation, the triple loss, the model-level fused
loss (== unfused, with and without a LoRA head), the HF Trainer helper. Tiny random-init models from configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_kernels import distill as kd
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")


def tiny_bert(layers=4, vocab=61, hidden=32):
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg).eval()


def tiny_llama(layers=4, vocab=57, hidden=32):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def mlm_batch(vocab=61, B=3, L=10):
    ids = torch.randint(5, vocab, (B, L))
    attn = torch.ones(B, L, dtype=torch.long)
    attn[-1, 7:] = 0
    labels = torch.full((B, L), -100)
    pick = torch.rand(B, L) < 0.3
    pick[0, 1] = True
    labels[pick] = ids[pick]
    labels[attn == 0] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


# --------------------------------------------------------------------------------------------------
# student_from_teacher
# --------------------------------------------------------------------------------------------------
def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_student_takes_every_other_layer_of_bert():
    teacher = tiny_bert(layers=6)
    student = kd.student_from_teacher(teacher)
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    for i, j in enumerate([0, 2, 4]):
        assert _same(student.bert.encoder.layer[i], teacher.bert.encoder.layer[j]), f"student layer {i}"
    assert not _same(student.bert.encoder.layer[1], teacher.bert.encoder.layer[1])
    assert _same(student.bert.embeddings, teacher.bert.embeddings)
    assert _same(student.cls, teacher.cls)
    # the teacher is untouched; the copies are independent
    assert len(teacher.bert.encoder.layer) == 6 and teacher.config.num_hidden_layers == 6
    assert student.bert.encoder.layer[0].attention.self.query.weight.data_ptr() != \
        teacher.bert.encoder.layer[0].attention.self.query.weight.data_ptr()
    # the tied decoder stays tied to the student's own embeddings
    decoder, embeddings = student.cls.predictions.decoder, student.bert.embeddings.word_embeddings
    assert decoder.weight.data_ptr() == embeddings.weight.data_ptr()
    batch = mlm_batch()
    batch.pop("labels")
    assert student(**batch).logits.shape == (3, 10, 61)


def test_student_custom_layers_and_llama_layer_idx():
    teacher = tiny_llama(layers=4)
    student = kd.student_from_teacher(teacher, layers=[1, 3])
    assert len(student.model.layers) == 2 and student.config.num_hidden_layers == 2
    assert _same(student.model.layers[0], teacher.model.layers[1])
    assert _same(student.model.layers[1], teacher.model.layers[3])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = torch.randint(0, 57, (2, 6))
    out = student.generate(ids, max_new_tokens=3, do_sample=False)  # the KV cache indexes layers 0 and 1
    assert out.shape == (2, 9)


@pytest.mark.parametrize("layers", [[], [0, 9], [1, 1], [-1]])
def test_student_bad_layers(layers):
    with pytest.raises(ValueError, match="student_from_teacher: layers must"):
        kd.student_from_teacher(tiny_bert(layers=4), layers=layers)


# --------------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------------
def test_cosine_loss_matches_cosine_embedding_loss():
    s = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = torch.rand(3, 7) < 0.7
    ours = kd.hidden_cosine_loss(s, t, mask)
    m = mask.reshape(-1)
    theirs = F.cosine_embedding_loss(s.reshape(-1, 16)[m].float(), t.reshape(-1, 16)[m].float(),
                                     torch.ones(int(m.sum())))
    assert_close(ours, theirs, dtype=torch.float32)
    assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(theirs, s)[0], dtype=torch.float32)
    full = F.cosine_embedding_loss(s.reshape(-1, 16).float(), t.reshape(-1, 16).float(), torch.ones(21))
    assert_close(kd.hidden_cosine_loss(s, t), full, dtype=torch.float32)


def _distilbert_by_hand(s, t, labels, hs, ht, attn, T=2.0, w=(5.0, 2.0, 1.0)):
    """DistilBERT's distiller.py: KLDivLoss(batchmean) over the non-padding tokens · T², MLM CE, cosine."""
    V = s.shape[-1]
    keep = attn.bool().reshape(-1)
    s2, t2 = s.reshape(-1, V)[keep], t.reshape(-1, V)[keep]
    soft = F.kl_div(F.log_softmax(s2 / T, -1), F.softmax(t2 / T, -1), reduction="batchmean") * T * T
    hard = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    H = hs.shape[-1]
    cos = F.cosine_embedding_loss(hs.reshape(-1, H)[keep], ht.reshape(-1, H)[keep], torch.ones(int(keep.sum())))
    return w[0] * soft + w[1] * hard + w[2] * cos


def test_triple_loss_is_distilberts():
    B, L, V, H = 3, 8, 29, 12
    s = torch.randn(B, L, V, requires_grad=True)
    t = torch.randn(B, L, V)
    hs, ht = torch.randn(B, L, H, requires_grad=True), torch.randn(B, L, H)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, 5:] = 0
    labels = torch.where(torch.rand(B, L) < 0.4, torch.randint(0, V, (B, L)), -100)
    labels[attn == 0] = -100
    labels[0, 0] = 3
    out = kd.distillation_triple_loss(s, t, labels, hs, ht, attn, temperature=2.0)
    ref = _distilbert_by_hand(s, t, labels, hs, ht, attn)
    assert_close(out.loss, ref, name="loss")
    g = torch.autograd.grad(out.loss, s, retain_graph=True)[0]
    assert_close(g, torch.autograd.grad(ref, s, retain_graph=True)[0])
    assert_close(torch.autograd.grad(out.loss, hs)[0], torch.autograd.grad(ref, hs)[0])
    assert_close(out.cosine, kd.hidden_cosine_loss(hs, ht, attn))


def test_triple_loss_causal_shifts_labels():
    B, L, V = 2, 7, 23
    s, t = torch.randn(B, L, V, requires_grad=True), torch.randn(B, L, V)
    ids = torch.randint(0, V, (B, L))
    out = kd.distillation_triple_loss(s, t, ids, task="causal", weights=(1.0, 3.0, 0.0))
    soft = F.kl_div(F.log_softmax(s.reshape(-1, V) / 2, -1), F.log_softmax(t.reshape(-1, V) / 2, -1),
                    log_target=True, reduction="batchmean") * 4
    hard = F.cross_entropy(s[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert_close(out.loss, soft + 3.0 * hard)
    with pytest.raises(ValueError, match="task must be one of"):
        kd.distillation_triple_loss(s, t, ids, task="seq2seq")
    with pytest.raises(ValueError, match="weights must be three numbers"):
        kd.distillation_triple_loss(s, t, ids, weights=(1.0, 2.0))


# --------------------------------------------------------------------------------------------------
# Model level: fused (heads inside the chunked loss) == unfused (full logits)
# --------------------------------------------------------------------------------------------------
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", ["mlm", "causal"])
def test_fused_equals_unfused_model_loss(task):
    if task == "mlm":
        teacher = tiny_bert(layers=4)
        batch = mlm_batch()
    else:
        teacher = tiny_llama(layers=4)
        ids = torch.randint(0, 57, (3, 9))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    student = kd.student_from_teacher(teacher).double()
    teacher = teacher.double()
    results = []
    for fused in (True, False):
        student.zero_grad(set_to_none=True)
        out = kd.compute_distillation_loss(student, teacher, batch, task=task, fused=fused)
        out.loss.backward()
        results.append((out, _grads(student)))
    (f_out, f_g), (u_out, u_g) = results
    assert_close(f_out.loss, u_out.loss, name="loss")
    assert f_g.keys() == u_g.keys() and len(f_g) > 0
    for name in f_g:
        assert_close(f_g[name], u_g[name], name=name)


def test_fused_model_loss_with_lora_head():
    """A LoRA-adapted student head: its adapters get their gradients inside the chunked loss."""
    from peft_kernels.nn import LoRALinear

    teacher = tiny_llama(layers=2).double()
    student = kd.student_from_teacher(teacher)
    student.lm_head = LoRALinear.from_linear(student.lm_head, r=4, lora_alpha=8.0)
    torch.nn.init.normal_(student.lm_head.lora_B, std=0.1)  # B = 0 at init would hide a wrong dA
    student.requires_grad_(False)
    student.lm_head.lora_A.requires_grad_(True)
    student.lm_head.lora_B.requires_grad_(True)
    student.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    ids = torch.randint(0, 57, (2, 8))
    batch = {"input_ids": ids, "labels": ids}
    assert kd._head_params(student.lm_head)[2] is student.lm_head.lora_A
    results = []
    for fused in (True, False):
        student.zero_grad(set_to_none=True)
        out = kd.compute_distillation_loss(student, teacher, batch, task="causal", fused=fused, weights=(5, 2, 0))
        out.loss.backward()
        results.append((out.loss.detach(), _grads(student)))
    assert_close(results[0][0], results[1][0], name="loss")
    assert set(results[0][1]) == {"lm_head.lora_A", "lm_head.lora_B", "model.layers.0.mlp.up_proj.weight"}
    for name in results[0][1]:
        assert_close(results[0][1][name], results[1][1][name], name=name)


def test_distillation_trainer_runs_and_learns(tmp_path):
    teacher = tiny_bert(layers=2)
    student = kd.student_from_teacher(teacher)
    torch.manual_seed(1)
    batch = mlm_batch(B=8)
    dataset = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = kd.DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert trainer.last_losses is not None and torch.isfinite(trainer.last_losses.loss)
    changed = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no student parameter was updated"
    assert all(not p.requires_grad for p in teacher.parameters())


def test_example_distill_bert_runs():
    """examples/distill_bert.py end to end with a few steps: it reports both models' losses and sizes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "examples" / "distill_bert.py"), "--teacher-steps", "4",
                          "--student-steps", "3", "--batch-size", "8"], capture_output=True, text=True, timeout=600,
                         cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "teacher  : 4 layers" in out.stdout and "student  : 2 layers" in out.stdout
    assert "after distillation" in out.stdout and "MiB" in out.stdout


def test_distillation_trainer_gradient_accumulation_is_the_same_update(tmp_path):
    """The same 4 examples as one batch of 4 or as 2 x 2 / 4 x 1 accumulated: the same SGD update (it grew with
    gradient_accumulation_steps: BERT's forward takes **kwargs, so the Trainer took the loss as normalised by
    num_items_in_batch and skipped its division)."""
    import copy

    teacher = tiny_bert(layers=2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 61, (4, 10), generator=g)
    labels = torch.where(torch.arange(10) % 3 == 0, ids, -100)  # the same token count in every example
    dataset = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels[i]}
               for i in range(4)]
    updates = {}
    for ga, bs in ((1, 4), (2, 2), (4, 1)):
        student = kd.student_from_teacher(teacher)
        w0 = student.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"ga{ga}"), max_steps=1, per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
            max_grad_norm=1e9, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
        kd.DistillationTrainer(model=student, teacher_model=copy.deepcopy(teacher), args=args,
                               train_dataset=dataset).train()
        updates[ga] = student.bert.encoder.layer[0].attention.self.query.weight.detach() - w0
    assert updates[1].abs().max() > 0
    for ga in (2, 4):
        assert_close(updates[ga], updates[1], rtol=1e-4, atol=1e-6, name=f"GA={ga}")


def test_student_of_a_frozen_teacher_trains():
    teacher = tiny_bert(layers=2).requires_grad_(False)  # e.g. frozen by a DistillationTrainer before
    student = kd.student_from_teacher(teacher)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher is not modified
