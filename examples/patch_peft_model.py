"""Speed up an existing HF peft LoRA model in place, then save it with peft as usual.

``patch_peft_model`` swaps each peft LoRA Linear it can serve for the fused implementation, keeping the same
Parameter objects, names and state_dict keys: an optimizer built before patching keeps working, and
``save_pretrained`` / ``merge_and_unload`` are unchanged. Layers it cannot serve (DoRA, quantized bases, ...)
are left to peft and listed in the report.

    python examples/patch_peft_model.py --steps 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import peft
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_lora import DATA, build_model, encode, random_windows  # noqa: E402

from peft_kernels.patch import patch_peft_model, unpatch_peft_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    model = peft.get_peft_model(build_model().to(args.device), config)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)  # built before patching

    report = patch_peft_model(model)
    print(report)

    data, gen = encode(DATA.read_text()), torch.Generator().manual_seed(0)
    for step in range(args.steps):
        batch = random_windows(data, 8, 64, gen).to(args.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)  # peft's own format and keys, unchanged by patching
        print("saved:", sorted(q.name for q in Path(out).iterdir()))
    unpatch_peft_model(model)  # peft's own forward again
    return 0


if __name__ == "__main__":
    sys.exit(main())
