"""BitFit linear: ``y = x Wᵀ + b`` with W frozen and b trainable.

The backward computes dx = dy W and db = Σ_rows dy only: no dW GEMM (the frozen weight's gradient is the
expensive half of a linear layer's backward), and no saved input (dW is the only consumer of x). The fused
backends read dy once for both: the Triton dx GEMM sums the dy tiles it streams (triton/bias_only.py); the
CUDA backend runs its column-sum kernel beside the cuBLAS dx GEMM (csrc/cuda/bias_only.cu). db is summed in
fp32 (fp64 for fp64) and returned in the bias's own dtype (an fp32 master bias is never rounded to bf16), in a
fixed order: it is deterministic on every backend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from peft_kernels import _backends
from peft_kernels._op import OpFamily, autocast_dtype, signature
from peft_kernels.ops import _validate as v

OP = "bias_only_linear"


def bias_only_linear_reference(x, weight, bias, upcast=False):
    """Autograd-differentiable reference; ``upcast=True`` computes in float64 and returns x's dtype."""
    dtype = torch.float64 if upcast else x.dtype
    y = x.to(dtype) @ weight.to(dtype).t() + bias.to(dtype)
    return y.to(x.dtype)


class BiasOnlyInputs(NamedTuple):
    x: Tensor  # [M, K] contiguous
    weight: Tensor  # [N, K], x's dtype, frozen
    bias: Tensor  # [N], any float dtype (an fp32 master bias under bf16 activations)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backward_fake(dy, weight, db_dtype, needs):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if needs[0] else None
    db = dy.new_empty(weight.shape[0], dtype=db_dtype) if needs[1] else None
    return dx, db


def _tune_key(inp: BiasOnlyInputs):
    x, weight, bias = inp
    m_bucket = 1 << max(0, (x.shape[0] - 1).bit_length())
    return (m_bucket, *weight.shape, x.dtype, bias.dtype, x.requires_grad, bias.requires_grad)


FAMILY = OpFamily(
    OP,
    BiasOnlyInputs,
    schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor",
    backward_schema="(Tensor dy, Tensor weight, ScalarType db_dtype)",
    differentiable=("x", "bias"),
    save=lambda inp, out: (inp.weight, inp.bias.dtype),
    fake=lambda inp: inp.x.new_empty(inp.x.shape[0], inp.weight.shape[0]),
    backward_fake=_backward_fake,
    # CPU tensors: F.linear under autograd has the least host time (what an eager nn.Linear runs); with a bias
    # in another dtype (an fp32 master bias) the C++ backend, whose db is summed and returned in fp32.
    preference={"cuda": ("triton", "cuda", "aten"), "cpu": ("linear", "aten")},
    # As autocast does for F.linear: x and W in the autocast dtype; the bias stays in its own dtype (the
    # kernels add it from the fp32 accumulator, and db comes back in it).
    autocast=("x", "weight"),
    tune_key=_tune_key,
    doc="y = x W^T + b, W frozen: backward dx = dy W, db = colsum(dy), never dW",
)


@FAMILY.forward("reference")
def _reference_forward(x, weight, bias):
    """Plain PyTorch (cuBLAS / MKL addmm): the oracle and the fallback."""
    return torch.addmm(bias.to(x.dtype), x, weight.t())


@FAMILY.forward("linear", requires=None, backward_by="reference", autograd=True, eager=torch.nn.functional.linear)
def _linear_forward(x, weight, bias):
    """F.linear differentiated by autograd in eager mode (what an eager nn.Linear with a frozen weight runs: the
    least host time), the reference backward under torch.compile. Only for a bias in x's dtype."""
    return torch.nn.functional.linear(x, weight, bias)


@FAMILY.why_not("linear")
def _linear_why_not(inp) -> str | None:
    if inp.bias.dtype != inp.x.dtype:
        return (f"bias has dtype {inp.bias.dtype}, x {inp.x.dtype}: autograd would sum db in x's dtype (a master "
                "bias must get its gradient summed and kept in its own dtype)")
    return None


@FAMILY.backward("reference")
def _reference_backward(dy, weight, db_dtype, needs):
    dx = dy @ weight.to(dy.dtype) if needs[0] else None
    db = dy.sum(0, dtype=_acc_dtype(dy.dtype)).to(db_dtype) if needs[1] else None
    return dx, db


@FAMILY.forward("aten")
def _aten_forward(x, weight, bias):
    """C++ composite (csrc/bias_only.cpp): addmm, i.e. cuBLASLt's bias epilogue on CUDA, MKL on the CPU."""
    return torch.ops.peft_kernels.bias_only_linear_fwd(x, weight, bias)


@FAMILY.backward("aten")
def _aten_backward(dy, weight, db_dtype, needs):
    """mm for dx and the library's column-sum kernel for db: two passes over dy."""
    dx, db = torch.ops.peft_kernels.bias_only_linear_bwd(dy, weight, list(needs), db_dtype)
    return (dx if needs[0] else None), (db if needs[1] else None)


@FAMILY.forward("cuda", devices=("cuda",))
def _cuda_forward(x, weight, bias):
    """The same cuBLASLt bias-epilogue GEMM as aten (csrc/bias_only.cpp); the CUDA backend's own work is in the
    backward."""
    return torch.ops.peft_kernels.bias_only_linear_fwd(x, weight, bias)


@FAMILY.backward("cuda", devices=("cuda",))
def _cuda_backward(dy, weight, db_dtype, needs):
    """csrc/cuda/bias_only.cu: the deterministic column-sum kernel on a side stream, overlapping the cuBLAS dx
    GEMM, its second stage writing db in db_dtype directly."""
    dx, db = torch.ops.peft_kernels.bias_only_linear_bwd_cuda(dy.contiguous(), weight, list(needs), db_dtype)
    return (dx if needs[0] else None), (db if needs[1] else None)


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@FAMILY.forward("triton", devices=("cuda",), dtypes=_TRITON_DTYPES)
def _triton_forward(x, weight, bias):
    """TMA persistent GEMM (pointer fallback) with the bias added to the fp32 accumulator in the epilogue."""
    from peft_kernels.triton import bias_only as tb

    with _backends.on_device(x.device):
        return tb.bias_only_forward(x, weight, bias)


@FAMILY.backward("triton", devices=("cuda",), dtypes=_TRITON_DTYPES)
def _triton_backward(dy, weight, db_dtype, needs):
    """One pass over dy: the dx GEMM's programs also sum the dy tiles they stream (per-m-tile partials, then a
    fixed-order reduction)."""
    from peft_kernels.triton import bias_only as tb

    with _backends.on_device(dy.device):
        return tb.bias_only_backward(dy.contiguous(), weight, needs[0], needs[1], db_dtype)


@FAMILY.why_not("triton", both=True)
def _triton_why_not(inp) -> str | None:
    from peft_kernels.triton import bias_only as tb

    return tb.why_not(inp[0], inp[1])


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def validate(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    v.check_tensor(OP, "x", x, min_ndim=1)
    v.check_tensor(OP, "weight", weight, ndim=2)
    v.check_tensor(OP, "bias", bias, ndim=1)
    v.check_same_dtype(OP, "x", x, weight=weight)
    v.check_same_device(OP, x=x, weight=weight, bias=bias)
    v.check_nonzero(OP, "x", x, -1, "in_features")
    v.check_nonzero(OP, "weight", weight, 0, "out_features")
    v.check_size(OP, "weight", weight, 1, x.shape[-1], "in_features = x.shape[-1]")
    v.check_size(OP, "bias", bias, 0, weight.shape[0], "out_features = weight.shape[0]")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{OP}: weight requires grad, but BitFit keeps it frozen (its backward never computes dW); call "
            "weight.requires_grad_(False), or use a plain nn.Linear / F.linear to train the weight"
        )


def bias_only_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x Wᵀ + b`` over any leading dims of x, for a frozen W (BitFit).

    Args:
        x: [..., in_features] activations (fp16/bf16/fp32/fp64).
        weight: [out_features, in_features] in x's dtype; must not require grad.
        bias: [out_features], any float dtype (e.g. an fp32 master bias for bf16 activations); its gradient
            comes back in its own dtype.
    """
    hit = FAMILY.steady_hit(torch.is_grad_enabled(), x, weight, bias)  # grad mode: the frozen-weight check
    if hit is not None:  # the steady state: a signature validated before, then the backend's call
        if hit[2] is not None:  # F.linear itself (the `linear` backend): any leading dims, any strides
            return hit[2](x, weight, bias)
        if x.dim() == 2:
            return FAMILY.run_eager(BiasOnlyInputs(x if x.is_contiguous() else x.contiguous(), weight, bias),
                                    hit[0], hit[1])
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        return FAMILY.run_eager(BiasOnlyInputs(x2d, weight, bias), hit[0], hit[1]).reshape(
            *x.shape[:-1], weight.shape[0])
    dt = autocast_dtype(x.device.type) if isinstance(x, Tensor) else None
    if dt is not None:
        # What autocast does for F.linear, before the dtype check (x and W may arrive in different dtypes).
        if x.is_floating_point() and x.dtype != torch.float64:
            x, weight = x.to(dt), weight.to(dt) if isinstance(weight, Tensor) else weight
    return _checked(x, weight, bias)


def _checked(x, weight, bias) -> Tensor:
    validate(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    key = None if torch.compiler.is_compiling() else _key(x, weight, bias)  # the key is an eager-mode thing
    y = FAMILY.call_checked(BiasOnlyInputs(x2d, weight, bias), key)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def _key(x, weight, bias):
    sig = signature(x, weight, bias)
    return None if sig is None else (torch.is_grad_enabled(), sig)  # grad mode: the frozen-weight check
