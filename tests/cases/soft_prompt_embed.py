"""soft_prompt_embed cases: ids at the vocabulary's edges, P = 1 and 32, B = 1 and odd, shared and per-example
prompts, template positions (shared and per example), an fp32 master prompt beside half embeddings."""

from __future__ import annotations

import torch

from peft_kernels.ops.prompt import FAMILY, prompt_maps
from tests.cases import OpCase, rand, register


def make_ids(B: int, S: int, V: int, dtype=torch.int64) -> torch.Tensor:
    ids = torch.randint(0, V, (B, S), dtype=dtype)
    flat = ids.view(-1)
    flat[0], flat[-1] = 0, V - 1  # both edges of the vocabulary
    if flat.numel() > 2:
        flat[1] = V - 1
    return ids


def _case(name, B, S, V, H, P, batched=False, positions=None, prompt_dtype=None, id_dtype=torch.int64,
          train_weight=False):
    def make(dtype=torch.float32):
        pdt = dtype if prompt_dtype is None or dtype == torch.float64 else prompt_dtype
        ids = make_ids(B, S, V, id_dtype)
        weight = rand(V, H, dtype=dtype, grad=train_weight)
        prompt = rand(*((B,) if batched else ()), P, H, dtype=pdt, grad=True)
        slots = vpos = None
        if positions is not None:
            slots, vpos = prompt_maps(torch.as_tensor(positions), S, P)
        return FAMILY.Inputs(ids, weight, prompt, slots, vpos)

    return OpCase(name, make, dtypes=(torch.float32, torch.float16))


register(
    "soft_prompt_embed",
    _case("B1_S1_P1", 1, 1, 7, 5, 1),
    _case("B3_S37_P32_H40", 3, 37, 101, 40, 32),
    _case("B5_S9_P3_batched", 5, 9, 50, 24, 3, batched=True),
    _case("B3_S11_P4_template", 3, 11, 30, 17, 4, positions=[0, 3, 3, 11]),
    _case("B3_S8_P3_template_per_example_batched", 3, 8, 30, 16, 3, batched=True,
          positions=[[0, 0, 0], [2, 5, 8], [8, 8, 8]]),
    _case("B3_S13_P5_fp32prompt_int32ids", 3, 13, 64, 33, 5, prompt_dtype=torch.float32, id_dtype=torch.int32),
    _case("B3_S10_P4_template_trainable_vocab", 3, 10, 12, 8, 4, positions=[1, 2, 9, 10], train_weight=True),
)
