"""Bottleneck adapters on a BERT classifier: train two task adapters, serve both in one mixed batch, save, load.

    python examples/adapters.py                       # a tiny random-init BERT on CPU, a few seconds per adapter
    python examples/adapters.py --model bert-base-uncased --steps 200 --device cuda   # a real checkpoint

Each task here is a toy rule over the token ids (label = first token mod 3, or last token mod 3), learnable from
the [CLS] position through the adapters alone. The base model stays frozen; one classifier head is trained with
the first adapter and frozen for the second, so the second adapter alone adapts the features to the shared head
(and the mixed batch needs only one head).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers as tf

import peft_kernels as pk
from peft_kernels.nn import AdapterConfig


def build_model(name: str | None, device: str) -> torch.nn.Module:
    if name:
        return tf.AutoModelForSequenceClassification.from_pretrained(name, num_labels=3).to(device)
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return tf.BertForSequenceClassification(cfg).to(device)


def task_batch(task: int, n: int, vocab: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, vocab, (n, 12), generator=g)
    labels = (x[:, 0] if task == 0 else x[:, 1]) % 3
    return x.to(device), labels.to(device)


def train(model, task: int, steps: int, lr: float, device: str) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    vocab = model.config.vocab_size
    x, y = task_batch(task, 32, vocab, device, seed=task)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a transformers checkpoint (default: a tiny random BERT)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    model = build_model(args.model, args.device)
    head = "classifier"
    # Task 0: Houlsby adapters (after attention and FFN, swish); the head trains with them.
    pk.apply_adapters(model, AdapterConfig.houlsby(reduction_factor=4), "first_token", modules_to_train=[head])
    loss0 = train(model, 0, args.steps, args.lr, args.device)
    # Task 1: a second adapter with the same shape, so one batch can route rows between the two; head frozen.
    pk.add_bottleneck_adapter(model, "second_token", AdapterConfig.houlsby(reduction_factor=4))
    for p in getattr(model, head).parameters():
        p.requires_grad_(False)
    pk.set_active_adapters(model, "second_token")
    loss1 = train(model, 1, args.steps, args.lr, args.device)
    print(f"first_token:  loss {loss0[0]:.3f} -> {loss0[-1]:.3f}")
    print(f"second_token: loss {loss1[0]:.3f} -> {loss1[-1]:.3f}")

    # Serve both tasks in one batch: row b uses adapter ids[b], in the same fused kernel.
    model.eval()
    vocab = model.config.vocab_size
    x0, y0 = task_batch(0, 32, vocab, args.device, seed=0)
    x1, y1 = task_batch(1, 32, vocab, args.device, seed=1)
    x, y = torch.cat([x0, x1]), torch.cat([y0, y1])
    ids = torch.cat([torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long)]).to(args.device)
    with torch.no_grad(), pk.adapter_routing(model, ["first_token", "second_token"], ids):
        acc = (model(input_ids=x).logits.argmax(-1) == y).float().mean().item()
    print(f"mixed batch accuracy (each row with its own adapter): {acc:.2f}")

    # Save both adapters and load one into a fresh model.
    with tempfile.TemporaryDirectory() as d:
        pk.save_adapters(model, d)
        fresh = build_model(args.model, args.device)
        fresh.load_state_dict(model.state_dict(), strict=False)  # same base and head (a real run: from_pretrained)
        pk.load_adapters(fresh, f"{d}/first_token")
        with torch.no_grad():
            same = torch.allclose(fresh(input_ids=x0).logits, _logits(model, "first_token", x0))
    print(f"reloaded adapter gives the same logits: {same}")
    return {"loss_first": loss0, "loss_second": loss1, "mixed_accuracy": acc, "reload_same": same}


def _logits(model, name: str, x: torch.Tensor) -> torch.Tensor:
    pk.set_active_adapters(model, name)
    return model(input_ids=x).logits


if __name__ == "__main__":
    main()
