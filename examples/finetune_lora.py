"""Fine-tune a tiny Llama-style model with peft_kernels' fused LoRA on a small text corpus.

Everything is local: the model is built from a ``LlamaConfig`` with random weights (fixed seed), the tokenizer
is byte-level (token id = byte value, vocab 256), and the data is ``examples/data/tiny_corpus.txt``.
``apply_lora`` swaps every linear layer except the output head for ``peft_kernels.nn.LoRALinear`` and
freezes the rest, so only the low-rank adapters train. Even on a random-init base that lowers the loss a
lot on a small, regular corpus (the adapters learn the byte statistics and the sentence templates; see
``build_model`` for the one thing a random base needs).

    python examples/finetune_lora.py                      # about a minute on 2 CPU cores
    python examples/finetune_lora.py --steps 20 --device cpu --out /tmp/lora_adapter

The adapter is saved with ``save_lora`` in HF peft's format (adapter_config.json +
adapter_model.safetensors). To use it again, rebuild the same base (``build_model(seed=...)``: the base is
random, so the seed *is* the checkpoint) and call ``load_lora(model, path)``, which applies LoRA as the
adapter_config.json says and loads the weights.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from peft_kernels.patch import apply_lora, save_lora

DATA = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"
VOCAB = 256  # byte-level: no tokenizer files, every text encodes


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def build_model(hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2, seq_len: int = 128,
                seed: int = 0, init_std: float = 0.1) -> LlamaForCausalLM:
    """A small Llama with random weights; the same seed gives the same base model.

    ``init_std`` 0.1 rather than HF's 0.02: the 0.02 init is made for pretraining, and left frozen it makes a
    near-silent network (tiny embeddings, near-uniform attention, logits capped at a few units), on which
    LoRA only gets to the byte frequencies (loss ~2.9). At 0.1 the frozen random layers are features the
    adapters can use: the loss goes below 1 and the samples become words.
    """
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(seq_len, 256),
        initializer_range=init_std, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len`` tokens (labels = inputs; the model shifts them)."""
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def eval_loss(model, batch: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    loss = model(input_ids=batch, labels=batch).loss.item()
    model.train(was_training)
    return loss


@torch.no_grad()
def sample(model, prompt: str, max_new_tokens: int = 60, device: str = "cpu") -> str:
    """Greedy continuation (no KV cache: the model is tiny and this keeps the loop obvious)."""
    model.eval()
    ids = encode(prompt).unsqueeze(0).to(device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids[:, -model.config.max_position_embeddings:]).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decode(ids[0, len(prompt.encode("utf-8")):].tolist())


def train(steps: int = 300, r: int = 8, lora_alpha: float | None = None, lr: float = 1e-2, batch_size: int = 16,
          seq_len: int = 128, hidden: int = 128, layers: int = 2, device: str = "cpu", out: str | None = None,
          seed: int = 0, corpus: Path = DATA, progress: bool = True, log_every: int | None = None) -> dict:
    """Train LoRA adapters for ``steps`` AdamW steps; returns the losses, eval losses and the model."""
    data = encode(corpus.read_text())
    model = build_model(hidden=hidden, layers=layers, seq_len=seq_len, seed=seed).to(device)
    # "all-linear": every nn.Linear but the output head, as peft's LoraConfig means it. alpha = 2r.
    apply_lora(model, target_modules="all-linear", r=r, lora_alpha=lora_alpha or 2 * r)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.print_trainable_parameters()  # peft's line: trainable params: ... || all params: ... || trainable%: ...
    print(f"LoRA r={r}; corpus: {len(data)} bytes", flush=True)

    gen = torch.Generator().manual_seed(seed + 1)
    eval_batch = random_windows(data, 32, seq_len, torch.Generator().manual_seed(seed + 2)).to(device)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    # Linear warm-up then cosine decay: a constant high LR on the adapters makes the late loss noisy.
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    start_eval = eval_loss(model, eval_batch)
    print(f"eval loss before training: {start_eval:.3f} (uniform over {VOCAB} bytes: {math.log(VOCAB):.3f})")
    log_every = log_every or max(1, steps // 10)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="lora", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = random_windows(data, batch_size, seq_len, gen).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            bar.write(f"step {step + 1:5d}  loss {sum(recent) / len(recent):.3f}")
    bar.close()
    elapsed = time.perf_counter() - t0
    end_eval = eval_loss(model, eval_batch)
    print(f"eval loss after {steps} steps: {end_eval:.3f} (was {start_eval:.3f}); "
          f"{elapsed:.1f} s, {steps * batch_size * seq_len / elapsed:,.0f} tokens/s")
    if out is not None:
        save_lora(model, out)
        print(f"adapter saved to {out}")
    return {"losses": losses, "eval_start": start_eval, "eval_end": end_eval, "model": model}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="lora_adapter", help="where save_lora writes the adapter")
    p.add_argument("--seed", type=int, default=0, help="seed of the random base model and the data order")
    p.add_argument("--prompt", default="yesterday anna ", help="text to continue after training")
    args = p.parse_args(argv)
    result = train(steps=args.steps, r=args.r, lora_alpha=args.alpha, lr=args.lr, batch_size=args.batch_size,
                   seq_len=args.seq_len, device=args.device, out=args.out, seed=args.seed)
    print(f"sample: {args.prompt!r} -> {sample(result['model'], args.prompt, device=args.device)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
