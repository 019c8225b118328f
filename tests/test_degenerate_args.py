"""Degenerate sizes and wrong values found by fuzzing the public ops: each is a ValueError/TypeError that names
the function and the argument, never a reshape error, a ZeroDivisionError or a torch.library RuntimeError."""

from __future__ import annotations

import pytest
import torch

import peft_kernels as pk

CASES = [
    ("lora_linear K=0", lambda: pk.lora_linear(torch.randn(3, 0), torch.randn(4, 0), None, torch.randn(2, 0),
                                               torch.randn(4, 2)), ValueError, r"lora_linear: .*in_features"),
    ("lora_linear N=0", lambda: pk.lora_linear(torch.randn(3, 5), torch.randn(0, 5), None, torch.randn(2, 5),
                                               torch.randn(0, 2)), ValueError, r"lora_linear: .*out_features"),
    ("lora_linear scaling str", lambda: pk.lora_linear(torch.randn(3, 5), torch.randn(4, 5), None,
                                                       torch.randn(2, 5), torch.randn(4, 2), scaling="2"),
     TypeError, r"lora_linear: scaling"),
    ("bias_only_linear K=0", lambda: pk.bias_only_linear(torch.randn(3, 0), torch.randn(4, 0), torch.randn(4)),
     ValueError, r"bias_only_linear: .*(in_features|x|weight)"),
    ("bottleneck_adapter H=0", lambda: pk.bottleneck_adapter(torch.randn(3, 0), torch.randn(2, 0), None,
                                                            torch.randn(0, 2), None), ValueError,
     r"bottleneck_adapter: .*(hidden|h)"),
    ("bottleneck_adapter bad activation", lambda: pk.bottleneck_adapter(torch.randn(3, 4), torch.randn(2, 4), None,
                                                                       torch.randn(4, 2), None, activation="swoosh"),
     ValueError, r"bottleneck_adapter: .*activation"),
    ("prefix_attention D=0", lambda: pk.prefix_attention(*(torch.randn(1, 2, 3, 0) for _ in range(3)),
                                                         torch.randn(2, 1, 0), torch.randn(2, 1, 0)), ValueError,
     r"prefix_attention: .*(head dim|D)"),
    ("distillation_loss ignore_index 2**70", lambda: pk.distillation_loss(torch.randn(4, 5), torch.randn(4, 5),
                                                                          torch.randint(0, 5, (4,)),
                                                                          ignore_index=2**70),
     ValueError, r"distillation_loss: ignore_index"),
    ("distillation_loss temperature 0", lambda: pk.distillation_loss(torch.randn(4, 5), torch.randn(4, 5), None,
                                                                     temperature=0.0),
     ValueError, r"distillation_loss: temperature"),
    ("soft_prompt_embed id out of range", lambda: pk.soft_prompt_embed(torch.tensor([[0, 9]]), torch.randn(5, 3),
                                                                      torch.randn(2, 3)),
     ValueError, r"soft_prompt_embed: .*(input_ids|range)"),
    ("soft_prompt_embed hidden mismatch", lambda: pk.soft_prompt_embed(torch.tensor([[0, 1]]), torch.randn(5, 3),
                                                                      torch.randn(2, 4)),
     ValueError, r"soft_prompt_embed: .*prompt"),
]


@pytest.mark.parametrize("name, call, exc, match", CASES, ids=[c[0] for c in CASES])
def test_degenerate_argument_is_a_clear_error(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_meta_tensors_and_numpy_scalars_are_taken():
    """Meta tensors have no autocast state (torch.is_autocast_enabled("meta") raises): the ops' autocast step
    skips them; a numpy float is a number like a Python float."""
    import numpy as np

    meta = {"device": "meta"}
    y = pk.bias_only_linear(torch.randn(2, 8, **meta), torch.randn(5, 8, **meta), torch.randn(5, **meta))
    assert y.shape == (2, 5) and y.is_meta
    y = pk.lora_linear(torch.randn(2, 8, **meta), torch.randn(5, 8, **meta), None, torch.randn(2, 8, **meta),
                       torch.randn(5, 2, **meta), scaling=np.float32(2.0))
    assert y.shape == (2, 5)
    x, w, b = torch.randn(2, 8), torch.ones(8), torch.zeros(8)
    eps = np.float32(1e-5)
    assert torch.equal(pk.bias_only_norm(x, w, b, eps), pk.bias_only_norm(x, w, b, float(eps)))
