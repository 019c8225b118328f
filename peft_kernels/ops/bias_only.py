"""BitFit linear: ``y = x Wᵀ + b`` with W frozen and b trainable.

The backward computes dx = dy W and db = Σ_rows dy only: no dW GEMM (the frozen weight's gradient is the
expensive half of a linear layer's backward), and no saved input (dW is the only consumer of x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from peft_kernels import _backends
from peft_kernels.ops import _validate as v

OP = "bias_only_linear"


def bias_only_linear_reference(x, weight, bias, upcast=False):
    dtype = torch.float64 if upcast else x.dtype
    y = x.to(dtype) @ weight.to(dtype).t() + bias.to(dtype)
    return y.to(x.dtype)


def _reference_forward(x, weight, bias):
    return torch.addmm(bias.to(x.dtype), x, weight.t())


def _reference_backward(dy, weight, needs, db_dtype):
    dx = dy @ weight.to(dy.dtype) if needs[0] else None
    db = None
    if needs[1]:  # summed in fp32 (fp64 for fp64) and returned in the bias's own dtype (an fp32 master bias)
        db = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(db_dtype)
    return dx, db


def _native_forward(x, weight, bias):
    return torch.ops.peft_kernels.bias_only_linear_fwd(x, weight, bias)


def _native_backward(dy, weight, needs, db_dtype):
    dx, db = torch.ops.peft_kernels.bias_only_linear_bwd(dy, weight, list(needs), db_dtype)
    return (dx if needs[0] else None), (db if needs[1] else None)


_FORWARD = {"reference": _reference_forward, "cpu": _native_forward, "cuda": _native_forward}
_BACKWARD = {"reference": _reference_backward, "cpu": _native_backward, "cuda": _native_backward}

_backends.register_op(
    OP,
    {"cpu": lambda *a: None, "cuda": lambda *a: None},
    preference={"cuda": ("cuda", "reference"), "cpu": ("cpu", "reference")},
)


@torch.library.custom_op("peft_kernels::bias_only_linear", mutates_args=())
def _bias_only_linear_op(x: Tensor, weight: Tensor, bias: Tensor, backend: str) -> Tensor:
    return _FORWARD[backend](x, weight, bias)


@_bias_only_linear_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("peft_kernels::bias_only_linear_backward", mutates_args=())
def _bias_only_linear_backward_op(
    dy: Tensor, weight: Tensor, db_dtype: torch.dtype, backend: str, needs: list[bool]
) -> tuple[Tensor, Tensor]:
    dx, db = _BACKWARD[backend](dy, weight, needs, db_dtype)
    return (dx if dx is not None else dy.new_empty(0)), (db if db is not None else dy.new_empty(0))


@_bias_only_linear_backward_op.register_fake
def _(dy, weight, db_dtype, backend, needs):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if needs[0] else dy.new_empty(0)
    db = dy.new_empty(weight.shape[0], dtype=db_dtype) if needs[1] else dy.new_empty(0)
    return dx, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    if ctx.needs_input_grad[1]:
        raise NotImplementedError(
            f"{OP}: weight requires grad, but BitFit keeps it frozen; call weight.requires_grad_(False) "
            "or use a plain nn.Linear"
        )
    ctx.save_for_backward(weight)
    ctx.backend, ctx.bias_dtype = backend, bias.dtype


def _backward(ctx, dy):
    (weight,) = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2]]
    if not any(needs):
        return None, None, None, None
    dx, db = _bias_only_linear_backward_op(dy.contiguous(), weight, ctx.bias_dtype, ctx.backend, needs)
    return (dx if needs[0] else None), None, (db if needs[1] else None), None


_bias_only_linear_op.register_autograd(_backward, setup_context=_setup_context)


def bias_only_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x Wᵀ + b`` over any leading dims of x, for a frozen W (BitFit). The bias may be fp32."""
    v.check_tensor(OP, "x", x, min_ndim=1)
    v.check_tensor(OP, "weight", weight, ndim=2)
    v.check_tensor(OP, "bias", bias, ndim=1)
    v.check_same_dtype(OP, "x", x, weight=weight)
    v.check_same_device(OP, x=x, weight=weight, bias=bias)
    v.check_size(OP, "weight", weight, 1, x.shape[-1], "in_features = x.shape[-1]")
    v.check_size(OP, "bias", bias, 0, weight.shape[0], "out_features = weight.shape[0]")
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    backend = _backends.select(OP, x.device.type, x2d, weight)
    y = _bias_only_linear_op(x2d, weight, bias, backend)
    return y.reshape(*x.shape[:-1], weight.shape[0])
