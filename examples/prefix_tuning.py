"""Prefix-Tuning (or P-Tuning v2) on a tiny Llama-style model, then generation with the KV cache.

Reuses finetune_lora.py's byte-level data and random base model. Every attention layer runs
``peft_kernels.prefix_attention`` (the prefix keys/values are never concatenated to the real ones); only the
prefix encoder trains.

    python examples/prefix_tuning.py --steps 100              # P-Tuning v2 style: --no-projection
    python examples/prefix_tuning.py --positions peft --out prefix/ --peft-format   # readable by peft

``--positions peft`` puts the real tokens at positions P..P+L-1 as HF peft does (its prefix sits in the KV
cache); ``--peft-format`` saves ``adapter_config.json`` + ``adapter_model.safetensors`` for
``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_lora import DATA, build_model, decode, encode, eval_loss, random_windows  # noqa: E402

from peft_kernels.patch import apply_prefix_tuning, save_prefix  # noqa: E402


def train(steps=100, num_virtual_tokens=16, projection=True, lr=3e-3, batch_size=16, seq_len=128, device="cpu",
          seed=0, progress=True, positions="model"):
    data = encode(DATA.read_text())
    model = build_model(seq_len=seq_len, seed=seed).to(device)
    model = apply_prefix_tuning(model, num_virtual_tokens=num_virtual_tokens, projection=projection,
                                positions=positions)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    held_out = random_windows(data, batch_size, seq_len, torch.Generator().manual_seed(seed + 1)).to(device)
    first = eval_loss(model, held_out)
    model.train()
    for _ in tqdm(range(steps), desc="prefix tuning", disable=not progress):
        batch = random_windows(data, batch_size, seq_len, gen).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, first, eval_loss(model, held_out), sum(p.numel() for p in params)


@torch.no_grad()
def generate(model, prompt: str, max_new_tokens: int = 60, device: str = "cpu") -> str:
    """Greedy decoding through model.generate with the KV cache: the cache holds only the real tokens, and
    each step's single query attends to the prefix plus the cache."""
    model.eval()
    ids = encode(prompt).unsqueeze(0).to(device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return decode(out[0, ids.shape[1]:].tolist())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--virtual-tokens", type=int, default=16)
    p.add_argument("--no-projection", action="store_true", help="P-Tuning v2 deep prompts (no MLP)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--positions", choices=("model", "peft"), default="model",
                   help="positions of the real tokens: the model's own, or HF peft's (shifted by the prefix length)")
    p.add_argument("--out", default=None, help="save the prefix here (save_prefix)")
    p.add_argument("--peft-format", action="store_true", help="save in HF peft's adapter format")
    args = p.parse_args(argv)
    model, first, last, n = train(args.steps, args.virtual_tokens, not args.no_projection, device=args.device,
                                  positions=args.positions)
    print(f"trainable parameters: {n}; held-out loss {first:.3f} -> {last:.3f}")
    print("sample:", repr(generate(model, "yesterday anna ", device=args.device)))
    if args.out:
        save_prefix(model, args.out, format="peft" if args.peft_format else "peft_kernels")
        print(f"prefix saved to {args.out}" + (" (peft format)" if args.peft_format else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
