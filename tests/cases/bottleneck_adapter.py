"""bottleneck_adapter / bottleneck_adapter_mixed cases: odd sizes (N = 1, 123; H = 80, 431; bottleneck
1, 8, 64), fp32 master weights, no biases, no residual, frozen h; mixed batches with an unused adapter."""

from __future__ import annotations

import torch

from peft_kernels.ops.adapter import FAMILY, MIXED_FAMILY
from tests.cases import OpCase, rand, register


def _case(name, N, H, m, activation="relu", residual=True, bias=True, wdtype=None, h_grad=True, scaling=0.7):
    def make(dtype=torch.float32):
        wdt = dtype if wdtype is None or dtype == torch.float64 else wdtype
        return FAMILY.Inputs(
            rand(N, H, dtype=dtype, grad=h_grad),
            rand(m, H, dtype=wdt, scale=H**-0.5, grad=True),
            rand(m, dtype=wdt, scale=0.5, grad=True) if bias else None,
            rand(H, m, dtype=wdt, scale=m**-0.5, grad=True),
            rand(H, dtype=wdt, scale=0.5, grad=True) if bias else None,
            activation, scaling, residual,
        )

    return OpCase(name, make, dtypes=(torch.float32, torch.float16))


def _mixed(name, N, H, m, A, activation="silu", scalings=None):
    def make(dtype=torch.float32):
        ids = torch.randint(0, A - 1, (N,))  # adapter A - 1 unused: zero gradients
        return MIXED_FAMILY.Inputs(
            rand(N, H, dtype=dtype, grad=True),
            rand(A, m, H, dtype=dtype, scale=H**-0.5, grad=True),
            rand(A, m, dtype=dtype, scale=0.5, grad=True),
            rand(A, H, m, dtype=dtype, scale=m**-0.5, grad=True),
            rand(A, H, dtype=dtype, scale=0.5, grad=True),
            ids, activation, tuple(scalings or (1.0,) * A), True,
        )

    return OpCase(name, make, dtypes=(torch.float32, torch.float16))


register(
    "bottleneck_adapter",
    _case("N1_H80_m8", 1, 80, 8),
    _case("N123_H431_m64_gelu", 123, 431, 64, activation="gelu"),
    _case("N123_H80_m1_silu_fp32w", 123, 80, 1, activation="silu", wdtype=torch.float32),
    _case("N123_H80_m8_tanh_nores_nobias", 123, 80, 8, activation="tanh", residual=False, bias=False),
    _case("N37_H80_m8_frozen_h", 37, 80, 8, activation="gelu_tanh", h_grad=False),
)
register(
    "bottleneck_adapter_mixed",
    _mixed("N57_H80_m8_A3", 57, 80, 8, 3, scalings=(0.5, 2.0, 1.0)),
    _mixed("N1_H80_m8_A2", 1, 80, 8, 2),
)
