"""LoRA linear: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``.

Saved for backward: x (the base layer needs it anyway), S = drop(x) Aᵀ of shape [M, r], and the dropout
seed; the mask is regenerated from (seed, offset) and never stored (see ops/dropout_mask.py).
The adapter weights may be fp32 master weights while x is bf16/fp16: the math runs in x's dtype with fp32
accumulation, and dA/dB come back in the adapters' own dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels import _backends
from peft_kernels._op import OpFamily, autocast_dtype, signature
from peft_kernels.ops import _validate as v
from peft_kernels.ops._seed import as_seed_tensor, seed_value
from peft_kernels.ops.dropout_mask import dropout_keep_mask

OP = "lora_linear"


# --------------------------------------------------------------------------------------------------
# Reference math (the oracle): plain PyTorch, differentiable by autograd.
# --------------------------------------------------------------------------------------------------
def dropout_reference(x2d: Tensor, p: float, seed: int) -> Tensor:
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, x2d.device)
    return x2d * keep.to(x2d.dtype) / (1.0 - p)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling=1.0, dropout_p=0.0, seed=0, upcast=False):
    """Autograd-differentiable reference; ``upcast=True`` computes in float64 and returns x's dtype."""
    dtype = torch.float64 if upcast else x.dtype
    K = x.shape[-1]
    x2d = x.reshape(-1, K).to(dtype)
    y = x2d @ weight.to(dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    s = dropout_reference(x2d, dropout_p, seed) @ lora_A.to(dtype).t()
    y = y + scaling * (s @ lora_B.to(dtype).t())
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------------------
# The family: one input record for every backend; saved for backward: x, W, A, B, S and the seed.
# --------------------------------------------------------------------------------------------------
class LoraInputs(NamedTuple):
    x: Tensor  # [M, K], contiguous
    weight: Tensor  # [N, K]
    bias: Tensor | None  # [N]
    lora_A: Tensor  # [r, K]
    lora_B: Tensor  # [N, r]
    scaling: float
    dropout_p: float
    seed: Tensor  # int64 CPU scalar (a graph value under torch.compile: a fresh mask every step)


def _fake(inp: LoraInputs):
    x = inp.x
    return x.new_empty(x.shape[0], inp.weight.shape[0]), x.new_empty(x.shape[0], inp.lora_A.shape[0])


def _backward_fake(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, bias_dtype, needs):
    metas = [(x.shape, dy.dtype), (weight.shape, weight.dtype), ((weight.shape[0],), bias_dtype or dy.dtype),
             (lora_A.shape, lora_A.dtype), (lora_B.shape, lora_B.dtype)]
    return tuple(dy.new_empty(s, dtype=d) if n else None for (s, d), n in zip(metas, needs))


def _tune_key(inp: LoraInputs):
    # Token counts vary from batch to batch: measure once per power-of-two bucket of M.
    x, weight, bias, lora_A = inp.x, inp.weight, inp.bias, inp.lora_A
    m_bucket = 1 << max(0, (x.shape[0] - 1).bit_length())
    grads = tuple(t is not None and t.requires_grad for t in (x, weight, bias, lora_A))
    return (m_bucket, *weight.shape, lora_A.shape[0], x.dtype, lora_A.dtype, bias is not None, inp.dropout_p > 0, grads)


FAMILY = OpFamily(
    OP,
    LoraInputs,
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
    "Tensor seed) -> (Tensor, Tensor)",
    backward_schema="(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor S, float scaling, "
    "float dropout_p, Tensor seed, ScalarType? bias_dtype)",
    differentiable=("x", "weight", "bias", "lora_A", "lora_B"),
    # The bias's dtype: db comes back in it (an fp32 master bias gets an fp32 gradient, summed in fp32).
    save=lambda i, out: (i.x, i.weight, i.lora_A, i.lora_B, out[1], i.scaling, i.dropout_p, i.seed,
                         None if i.bias is None else i.bias.dtype),
    fake=_fake,
    backward_fake=_backward_fake,
    public_outputs=1,
    # CPU tensors: the C++ composite, whose eager path is one C++ autograd node, has the least host time (the
    # same GEMMs as the reference; `python -m peft_kernels.bench overhead`).
    preference={"cuda": ("triton", "aten"), "cpu": ("aten", "reference")},
    tune_key=_tune_key,
    doc="y = x W^T + b + s (drop(x) A^T) B^T",
)


@FAMILY.forward("reference")
def _reference_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """Plain PyTorch (cuBLAS / MKL GEMMs): the oracle and the fallback."""
    # As few ATen calls as the math allows: on tiny CPU tensors each one is most of the layer's time.
    A = lora_A if lora_A.dtype == x.dtype else lora_A.to(x.dtype)
    B = lora_B if lora_B.dtype == x.dtype else lora_B.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    S = F.linear(dropout_reference(x, dropout_p, seed_value(seed)) if dropout_p > 0 else x, A)
    return F.linear(x, weight, bias).addmm_(S, B.t(), alpha=scaling), S


def _bias_grad(dy: Tensor, bias_dtype) -> Tensor:
    """db = column sums of dy, accumulated in fp32 (fp64 for fp64), in the bias's own dtype."""
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.sum(0, dtype=acc).to(bias_dtype or dy.dtype)


@FAMILY.backward("reference")
def _reference_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, bias_dtype, needs):
    need_dx, need_dW, need_db, need_dA, need_dB = needs
    dt = dy.dtype
    A = lora_A if lora_A.dtype == dt else lora_A.to(dt)
    B = lora_B if lora_B.dtype == dt else lora_B.to(dt)
    dropped = dropout_reference(x, dropout_p, seed_value(seed)) if dropout_p > 0 and need_dA else x
    G = dy.mm(B).mul_(scaling) if (need_dx or need_dA) else None
    dx = dW = db = dA = dB = None
    if need_dx:
        dx = dy.mm(weight if weight.dtype == dt else weight.to(dt))
        if dropout_p > 0.0:
            keep = dropout_keep_mask(seed_value(seed), x.shape[0], x.shape[1], dropout_p, x.device)
            dx = dx + G.mm(A) * keep.to(dt) / (1.0 - dropout_p)
        else:
            dx = dx.addmm_(G, A)
    if need_dW:
        dW = dy.t().mm(x).to(weight.dtype)
    if need_db:
        db = _bias_grad(dy, bias_dtype)
    if need_dA:
        dA = G.t().mm(dropped).to(lora_A.dtype)
    if need_dB:
        dB = dy.t().mm(S).mul_(scaling).to(lora_B.dtype)
    return dx, dW, db, dA, dB


_AUTOGRAD_NODE = _backends.native_function("lora_linear_autograd")


def _aten_eager(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """The aten forward and backward as one C++ autograd node (csrc/lora.cpp): no Python in the backward."""
    return _AUTOGRAD_NODE(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed) if dropout_p else 0)


@FAMILY.forward("aten", eager=_aten_eager if _AUTOGRAD_NODE is not None else None)
def _aten_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """C++ composing ATen GEMMs (cuBLAS/MKL) with the library's Philox dropout kernels (csrc/lora.cpp): the
    portable fallback, not a fused kernel (it is the design of the cuBLAS addmm_ anchor)."""
    return torch.ops.peft_kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                                  seed_value(seed))


@FAMILY.backward("aten")
def _aten_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, bias_dtype, needs):
    dy = dy.contiguous()
    # db here, not in C++: the C++ op returns it in dy's dtype (an fp32 master bias would get a rounded gradient).
    native_needs = [needs[0], needs[1], False, needs[3], needs[4]]
    outs = torch.ops.peft_kernels.lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed_value(seed), native_needs
    )
    dx, dW, _, dA, dB = (o if n else None for o, n in zip(outs, native_needs))
    return dx, dW, (_bias_grad(dy, bias_dtype) if needs[2] else None), dA, dB


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@FAMILY.forward("triton", dtypes=_TRITON_DTYPES)
def _triton_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """TMA persistent GEMM with the low-rank term as a second phase into its accumulator (triton/lora.py)."""
    from peft_kernels.triton import lora as tk

    with _backends.on_device(x.device):
        return tk.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed))


@FAMILY.backward("triton", dtypes=_TRITON_DTYPES)
def _triton_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, bias_dtype, needs):
    from peft_kernels.triton import lora as tk

    with _backends.on_device(dy.device):
        return tk.lora_backward(dy.contiguous(), x, weight, lora_A, lora_B, S, scaling, dropout_p,
                                seed_value(seed), *needs, db_dtype=bias_dtype)


@FAMILY.why_not("triton", both=True)
def _triton_why_not(inp: LoraInputs) -> str | None:
    from peft_kernels.triton import lora as tk

    return tk.why_not(inp.x, inp.weight, inp.lora_A, inp.lora_B)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def validate(x, weight, bias, lora_A, lora_B) -> None:
    """The tensor checks (once per signature: see ``OpFamily.cached``)."""
    v.check_tensor(OP, "x", x, min_ndim=1)
    v.check_tensor(OP, "weight", weight, ndim=2)
    v.check_tensor(OP, "lora_A", lora_A, ndim=2)
    v.check_tensor(OP, "lora_B", lora_B, ndim=2)
    if bias is not None:
        v.check_tensor(OP, "bias", bias, ndim=1)
    v.check_same_dtype(OP, "x", x, weight=weight)
    v.check_same_device(OP, x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    K, N, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    v.check_nonzero(OP, "x", x, -1, "in_features")
    v.check_nonzero(OP, "weight", weight, 0, "out_features")
    v.check_size(OP, "weight", weight, 1, K, "in_features = x.shape[-1]")
    if r == 0:
        raise ValueError(f"{OP}: lora_A has rank 0 (shape {tuple(lora_A.shape)}); r must be >= 1")
    v.check_size(OP, "lora_A", lora_A, 1, K, "in_features = x.shape[-1]")
    v.check_size(OP, "lora_B", lora_B, 0, N, "out_features = weight.shape[0]")
    v.check_size(OP, "lora_B", lora_B, 1, r, "rank r = lora_A.shape[0]")
    if bias is not None:
        v.check_size(OP, "bias", bias, 0, N, "out_features = weight.shape[0]")


def _key(x, weight, bias, lora_A, lora_B, dropout_p):
    """What validation and dispatch depend on, or None for an argument that is not a plain tensor (the full checks
    then run and raise)."""
    sig = signature(x, weight, bias, lora_A, lora_B)
    return None if sig is None else (dropout_p > 0.0, sig)


_NO_SEED = torch.zeros((), dtype=torch.int64)  # no dropout: the seed is unused (one shared tensor, no allocation)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float = 1.0, dropout_p: float = 0.0, seed=None) -> Tensor:
    """Fused LoRA linear over any leading dims of x.

    Args:
        x: [..., in_features] activations (fp16/bf16/fp32/fp64).
        weight: [out_features, in_features], x's dtype. bias: [out_features] or None.
        lora_A: [r, in_features]; lora_B: [out_features, r] (fp32 master weights or x's dtype).
        scaling: the LoRA scale s (lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout on the adapter's input, in [0, 1).
        seed: int or int tensor for the dropout mask; None draws one from torch's generator.
    """
    # The steady state (eager, no autocast, plain float scalars, a tensor signature seen before) is this block: a
    # cached lookup and the backend's call, nothing else. At small token counts this host time is the layer's step.
    if type(scaling) is float and type(dropout_p) is float and -_INF < scaling < _INF and 0.0 <= dropout_p < 1.0:
        hit = FAMILY.steady_hit(dropout_p > 0.0, x, weight, bias, lora_A, lora_B)  # as _key builds it
        if hit is not None:
            fwd, bwd, node = hit
            seed_t = as_seed_tensor(OP, seed) if dropout_p > 0.0 else _NO_SEED
            if x.dim() == 2:
                x2d = x if x.is_contiguous() else x.contiguous()
                if node is not None:
                    return node(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t)
                return FAMILY.run_eager(LoraInputs(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t),
                                        fwd, bwd)
            x2d = x.reshape(-1, x.shape[-1])
            if not x2d.is_contiguous():
                x2d = x2d.contiguous()
            y = (node(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t) if node is not None else
                 FAMILY.run_eager(LoraInputs(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t), fwd, bwd))
            return y.reshape(*x.shape[:-1], weight.shape[0])
    return _lora_linear_checked(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


_INF = float("inf")


def _lora_linear_checked(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> Tensor:
    """Every other call: autocast, scalar conversion and checks, tensor validation, dispatch (then cached)."""
    dt = autocast_dtype(x.device.type) if isinstance(x, Tensor) else None
    if dt is not None:
        # What autocast does for F.linear: activation, W and b in the autocast dtype; the adapters stay fp32
        # masters (cast inside the backends; their gradients come back fp32).
        if isinstance(weight, Tensor) and x.is_floating_point() and x.dtype != torch.float64:
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if isinstance(bias, Tensor) else bias
    scaling = v.check_finite(OP, "scaling", scaling)
    dropout_p = v.check_probability(OP, "dropout_p", dropout_p)
    key = None if torch.compiler.is_compiling() else _key(x, weight, bias, lora_A, lora_B, dropout_p)
    hit = FAMILY.cached(key)
    if hit is None:
        validate(x, weight, bias, lora_A, lora_B)
    seed_t = as_seed_tensor(OP, seed) if dropout_p > 0 else _NO_SEED
    # Views cost an autograd node each on a tensor that needs a gradient: only where there are leading dims.
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    inputs = LoraInputs(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t)
    if hit is None:
        hit = FAMILY.remember(key, inputs)
    y = FAMILY.run(inputs, hit[0], hit[1])
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])
