"""bias_only_linear cases: odd shapes (M = 1, 123; K, N = 80, 431), an fp32 master bias."""

from __future__ import annotations

import torch

from peft_kernels.ops.bias_only import FAMILY
from tests.cases import OpCase, rand, register


def _case(name, M, K, N, bias_dtype=None, x_grad=True):
    def make(dtype=torch.float32):
        bdt = dtype if bias_dtype is None or dtype == torch.float64 else bias_dtype
        return FAMILY.Inputs(
            rand(M, K, dtype=dtype, grad=x_grad),
            rand(N, K, dtype=dtype, scale=K**-0.5),  # frozen: BitFit never trains W
            rand(N, dtype=bdt, grad=True),
        )

    return OpCase(name, make, dtypes=(torch.float32, torch.float16))


register(
    "bias_only_linear",
    _case("M1_K80_N431", 1, 80, 431),
    _case("M123_K431_N80", 123, 431, 80),
    _case("M123_K80_N80_fp32bias", 123, 80, 80, bias_dtype=torch.float32),
    _case("M123_K80_N431_dbonly", 123, 80, 431, x_grad=False),
)
