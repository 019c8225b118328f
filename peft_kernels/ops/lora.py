"""LoRA linear: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``.

Saved for backward: x (the base layer needs it anyway), S = drop(x) Aᵀ of shape [M, r], and the dropout
seed; the mask is regenerated from (seed, offset) and never stored (see ops/dropout_mask.py).
The adapter weights may be fp32 master weights while x is bf16/fp16: the math runs in x's dtype with fp32
accumulation, and dA/dB come back in the adapters' own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peft_kernels import _backends
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
# Backends: forward (x2d, ...) -> (y, S); backward -> (dx, dW, db, dA, dB) with None where not needed.
# --------------------------------------------------------------------------------------------------
def _reference_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    S = dropout_reference(x, dropout_p, seed) @ A.t()
    y = torch.addmm(bias.to(x.dtype), x, weight.t()) if bias is not None else x @ weight.t()
    return y.addmm_(S, B.t(), alpha=scaling), S


def _reference_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, needs):
    need_dx, need_dW, need_db, need_dA, need_dB = needs
    A, B = lora_A.to(dy.dtype), lora_B.to(dy.dtype)
    G = (dy @ B) * scaling if (need_dx or need_dA) else None
    dx = dW = db = dA = dB = None
    if need_dx:
        dx = dy @ weight.to(dy.dtype)
        if dropout_p > 0.0:
            keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
            dx = dx + (G @ A) * keep.to(dy.dtype) / (1.0 - dropout_p)
        else:
            dx = dx.addmm_(G, A)
    if need_dW:
        dW = (dy.t() @ x).to(weight.dtype)
    if need_db:
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if dy.dtype != torch.float64 else dy.sum(0)
    if need_dA:
        dA = (G.t() @ dropout_reference(x, dropout_p, seed)).to(lora_A.dtype)
    if need_dB:
        dB = ((dy.t() @ S) * scaling).to(lora_B.dtype)
    return dx, dW, db, dA, dB


def _native_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return torch.ops.peft_kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _native_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, needs):
    outs = torch.ops.peft_kernels.lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, list(needs)
    )
    return tuple(o if n else None for o, n in zip(outs, needs))


def _triton_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    from peft_kernels.triton import lora as tk

    with _backends.on_device(x.device):
        return tk.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _triton_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, needs):
    from peft_kernels.triton import lora as tk

    with _backends.on_device(dy.device):
        return tk.lora_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, *needs)


def _native_supports(x, weight, lora_A, lora_B):
    return None


def _triton_supports(x, weight, lora_A, lora_B):
    from peft_kernels.triton import lora as tk

    if lora_B.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"lora_B has dtype {lora_B.dtype}; the Triton kernels take fp16/bf16/fp32 adapters"
    ok, reason = tk.supports(x, weight, lora_A)
    return None if ok else reason


_FORWARD = {"reference": _reference_forward, "cpu": _native_forward, "cuda": _native_forward,
            "triton": _triton_forward}
_BACKWARD = {"reference": _reference_backward, "cpu": _native_backward, "cuda": _native_backward,
             "triton": _triton_backward}

_backends.register_op(
    OP,
    {"cpu": _native_supports, "cuda": _native_supports, "triton": _triton_supports},
    preference={"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")},
)


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake kernels and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("peft_kernels::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    return _FORWARD[backend](x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed))


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("peft_kernels::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor,
    scaling: float, dropout_p: float, seed: Tensor, backend: str, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _BACKWARD[backend](dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed_value(seed), needs)
    # custom ops cannot return None: a gradient not asked for comes back as an empty tensor.
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, backend, needs):
    shapes = [(x.shape, dy.dtype), (weight.shape, weight.dtype), ((weight.shape[0],), dy.dtype),
              (lora_A.shape, lora_A.dtype), (lora_B.shape, lora_B.dtype)]
    return tuple(dy.new_empty(s, dtype=d) if n else dy.new_empty(0) for (s, d), n in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.backend, ctx.has_bias = scaling, dropout_p, backend, bias is not None


def _backward(ctx, dy, dS):
    x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2] and ctx.has_bias, n[3], n[4]]
    if not any(needs):
        return (None,) * 9
    grads = _lora_linear_backward_op(
        dy.contiguous(), x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, seed, ctx.backend, needs
    )
    dx, dW, db, dA, dB = (g if want else None for g, want in zip(grads, needs))
    return dx, dW, db, dA, dB, None, None, None, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> tuple[float, float]:
    v.check_tensor(OP, "x", x, min_ndim=1)
    v.check_tensor(OP, "weight", weight, ndim=2)
    v.check_tensor(OP, "lora_A", lora_A, ndim=2)
    v.check_tensor(OP, "lora_B", lora_B, ndim=2)
    if bias is not None:
        v.check_tensor(OP, "bias", bias, ndim=1)
    v.check_same_dtype(OP, "x", x, weight=weight)
    v.check_same_device(OP, x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    K, N, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    v.check_size(OP, "weight", weight, 1, K, "in_features = x.shape[-1]")
    if r == 0:
        raise ValueError(f"{OP}: lora_A has rank 0 (shape {tuple(lora_A.shape)}); r must be >= 1")
    v.check_size(OP, "lora_A", lora_A, 1, K, "in_features = x.shape[-1]")
    v.check_size(OP, "lora_B", lora_B, 0, N, "out_features = weight.shape[0]")
    v.check_size(OP, "lora_B", lora_B, 1, r, "rank r = lora_A.shape[0]")
    if bias is not None:
        v.check_size(OP, "bias", bias, 0, N, "out_features = weight.shape[0]")
    return v.check_finite(OP, "scaling", scaling), v.check_probability(OP, "dropout_p", dropout_p)


def _tune_key(x2d, weight, bias, lora_A, dropout_p):
    # Token counts vary from batch to batch: measure once per power-of-two bucket of M.
    m_bucket = 1 << max(0, (x2d.shape[0] - 1).bit_length())
    grads = tuple(t is not None and t.requires_grad for t in (x2d, weight, bias, lora_A))
    return (m_bucket, *weight.shape, lora_A.shape[0], x2d.dtype, lora_A.dtype, bias is not None, dropout_p > 0, grads)


def _run_once(backend, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """One forward (and backward, when anything needs a gradient) of `backend`, for measured dispatch."""
    needs = [t is not None and t.requires_grad for t in (x2d, weight, bias, lora_A, lora_B)]
    x2d, weight, lora_A, lora_B = (t.detach() for t in (x2d, weight, lora_A, lora_B))
    bias = bias.detach() if bias is not None else None
    y, S = _FORWARD[backend](x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, 0)
    if any(needs):
        _BACKWARD[backend](y, x2d, weight, lora_A, lora_B, S, scaling, dropout_p, 0, needs)


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
    scaling, dropout_p = validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    seed_t = as_seed_tensor(OP, seed) if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    K = x.shape[-1]
    x2d = x.reshape(-1, K).contiguous()
    backend = _backends.select(
        OP, x.device.type, x2d, weight, lora_A, lora_B,
        tune_key=_tune_key(x2d, weight, bias, lora_A, dropout_p),
        tune_run=lambda name: _run_once(name, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p),
    )
    y, _ = _lora_linear_op(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t, backend)
    return y.reshape(*x.shape[:-1], weight.shape[0])
