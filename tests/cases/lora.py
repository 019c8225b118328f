"""lora_linear cases: odd shapes, with and without bias and dropout, fp32 master adapters on low-precision x."""

from __future__ import annotations

import torch

from peft_kernels.ops.lora import FAMILY
from tests.cases import OpCase, rand, register


def _case(name, M, K, N, r, bias=True, dropout_p=0.0, scaling=2.0, adapter_dtype=torch.float32, W_grad=False):
    def make(dtype=torch.float32):
        return FAMILY.Inputs(
            rand(M, K, dtype=dtype, grad=True),
            rand(N, K, dtype=dtype, scale=K**-0.5, grad=W_grad),
            rand(N, dtype=dtype, grad=True) if bias else None,
            rand(r, K, dtype=adapter_dtype if dtype != torch.float64 else dtype, scale=K**-0.5, grad=True),
            rand(N, r, dtype=adapter_dtype if dtype != torch.float64 else dtype, scale=r**-0.5, grad=True),
            scaling, dropout_p, torch.tensor(1234, dtype=torch.int64),
        )

    return OpCase(name, make, dtypes=(torch.float32, torch.float16))


register(
    "lora_linear",
    _case("M1_K80_N431_r8", 1, 80, 431, 8),
    _case("M123_K80_N96_r16_nobias", 123, 80, 96, 16, bias=False),
    _case("M37_K64_N48_r4_dropout", 37, 64, 48, 4, dropout_p=0.25),
    _case("M20_K40_N24_r2_trainW", 20, 40, 24, 2, W_grad=True),
)
