"""Prompt Tuning (or P-Tuning) on a tiny Llama-style model, then generation with the KV cache.

Reuses finetune_lora.py's byte-level data and random base model. The virtual tokens go into the input embeddings
through ``peft_kernels.soft_prompt_embed`` (one fused gather, no lookup + cat); only the prompt (or, for P-Tuning,
its encoder) trains. The prompt is saved in HF peft's format.

    python examples/prompt_tuning.py --steps 100                      # Prompt Tuning, init from a text
    python examples/prompt_tuning.py --steps 100 --encoder lstm       # P-Tuning (bidirectional LSTM + MLP)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_lora import DATA, build_model, decode, encode, eval_loss, random_windows  # noqa: E402

from peft_kernels.patch import apply_p_tuning, apply_prompt_tuning, save_prompt  # noqa: E402


def byte_tokenizer(text: str) -> dict:
    return {"input_ids": encode(text).tolist()}


def train(steps=100, num_virtual_tokens=16, encoder=None, lr=3e-2, batch_size=16, seq_len=128, device="cpu", seed=0,
          progress=True):
    data = encode(DATA.read_text())
    model = build_model(seq_len=seq_len + num_virtual_tokens, seed=seed).to(device)
    if encoder is None:
        model = apply_prompt_tuning(model, num_virtual_tokens, init_text="a short story: ", tokenizer=byte_tokenizer)
    else:
        model = apply_p_tuning(model, num_virtual_tokens, encoder=encoder)
        lr = min(lr, 3e-3)  # the encoder's MLP trains at the usual rate
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    held_out = random_windows(data, batch_size, seq_len, torch.Generator().manual_seed(seed + 1)).to(device)
    first = eval_loss(model, held_out)
    model.train()
    for _ in tqdm(range(steps), desc="prompt tuning", disable=not progress):
        batch = random_windows(data, batch_size, seq_len, gen).to(device)
        loss = model(input_ids=batch, labels=batch).loss  # labels are padded with -100 for the virtual tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, first, eval_loss(model, held_out), sum(p.numel() for p in params)


@torch.no_grad()
def generate(model, prompt: str, max_new_tokens: int = 60, device: str = "cpu") -> str:
    """Greedy decoding with the KV cache: the first step embeds the virtual tokens and the text, later steps
    only extend the attention mask and positions by the P cached virtual tokens."""
    model.eval()
    ids = encode(prompt).unsqueeze(0).to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=0)
    return decode(out[0, ids.shape[1]:].tolist())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--virtual-tokens", type=int, default=16)
    p.add_argument("--encoder", choices=["lstm", "mlp"], default=None, help="P-Tuning with this prompt encoder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="save the prompt here (HF peft format)")
    args = p.parse_args(argv)
    model, first, last, n = train(args.steps, args.virtual_tokens, args.encoder, device=args.device)
    print(f"trainable parameters: {n}; held-out loss {first:.3f} -> {last:.3f}")
    print("sample:", repr(generate(model, "yesterday anna ", device=args.device)))
    if args.out:
        save_prompt(model, args.out)
        print(f"prompt saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
