"""bias_only_norm cases: LayerNorm and RMSNorm, odd row counts and widths, fp32 master weight and bias."""

from __future__ import annotations

import torch

from peft_kernels.ops.bias_norm import FAMILY
from tests.cases import OpCase, rand, register


def _case(name, M, H, rms, param_dtype=None, x_grad=True):
    def make(dtype=torch.float32):
        pdt = dtype if param_dtype is None or dtype == torch.float64 else param_dtype
        w = (1.0 + 0.3 * torch.randn(H)).to(pdt)  # around 1, as a trained norm weight is
        return FAMILY.Inputs(rand(M, H, dtype=dtype, scale=2.0, grad=x_grad), w, rand(H, dtype=pdt, grad=True),
                             1e-5, rms)

    return OpCase(name, make, dtypes=(torch.float32, torch.float16))


register(
    "bias_only_norm",
    _case("layer_M1_H80", 1, 80, False),
    _case("layer_M123_H431", 123, 431, False),
    _case("rms_M123_H80", 123, 80, True),
    _case("rms_M37_H431_fp32params", 37, 431, True, param_dtype=torch.float32),
    _case("layer_M37_H80_dbonly", 37, 80, False, x_grad=False),
)
