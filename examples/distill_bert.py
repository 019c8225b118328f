"""Distil a tiny BERT teacher into a half-depth student, DistilBERT style (runs in well under a minute on a CPU).

1. A 4-layer BERT teacher, built from a config, is trained briefly with masked-language modelling on the shipped
   corpus (examples/data/tiny_corpus.txt, word-level vocabulary: no tokenizer download).
2. The student takes every other teacher layer (peft_kernels.distill.student_from_teacher).
3. The student is trained with DistilBERT's triple loss -- 5 x soft targets (T = 2) + 2 x MLM + 1 x hidden-state
   cosine -- through ``DistillationTrainer`` (a transformers.Trainer); the output heads run inside the fused,
   chunked distillation loss, so neither model's full logits are ever held.
4. Reports the held-out MLM loss of the teacher, of the student before and after distillation, and their sizes.

    python examples/distill_bert.py [--teacher-steps 300] [--student-steps 100]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
import transformers

from peft_kernels.distill import DistillationTrainer, student_from_teacher

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


def build_data(seq_len: int):
    lines = [ln.strip().lower() for ln in CORPUS.read_text().splitlines() if ln.strip()]
    words = [re.findall(r"[a-z]+|[^\sa-z]", ln) for ln in lines]
    vocab = SPECIALS + sorted({w for ws in words for w in ws})
    index = {w: i for i, w in enumerate(vocab)}
    rows = []
    for ws in words:
        ids = [CLS] + [index.get(w, UNK) for w in ws][: seq_len - 2] + [SEP]
        rows.append(ids + [PAD] * (seq_len - len(ids)))
    ids = torch.tensor(rows)
    return ids, (ids != PAD).long(), len(vocab)


def mask_tokens(ids: torch.Tensor, vocab_size: int, generator: torch.Generator, p: float = 0.15):
    """BERT's masking: 15% of the real tokens are predicted; of those 80% [MASK], 10% random, 10% kept."""
    special = ids < len(SPECIALS)
    pick = (torch.rand(ids.shape, generator=generator) < p) & ~special
    labels = torch.where(pick, ids, -100)
    roll = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(pick & (roll < 0.8), MASK, ids)
    random_ids = torch.randint(len(SPECIALS), vocab_size, ids.shape, generator=generator)
    inputs = torch.where(pick & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, labels


class MaskingCollator:
    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size, self.generator = vocab_size, torch.Generator().manual_seed(seed)

    def __call__(self, rows):
        ids = torch.stack([r["input_ids"] for r in rows])
        attn = torch.stack([r["attention_mask"] for r in rows])
        inputs, labels = mask_tokens(ids, self.vocab_size, self.generator)
        return {"input_ids": inputs, "attention_mask": attn, "labels": labels}


@torch.no_grad()
def mlm_loss(model, batch) -> float:
    model.eval()
    out = model(**batch)
    return out.loss.item()


def size(model) -> tuple[int, float]:
    n = sum(p.numel() for p in model.parameters())
    return n, sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default="/tmp/peft_kernels_distill_bert")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # matrices this small: more threads cost more in synchronisation than they save
    t0 = time.perf_counter()

    ids, attn, vocab_size = build_data(args.seq_len)
    n_eval = 64
    train_ids, train_attn = ids[n_eval:], attn[n_eval:]
    eval_inputs, eval_labels = mask_tokens(ids[:n_eval], vocab_size, torch.Generator().manual_seed(123))
    eval_batch = {"input_ids": eval_inputs, "attention_mask": attn[:n_eval], "labels": eval_labels}

    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=args.seq_len,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = transformers.BertForMaskedLM(config)

    # 1. The teacher: a brief MLM training run (plain loop).
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    collate = MaskingCollator(vocab_size, seed=1)
    teacher.train()
    for _ in range(args.teacher_steps):
        pick = torch.randint(0, len(train_ids), (args.batch_size,))
        batch = collate([{"input_ids": train_ids[i], "attention_mask": train_attn[i]} for i in pick.tolist()])
        loss = teacher(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    teacher_loss = mlm_loss(teacher, eval_batch)

    # 2. The student: every other teacher layer.
    student = student_from_teacher(teacher)
    student_init_loss = mlm_loss(student, eval_batch)

    # 3. Distillation through the HF Trainer.
    dataset = [{"input_ids": i, "attention_mask": a} for i, a in zip(train_ids, train_attn)]
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.student_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=2e-3, lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=25,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args, train_dataset=dataset,
                                  data_collator=MaskingCollator(vocab_size, seed=2), temperature=2.0,
                                  weights=(5.0, 2.0, 1.0), task="mlm")
    trainer.train()
    student_loss = mlm_loss(student, eval_batch)
    last = trainer.last_losses

    (tn, tmb), (sn, smb) = size(teacher), size(student)
    print(f"vocabulary {vocab_size} words, {len(train_ids)} training / {n_eval} held-out sentences")
    print(f"teacher  : {config.num_hidden_layers} layers, {tn:,} parameters ({tmb:.2f} MiB), held-out MLM loss "
          f"{teacher_loss:.3f}")
    print(f"student  : {student.config.num_hidden_layers} layers, {sn:,} parameters ({smb:.2f} MiB, "
          f"{sn / tn:.0%} of the teacher), held-out MLM loss {student_init_loss:.3f} at initialisation -> "
          f"{student_loss:.3f} after distillation")
    print(f"last batch: triple loss {last.loss.item():.3f} (5 x soft + 2 x MLM = {last.distill.item():.3f}, "
          f"cosine {last.cosine.item():.3f})")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
