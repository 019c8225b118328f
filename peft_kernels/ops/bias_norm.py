"""Bias-only norms for BitFit: LayerNorm or RMSNorm (``y = x̂ w + b``) with the weight w frozen and the bias b
trainable. The backward gives dx and db from one pass over x and dy, and never computes dw.

Saved for backward: x, w and the per-row statistics (mean and rstd, fp32; x̂ is recomputed). The math runs in
fp32 (fp64 for fp64) whatever the dtypes of x, w and b; y comes back in x's dtype and db in b's dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels import _backends
from peft_kernels._op import OpFamily, signature
from peft_kernels.ops import _validate as v

OP = "bias_only_norm"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_only_norm_reference(x, weight, bias, eps=1e-5, rms=False, upcast=False):
    """Autograd-differentiable reference over the last dim; ``upcast=True`` computes in float64."""
    dt = torch.float64 if upcast else _acc(x.dtype)
    xf = x.to(dt)
    if rms:
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        xc = xf - xf.mean(-1, keepdim=True)
        xhat = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return (xhat * weight.to(dt) + bias.to(dt)).to(x.dtype)


class BiasNormInputs(NamedTuple):
    x: Tensor  # [M, H] contiguous
    weight: Tensor  # [H], frozen
    bias: Tensor  # [H], trainable
    eps: float
    rms: bool


def _fake(inp: BiasNormInputs):
    x = inp.x
    m = x.shape[0]
    return x.new_empty(x.shape), x.new_empty((0,) if inp.rms else (m,), dtype=torch.float32), \
        x.new_empty((m,), dtype=torch.float32)


def _backward_fake(dy, x, weight, mean, rstd, rms, db_dtype, needs):
    return (x.new_empty(x.shape) if needs[0] else None,
            x.new_empty((x.shape[1],), dtype=db_dtype) if needs[1] else None)


FAMILY = OpFamily(
    OP,
    BiasNormInputs,
    schema="(Tensor x, Tensor weight, Tensor bias, float eps, bool rms) -> (Tensor, Tensor, Tensor)",
    backward_schema="(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, bool rms, ScalarType db_dtype)",
    differentiable=("x", "bias"),
    save=lambda inp, out: (inp.x, inp.weight, out[1], out[2], inp.rms, inp.bias.dtype),
    fake=_fake,
    backward_fake=_backward_fake,
    public_outputs=1,
    preference={"cuda": ("triton", "layer_norm"), "cpu": ("layer_norm",)},
    doc="y = norm(x) w + b (LayerNorm or RMSNorm), w frozen: backward dx and db in one pass, never dw",
)


# The reference's RMSNorm forward and backward, op for op, as one C++ autograd node over any leading dims
# (csrc/bias_norm.cpp; tested bit-identical): the eager host path where no fused kernel serves (CPU tensors).
_RMS_NODE = _backends.native_function("bias_rms_norm_autograd")


def _reference_eager(x, weight, bias, eps, rms):
    return _RMS_NODE(x, weight, bias, eps)


@FAMILY.forward("reference", eager=_reference_eager if _RMS_NODE is not None else None,
                eager_when=(lambda inp: inp.rms) if _RMS_NODE is not None else None)
def _reference_forward(x, weight, bias, eps, rms):
    """Plain PyTorch in fp32: the oracle and the fallback (the op order of HF's RMSNorm, so outputs match it)."""
    xf = x.to(_acc(x.dtype))
    if rms:
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        mean = xf.new_empty(0)
        xhat = xf * rstd
    else:
        var, mean = torch.var_mean(xf, -1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        xhat = (xf - mean) * rstd
        mean = mean.squeeze(-1)
    y = xhat * weight.to(xf.dtype) + bias.to(xf.dtype)
    return y.to(x.dtype), mean, rstd.squeeze(-1)


@FAMILY.backward("reference")
def _reference_backward(dy, x, weight, mean, rstd, rms, db_dtype, needs):
    dx = db = None
    if needs[0]:
        acc = _acc(x.dtype)
        xf, r = x.to(acc), rstd.to(acc)[:, None]
        xhat = xf * r if rms else (xf - mean.to(acc)[:, None]) * r
        g = dy.to(acc) * weight.to(acc)
        dx = g - xhat * (xhat * g).mean(-1, keepdim=True)
        if not rms:
            dx = dx - g.mean(-1, keepdim=True)
        dx = (dx * r).to(x.dtype)
    if needs[1]:
        db = dy.sum(0, dtype=_acc(dy.dtype)).to(db_dtype)
    return dx, db


def _layer_norm_eager(x, weight, bias, eps, rms):
    # What the two functions below are, differentiated by autograd: F.layer_norm with the weight frozen runs
    # aten::native_layer_norm and its backward with dweight masked off. Any leading dims.
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@FAMILY.forward("layer_norm", requires=None, eager=_layer_norm_eager)
def _native_forward(x, weight, bias, eps, rms):
    """PyTorch's own LayerNorm kernels (aten::native_layer_norm and its backward with dweight masked off): the
    fast path on the CPU; on CUDA its backward reads dy twice (dx, then the bias in a second kernel)."""
    y, mean, rstd = torch.native_layer_norm(x, (x.shape[1],), weight, bias, eps)
    return y, mean.reshape(-1), rstd.reshape(-1)


@FAMILY.backward("layer_norm", requires=None)
def _native_backward(dy, x, weight, mean, rstd, rms, db_dtype, needs):
    m = x.shape[0]
    bias_like = torch.empty((x.shape[1],), dtype=weight.dtype, device=x.device)
    dx, _, db = torch.ops.aten.native_layer_norm_backward(
        dy, x, [x.shape[1]], mean.reshape(m, 1), rstd.reshape(m, 1), weight, bias_like, [needs[0], False, needs[1]]
    )
    return (dx if needs[0] else None), (db.to(db_dtype) if needs[1] else None)


@FAMILY.why_not("layer_norm", both=True)
def _native_why_not(inp) -> str | None:
    if inp.rms:
        return "rms=True: PyTorch has no fused RMSNorm backward to compose with"
    if inp.weight.dtype != inp.x.dtype or inp.bias.dtype != inp.x.dtype:
        return (f"weight/bias have dtypes {inp.weight.dtype}/{inp.bias.dtype}, x {inp.x.dtype}; "
                "aten::native_layer_norm needs them equal here")
    return None


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@FAMILY.forward("triton", dtypes=_TRITON_DTYPES)
def _triton_forward(x, weight, bias, eps, rms):
    """One tile of whole rows per program; mean/rstd saved in fp32."""
    from peft_kernels.triton import bias_norm as tn

    return tn.bias_norm_forward(x, weight, bias, eps, rms)


@FAMILY.backward("triton", dtypes=_TRITON_DTYPES)
def _triton_backward(dy, x, weight, mean, rstd, rms, db_dtype, needs):
    """dx and per-program db partials from one pass over x and dy, then a fixed-order reduction."""
    from peft_kernels.triton import bias_norm as tn

    return tn.bias_norm_backward(dy.contiguous(), x, weight, mean, rstd, rms, needs[0], needs[1], db_dtype)


@FAMILY.why_not("triton", both=True)
def _triton_why_not(inp) -> str | None:
    from peft_kernels.triton import bias_norm as tn

    return tn.why_not(inp[0])


def bias_only_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, rms: bool = False) -> Tensor:
    """LayerNorm (``rms=False``) or RMSNorm (``rms=True``) over the last dim of x, then ``* weight + bias``,
    for a frozen weight and a trainable bias (BitFit).

    Args:
        x: [..., H] activations (fp16/bf16/fp32/fp64). weight, bias: [H], any float dtype (fp32 masters are
            fine); the bias's gradient comes back in its own dtype. eps: > 0, added to the variance.
    """
    if type(eps) is float and 0.0 < eps < math.inf and type(rms) is bool:
        # The steady state: a signature validated before (grad mode: the frozen-weight check), then the backend.
        hit = FAMILY.steady_hit((torch.is_grad_enabled(), rms), x, weight, bias)
        if hit is not None:
            if hit[2] is not None:  # one callable over any leading dims: F.layer_norm, or the C++ RMSNorm node
                return hit[2](x, weight, bias, eps, rms)
            x2d = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()
            y = FAMILY.run_eager(BiasNormInputs(x2d, weight, bias, eps, rms), hit[0], hit[1])
            return y if x2d is x else y.reshape(x.shape)
    validate(x, weight, bias, rms)
    eps = v.check_positive(OP, "eps", eps)
    if type(eps) is int:
        eps = float(eps)  # the steady state takes floats
    key = None if torch.compiler.is_compiling() else _key(x, weight, bias, rms)  # an eager-mode thing
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y = FAMILY.call_checked(BiasNormInputs(x2d, weight, bias, eps, rms), key)
    return y.reshape(x.shape)


def validate(x: Tensor, weight: Tensor, bias: Tensor, rms: bool) -> None:
    """Everything but eps (a float that torch.compile may trace as a symbol: checked where it is read)."""
    v.check_tensor(OP, "x", x, min_ndim=1)
    v.check_tensor(OP, "weight", weight, ndim=1)
    v.check_tensor(OP, "bias", bias, ndim=1)
    v.check_same_device(OP, x=x, weight=weight, bias=bias)
    v.check_nonzero(OP, "x", x, -1, "the normalized size")
    v.check_size(OP, "weight", weight, 0, x.shape[-1], "the normalized size x.shape[-1]")
    v.check_size(OP, "bias", bias, 0, x.shape[-1], "the normalized size x.shape[-1]")
    if not isinstance(rms, bool):
        raise TypeError(f"{OP}: rms must be a bool, got {type(rms).__name__}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{OP}: weight requires grad, but this op keeps it frozen (it never computes dw); call "
                         "weight.requires_grad_(False), or use F.layer_norm / F.rms_norm to train it")


def _key(x, weight, bias, rms):
    sig = signature(x, weight, bias)
    return None if sig is None else ((torch.is_grad_enabled(), rms), sig)
