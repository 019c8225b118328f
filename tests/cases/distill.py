"""distillation_loss and fused_linear_distillation_loss cases: odd vocabularies, ignored rows, every divergence and
reduction, a kd_mask, with and without labels; the fused-linear variant with a bias, a LoRA head, teacher logits."""

from __future__ import annotations

import torch

from peft_kernels.ops.distill import FAMILY
from peft_kernels.ops.distill_linear import FAMILY as LINEAR
from tests.cases import OpCase, rand, register


def _labels(N, V, n_ignored, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return labels


def _case(name, N, V, *, labels=True, kd_mask=False, T=2.0, alpha=0.5, reduction="mean", divergence="forward_kl",
          beta=0.5):
    def make(dtype=torch.float32):
        g = torch.Generator().manual_seed(N * V)
        return FAMILY.Inputs(
            rand(N, V, dtype=dtype, scale=3.0, grad=True), rand(N, V, dtype=dtype, scale=3.0),
            _labels(N, V, N // 4, V) if labels else None,
            (torch.rand(N, generator=g) < 0.7) if kd_mask else None,
            T, alpha, -100, reduction, divergence, beta, True, False,
        )

    return OpCase(name, make, dtypes=(torch.float32, torch.float16))


register(
    "distillation_loss",
    _case("N7_V37_mean", 7, 37),
    _case("N5_V300_sum_T1", 5, 300, reduction="sum", T=1.0, alpha=0.3),
    _case("N6_V53_none_reverse", 6, 53, reduction="none", divergence="reverse_kl"),
    _case("N4_V61_jsd_kdmask", 4, 61, divergence="jsd", beta=0.3, kd_mask=True),
    _case("N9_V40_nolabels", 9, 40, labels=False),
)


def _linear_case(name, N, H, V, *, bias=False, lora=False, teacher_logits=False, train_W=True, chunk=4):
    def make(dtype=torch.float32):
        Ht = H + 3
        A = rand(3, H, dtype=dtype, scale=H**-0.5, grad=True) if lora else None
        B = rand(V, 3, dtype=dtype, scale=0.5, grad=True) if lora else None
        th, tW = rand(N, Ht, dtype=dtype), rand(V, Ht, dtype=dtype, scale=Ht**-0.5)
        grads = (True, train_W, bias, lora, lora)
        return LINEAR.Inputs(
            rand(N, H, dtype=dtype, grad=True), rand(V, H, dtype=dtype, scale=H**-0.5, grad=train_W),
            rand(V, dtype=dtype, grad=True) if bias else None, A, B,
            None if teacher_logits else th, None if teacher_logits else tW, None,
            (th @ tW.t()).detach() if teacher_logits else None,
            _labels(N, V, 3, V), None, 0.5, 2.0, 0.4, -100, "mean", "forward_kl", 0.5, chunk,
            sum(1 << i for i, on in enumerate(grads) if on),
        )

    return OpCase(name, make, dtypes=(torch.float32, torch.float16))


register(
    "fused_linear_distillation_loss",
    _linear_case("N11_H16_V45", 11, 16, 45),
    _linear_case("N13_H8_V33_bias_lora_frozenW", 13, 8, 33, bias=True, lora=True, train_W=False, chunk=5),
    _linear_case("N9_H12_V29_teacher_logits", 9, 12, 29, teacher_logits=True, chunk=16),
)
