"""Bottleneck adapter (Houlsby / Pfeiffer): ``y = [h +] s · (act(h W_downᵀ + b_down) W_upᵀ + b_up)``.

Saved for backward: h and the pre-activation z = h W_downᵀ + b_down of shape [N, m] (m is the small
bottleneck width). The post-activation act(z) is recomputed from z in the backward rather than stored, and
every activation's derivative is written out explicitly, so a fused kernel can do the same.
The adapter weights may be fp32 master weights while h is bf16/fp16: the math runs in h's dtype (activation
and its derivative in fp32 for half types), and the weight gradients come back in each weight's own dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels import _backends
from peft_kernels.ops import _validate as v

OP = "bottleneck_adapter"

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


# --------------------------------------------------------------------------------------------------
# Activations and their derivatives (elementwise, on the [N, m] pre-activation).
# --------------------------------------------------------------------------------------------------
def activation_reference(z: Tensor, activation: str) -> Tensor:
    """act(z) with the same definitions as torch.nn's modules (ReLU, GELU(), GELU("tanh"), SiLU, Tanh)."""
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "identity":
        return z
    raise ValueError(f"{OP}: unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def activation_derivative(z: Tensor, activation: str) -> Tensor:
    """act'(z), written out (not autograd) so the formulas are the ones a kernel implements."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        # d/dz [z Φ(z)] = Φ(z) + z φ(z)
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf
    if activation == "gelu_tanh":
        # 0.5 z (1 + tanh(u)), u = √(2/π)(z + c z³): 0.5(1 + t) + 0.5 z (1 - t²) u'
        t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    if activation == "silu":
        sig = torch.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))
    if activation == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    if activation == "identity":
        return torch.ones_like(z)
    raise ValueError(f"{OP}: unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def _act_math_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types: evaluate the activation (and its derivative) in fp32, as eager PyTorch's kernels do.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _apply_activation(z: Tensor, activation: str) -> Tensor:
    return activation_reference(z.to(_act_math_dtype(z.dtype)), activation).to(z.dtype)


def _sum_rows(t: Tensor) -> Tensor:
    # fp32 accumulation for half types; fp64 stays fp64.
    return t.sum(0) if t.dtype == torch.float64 else t.sum(0, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Reference math (the oracle): plain PyTorch, differentiable by autograd.
# --------------------------------------------------------------------------------------------------
def bottleneck_adapter_reference(h, W_down, b_down, W_up, b_up, activation="relu", scaling=1.0, residual=True,
                                 upcast=False):
    """Autograd-differentiable reference; ``upcast=True`` computes in float64 and returns h's dtype."""
    dtype = torch.float64 if upcast else h.dtype
    x = h.to(dtype)
    z = x @ W_down.to(dtype).t()
    if b_down is not None:
        z = z + b_down.to(dtype)
    u = activation_reference(z, activation) @ W_up.to(dtype).t()
    if b_up is not None:
        u = u + b_up.to(dtype)
    y = x + scaling * u if residual else scaling * u
    return y.to(h.dtype)


# --------------------------------------------------------------------------------------------------
# Backends: forward (h2d, ...) -> (y, z); backward -> (dh, dW_down, db_down, dW_up, db_up), None where not
# needed.
# --------------------------------------------------------------------------------------------------
def _reference_forward(h, W_down, b_down, W_up, b_up, activation, scaling, residual):
    dt = h.dtype
    Wd, Wu = W_down.to(dt), W_up.to(dt)
    z = torch.addmm(b_down.to(dt), h, Wd.t()) if b_down is not None else h @ Wd.t()
    a = _apply_activation(z, activation)
    u = torch.addmm(b_up.to(dt), a, Wu.t()) if b_up is not None else a @ Wu.t()
    y = torch.add(h, u, alpha=scaling) if residual else u.mul_(scaling)
    return y, z


def _reference_backward(dy, h, W_down, b_down, W_up, b_up, z, activation, scaling, residual, needs):
    need_dh, need_dWd, need_dbd, need_dWu, need_dbu = needs
    dt = dy.dtype
    Wd, Wu = W_down.to(dt), W_up.to(dt)
    dh = dWd = dbd = dWu = dbu = None
    if need_dWu:
        # act(z) recomputed from the saved z: [N, m] is cheap next to the [N, H] GEMMs.
        dWu = (dy.t() @ _apply_activation(z, activation)).mul_(scaling).to(W_up.dtype)
    if need_dbu:
        dbu = (_sum_rows(dy) * scaling).to(b_up.dtype)
    if need_dh or need_dWd or need_dbd:
        mdt = _act_math_dtype(dt)
        da = (dy @ Wu).to(mdt).mul_(scaling)
        dz = (da * activation_derivative(z.to(mdt), activation)).to(dt)
        if need_dh:
            dh = torch.addmm(dy, dz, Wd) if residual else dz @ Wd
        if need_dWd:
            dWd = (dz.t() @ h).to(W_down.dtype)
        if need_dbd:
            dbd = _sum_rows(dz).to(b_down.dtype)
    return dh, dWd, dbd, dWu, dbu


_FORWARD = {"reference": _reference_forward}
_BACKWARD = {"reference": _reference_backward}

# Only the reference backend for now; native and Triton kernels register here when they land.
_backends.register_op(OP, {})


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake kernels and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("peft_kernels::bottleneck_adapter", mutates_args=())
def _bottleneck_adapter_op(
    h: Tensor, W_down: Tensor, b_down: Tensor | None, W_up: Tensor, b_up: Tensor | None,
    activation: str, scaling: float, residual: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    return _FORWARD[backend](h, W_down, b_down, W_up, b_up, activation, scaling, residual)


@_bottleneck_adapter_op.register_fake
def _(h, W_down, b_down, W_up, b_up, activation, scaling, residual, backend):
    return h.new_empty(h.shape), h.new_empty(h.shape[0], W_down.shape[0])


@torch.library.custom_op("peft_kernels::bottleneck_adapter_backward", mutates_args=())
def _bottleneck_adapter_backward_op(
    dy: Tensor, h: Tensor, W_down: Tensor, b_down: Tensor | None, W_up: Tensor, b_up: Tensor | None,
    z: Tensor, activation: str, scaling: float, residual: bool, backend: str, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _BACKWARD[backend](dy, h, W_down, b_down, W_up, b_up, z, activation, scaling, residual, needs)
    # custom ops cannot return None: a gradient not asked for comes back as an empty tensor.
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


@_bottleneck_adapter_backward_op.register_fake
def _(dy, h, W_down, b_down, W_up, b_up, z, activation, scaling, residual, backend, needs):
    like = [h, W_down, b_down, W_up, b_up]
    return tuple(torch.empty_like(t) if n else dy.new_empty(0) for t, n in zip(like, needs))


def _setup_context(ctx, inputs, output):
    h, W_down, b_down, W_up, b_up, activation, scaling, residual, backend = inputs
    # The biases only for their dtypes (each gradient comes back in its parameter's dtype); they are
    # parameters, so saving them costs no memory.
    ctx.save_for_backward(h, W_down, b_down, W_up, b_up, output[1])
    ctx.activation, ctx.scaling, ctx.residual, ctx.backend = activation, scaling, residual, backend


def _backward(ctx, dy, dz):
    h, W_down, b_down, W_up, b_up, z = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2] and b_down is not None, n[3], n[4] and b_up is not None]
    if not any(needs):
        return (None,) * 9
    grads = _bottleneck_adapter_backward_op(
        dy.contiguous(), h, W_down, b_down, W_up, b_up, z, ctx.activation, ctx.scaling, ctx.residual,
        ctx.backend, needs,
    )
    dh, dWd, dbd, dWu, dbu = (g if want else None for g, want in zip(grads, needs))
    return dh, dWd, dbd, dWu, dbu, None, None, None, None


_bottleneck_adapter_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def validate(h, W_down, b_down, W_up, b_up, activation, scaling, residual) -> float:
    v.check_tensor(OP, "h", h, min_ndim=1)
    v.check_tensor(OP, "W_down", W_down, ndim=2)
    v.check_tensor(OP, "W_up", W_up, ndim=2)
    if b_down is not None:
        v.check_tensor(OP, "b_down", b_down, ndim=1)
    if b_up is not None:
        v.check_tensor(OP, "b_up", b_up, ndim=1)
    v.check_same_device(OP, h=h, W_down=W_down, b_down=b_down, W_up=W_up, b_up=b_up)
    H, m = h.shape[-1], W_down.shape[0]
    if m == 0:
        raise ValueError(
            f"{OP}: W_down has 0 rows (shape {tuple(W_down.shape)}); the bottleneck width m must be >= 1"
        )
    v.check_size(OP, "W_down", W_down, 1, H, "hidden size H = h.shape[-1]")
    v.check_size(OP, "W_up", W_up, 0, H, "hidden size H = h.shape[-1]")
    v.check_size(OP, "W_up", W_up, 1, m, "bottleneck width m = W_down.shape[0]")
    if b_down is not None:
        v.check_size(OP, "b_down", b_down, 0, m, "bottleneck width m = W_down.shape[0]")
    if b_up is not None:
        v.check_size(OP, "b_up", b_up, 0, H, "hidden size H = h.shape[-1]")
    if not isinstance(activation, str):
        raise TypeError(f"{OP}: activation must be a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if not isinstance(residual, bool):
        raise TypeError(f"{OP}: residual must be a bool, got {type(residual).__name__}")
    return v.check_finite(OP, "scaling", scaling)


def bottleneck_adapter(h: Tensor, W_down: Tensor, b_down: Tensor | None, W_up: Tensor, b_up: Tensor | None,
                       activation: str = "relu", scaling: float = 1.0, residual: bool = True) -> Tensor:
    """Fused bottleneck adapter over any leading dims of h.

    Computes ``(h if residual else 0) + scaling * (act(h W_downᵀ + b_down) W_upᵀ + b_up)``.

    Args:
        h: [..., H] hidden states (fp16/bf16/fp32/fp64).
        W_down: [m, H] down projection; b_down: [m] or None.
        W_up: [H, m] up projection; b_up: [H] or None. Weights may be fp32 master weights for half h.
        activation: one of "relu", "gelu" (exact erf), "gelu_tanh", "silu", "tanh", "identity".
        scaling: scale of the adapter branch.
        residual: add h (Houlsby/Pfeiffer place the adapter inside a residual connection).
    """
    scaling = validate(h, W_down, b_down, W_up, b_up, activation, scaling, residual)
    H = h.shape[-1]
    h2d = h.reshape(-1, H).contiguous()
    backend = _backends.select(OP, h.device.type, h2d, W_down, W_up)
    y, _ = _bottleneck_adapter_op(h2d, W_down, b_down, W_up, b_up, activation, scaling, residual, backend)
    return y.reshape(h.shape)
