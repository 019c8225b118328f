"""BitFit: train only the biases of a BERT classifier (and of a Llama, with added zero biases); save, load, remove.

    python examples/bitfit.py                      # tiny random-init models on CPU, a few seconds
    python examples/bitfit.py --model bert-base-uncased --steps 200 --device cuda   # a real checkpoint

The task is a toy rule over the token ids (label = whether the second token is in the lower half of the
vocabulary). The random-init model uses a wide initialisation (std 0.5) so that its frozen features depend on the
input, as a pretrained model's do; BitFit then learns the rule through the biases alone.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers as tf

import peft_kernels as pk


def build_bert(name: str | None, device: str) -> torch.nn.Module:
    if name:
        return tf.AutoModelForSequenceClassification.from_pretrained(name, num_labels=2).to(device)
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.5)
    return tf.BertForSequenceClassification(cfg).to(device)


def batch(vocab: int, device: str, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, 8), generator=g)
    return x.to(device), (x[:, 1] < vocab // 2).long().to(device)


def train(model: torch.nn.Module, x, y, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a sequence-classification checkpoint (default: tiny random BERT)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    model = pk.apply_bitfit(build_bert(args.model, args.device))          # every bias trains, nothing else
    pk.print_trainable_parameters(model)
    x, y = batch(model.config.vocab_size, args.device)
    losses = train(model, x, y, args.steps, args.lr)
    print(f"BitFit loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    with tempfile.TemporaryDirectory() as d:
        pk.save_bitfit(model, d)                                             # the trained biases only
        fresh = pk.load_bitfit(build_bert(args.model, args.device), d)
        fresh.eval()
        model.eval()
        with torch.no_grad():
            same = torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)
    print(f"reloaded model gives the same logits: {same}")

    # A model without biases (Llama): add zero ones first; nothing changes until they train.
    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2)).to(args.device).eval()
    ids = torch.randint(0, 64, (2, 8), device=args.device)
    with torch.no_grad():
        before = llama(ids).logits
        pk.apply_bitfit(llama, add_missing_biases=True)
        unchanged = torch.equal(llama(ids).logits, before)
    print(f"Llama with added biases, logits unchanged before training: {unchanged}")
    pk.print_trainable_parameters(llama)
    pk.remove_bitfit(llama)
    return {"losses": losses, "reloaded_equal": same, "llama_unchanged": unchanged}


if __name__ == "__main__":
    main()
