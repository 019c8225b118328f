"""Bottleneck adapter (Houlsby / Pfeiffer): ``y = [h +] s · (act(h W_downᵀ + b_down) W_upᵀ + b_up)``.

Saved for backward: h and the pre-activation z = h W_downᵀ + b_down of shape [N, m] (m is the small
bottleneck width). The post-activation act(z) is recomputed from z in the backward rather than stored, and
every activation's derivative is written out explicitly, so a fused kernel can do the same.

Two op families, defined through peft_kernels/_op.py:
- ``bottleneck_adapter``: one adapter (backends: reference, triton, cuda).
- ``bottleneck_adapter_mixed``: a batch whose rows each choose one of A stacked adapters by an id, in one fused
  kernel (triton), for training and inference; the reference loops over the adapters.
The adapter weights may be fp32 master weights while h is bf16/fp16: the math runs in h's dtype (activation
and its derivative in fp32 for half types), and the weight gradients come back in each weight's own dtype.
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

OP = "bottleneck_adapter"
OP_MIXED = "bottleneck_adapter_mixed"
MAX_FUSED_BOTTLENECK = 256  # the widest bottleneck the fused kernels keep on chip

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


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Tensor.to costs host time even when it returns self: skip it (small layers are host-bound).
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _apply_activation(z: Tensor, activation: str) -> Tensor:
    mdt = _act_math_dtype(z.dtype)
    if mdt == z.dtype:
        return activation_reference(z, activation)
    return activation_reference(z.to(mdt), activation).to(z.dtype)


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
# One adapter: the op family
# --------------------------------------------------------------------------------------------------
class AdapterInputs(NamedTuple):
    """The input record (2-D h, validated by the public function)."""

    h: Tensor
    W_down: Tensor
    b_down: Tensor | None
    W_up: Tensor
    b_up: Tensor | None
    activation: str
    scaling: float
    residual: bool


def _grads_fake(h, W_down, b_down, W_up, b_up, needs):
    like = (h, W_down, b_down, W_up, b_up)
    return tuple(torch.empty_like(t) if n and t is not None else None for t, n in zip(like, needs))


def _tune_key(inp: AdapterInputs):
    # Token counts vary from batch to batch: measure once per power-of-two bucket of N.
    n_bucket = 1 << max(0, (inp.h.shape[0] - 1).bit_length())
    grads = tuple(t is not None and t.requires_grad for t in (inp.h, inp.W_down, inp.W_up))
    return (n_bucket, inp.h.shape[1], inp.W_down.shape[0], inp.h.dtype, inp.W_down.dtype, inp.activation,
            inp.residual, inp.b_down is not None, grads)


FAMILY = OpFamily(
    OP,
    Inputs=AdapterInputs,
    schema="(Tensor h, Tensor W_down, Tensor? b_down, Tensor W_up, Tensor? b_up, str activation, float scaling, "
    "bool residual) -> (Tensor, Tensor)",
    backward_schema="(Tensor dy, Tensor h, Tensor W_down, Tensor? b_down, Tensor W_up, Tensor? b_up, Tensor z, "
    "str activation, float scaling, bool residual)",
    differentiable=("h", "W_down", "b_down", "W_up", "b_up"),
    # h and z ([N, m]) are the saved activations; the weights and biases are parameters (no memory), the
    # biases kept for their dtypes (each gradient comes back in its parameter's dtype).
    save=lambda inp, out: (inp.h, inp.W_down, inp.b_down, inp.W_up, inp.b_up, out[1], inp.activation,
                           inp.scaling, inp.residual),
    fake=lambda inp: (inp.h.new_empty(inp.h.shape), inp.h.new_empty(inp.h.shape[0], inp.W_down.shape[0])),
    backward_fake=lambda dy, h, Wd, bd, Wu, bu, z, act, s, res, needs: _grads_fake(h, Wd, bd, Wu, bu, needs),
    public_outputs=1,
    primary="h",
    preference={"cuda": ("triton", "cuda"), "cpu": ("reference",)},
    tune_key=_tune_key,  # on CUDA the fused Triton kernels and the cuBLAS-based CUDA C++ backend are timed
    autocast=("h",),
    doc="out = [h +] s · (act(h W_downᵀ + b_down) W_upᵀ + b_up)",
)


_AUTOGRAD_NODE = _backends.native_function("bottleneck_adapter_autograd")


def _reference_eager(h, W_down, b_down, W_up, b_up, activation, scaling, residual):
    """The reference forward and backward, op for op, as one C++ autograd node (csrc/adapter.cpp)."""
    return _AUTOGRAD_NODE(h, W_down, b_down, W_up, b_up, activation, scaling, residual)


@FAMILY.forward("reference", devices=("cpu", "cuda"), eager=_reference_eager if _AUTOGRAD_NODE is not None else None)
def _reference_forward(h, W_down, b_down, W_up, b_up, activation, scaling, residual):
    """Plain PyTorch: linear, activation, linear, add. In eager mode the same ATen calls run from C++ (with the
    backward below), so eager and compiled results are bit-identical."""
    dt = h.dtype
    # F.linear, not addmm on W.t(): the transpose view would be one more ATen call (and autograd node) each.
    z = F.linear(h, _as(W_down, dt), None if b_down is None else _as(b_down, dt))
    a = _apply_activation(z, activation)
    u = F.linear(a, _as(W_up, dt), None if b_up is None else _as(b_up, dt))
    if residual:
        y = h + u if scaling == 1.0 else torch.add(h, u, alpha=scaling)  # the alpha keyword costs host time
    else:
        y = u if scaling == 1.0 else u.mul_(scaling)
    return y, z


@FAMILY.backward("reference")
def _reference_backward(dy, h, W_down, b_down, W_up, b_up, z, activation, scaling, residual, needs):
    """Plain PyTorch, act(z) recomputed from the saved z."""
    need_dh, need_dWd, need_dbd, need_dWu, need_dbu = needs
    need_dbd = need_dbd and b_down is not None
    need_dbu = need_dbu and b_up is not None
    dt = dy.dtype
    Wd, Wu = _as(W_down, dt), _as(W_up, dt)
    dh = dWd = dbd = dWu = dbu = None
    if need_dWu:
        # act(z) recomputed from the saved z: [N, m] is cheap next to the [N, H] GEMMs.
        dWu = _as((dy.t() @ _apply_activation(z, activation)).mul_(scaling), W_up.dtype)
    if need_dbu:
        dbu = _as(_sum_rows(dy) * scaling, b_up.dtype)
    if need_dh or need_dWd or need_dbd:
        mdt = _act_math_dtype(dt)
        da = _as(dy @ Wu, mdt).mul_(scaling)
        if activation == "relu":  # da where z > 0, else 0: one op (the C++ node's threshold_backward, bit for bit)
            dz = _as(da.masked_fill(z <= 0, 0), dt)
        else:
            dz = _as(da * activation_derivative(_as(z, mdt), activation), dt)
        if need_dh:
            dh = torch.addmm(dy, dz, Wd) if residual else dz @ Wd
        if need_dWd:
            dWd = _as(dz.t() @ h, W_down.dtype)
        if need_dbd:
            dbd = _as(_sum_rows(dz), b_down.dtype)
    return dh, dWd, dbd, dWu, dbu


def _triton():
    from peft_kernels.triton import adapter as kernels

    return kernels


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@FAMILY.forward("triton", devices=("cuda",), dtypes=_TRITON_DTYPES)
def _triton_forward(h, W_down, b_down, W_up, b_up, activation, scaling, residual):
    """One fused kernel: z and act(z) stay on chip between the two thin GEMMs."""
    return _triton().adapter_forward(h, W_down, b_down, W_up, b_up, activation, scaling, residual)


@FAMILY.backward("triton", devices=("cuda",), dtypes=_TRITON_DTYPES)
def _triton_backward(dy, h, W_down, b_down, W_up, b_up, z, activation, scaling, residual, needs):
    """A row pass over dout (dz), a column pass over dout and h (dh and every weight/bias gradient)."""
    needs = _bias_needs(needs, b_down, b_up)
    return _triton().adapter_backward(dy.contiguous(), h, W_down, b_down, W_up, b_up, z, activation, scaling,
                                      residual, needs)


def _bias_needs(needs, b_down, b_up):
    n = list(needs)
    n[2] = n[2] and b_down is not None
    n[4] = n[4] and b_up is not None
    return n


def _why_not_fused(inp) -> str | None:
    m = inp.W_down.shape[-2]
    if m > MAX_FUSED_BOTTLENECK:
        return f"bottleneck width m = W_down.shape[-2] = {m} exceeds {MAX_FUSED_BOTTLENECK} (kept on chip)"
    if not inp.h.is_contiguous():
        return "h is not contiguous"
    return None


FAMILY.why_not("triton", both=True)(_why_not_fused)


# CUDA C++ (csrc/cuda/adapter.cu): the GEMMs on cuBLAS, each elementwise step one fused pass.
_CUDA_KERNEL_STATUS = _backends.cuda_kernel_status("bottleneck_adapter_fwd_cuda")  # probed once, at import
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}  # the order csrc/cuda/adapter.cu numbers them


@FAMILY.forward("cuda", dtypes=_TRITON_DTYPES)
def _cuda_forward(h, W_down, b_down, W_up, b_up, activation, scaling, residual):
    """cuBLAS GEMMs; activation, and bias + scale + residual, each one fused elementwise pass"""
    return torch.ops.peft_kernels.bottleneck_adapter_fwd_cuda(h, W_down, b_down, W_up, b_up, _ACT_CODE[activation],
                                                              scaling, residual)


@FAMILY.backward("cuda", dtypes=_TRITON_DTYPES)
def _cuda_backward(dy, h, W_down, b_down, W_up, b_up, z, activation, scaling, residual, needs):
    """cuBLAS GEMMs; dz and act(z) from one fused pass over z; the residual folded into the dh addmm"""
    return torch.ops.peft_kernels.bottleneck_adapter_bwd_cuda(dy, h, W_down, b_down, W_up, b_up, z,
                                                              _ACT_CODE[activation], scaling, residual,
                                                              _bias_needs(needs, b_down, b_up))


@FAMILY.why_not("cuda", both=True)
def _cuda_why_not(inp) -> str | None:
    if _CUDA_KERNEL_STATUS is not None:
        return _CUDA_KERNEL_STATUS
    return None if inp.h.is_contiguous() else "h is not contiguous"


# --------------------------------------------------------------------------------------------------
# Mixed-adapter batch: rows choose among A stacked adapters by id
# --------------------------------------------------------------------------------------------------
class MixedAdapterInputs(NamedTuple):
    """h [N, H]; W_down [A, m, H]; b_down [A, m] or None; W_up [A, H, m]; b_up [A, H] or None; adapter_ids
    (integer [N], each in [0, A)); scalings: one per adapter."""

    h: Tensor
    W_down: Tensor
    b_down: Tensor | None
    W_up: Tensor
    b_up: Tensor | None
    adapter_ids: Tensor
    activation: str
    scalings: tuple
    residual: bool


def _route(adapter_ids: Tensor, num_adapters: int):
    """(order, sorted ids, segment starts): the rows sorted (stably) by adapter id."""
    ids = adapter_ids.reshape(-1)
    sorted_ids, order = torch.sort(ids.to(torch.int32), stable=True)
    sorted_ids = sorted_ids.contiguous()
    # Segment starts by binary search (deterministic; CUDA bincount is not, and refuses deterministic mode).
    bounds = torch.arange(num_adapters + 1, dtype=torch.int32, device=ids.device)
    seg = torch.searchsorted(sorted_ids, bounds).to(torch.int32)
    return order, sorted_ids, seg


def _mixed_fake(inp):
    N, m, A = inp.h.shape[0], inp.W_down.shape[-2], inp.W_down.shape[0]
    ids = inp.adapter_ids
    return (inp.h.new_empty(inp.h.shape), inp.h.new_empty(N, m), ids.new_empty(N, dtype=torch.int64),
            ids.new_empty(N, dtype=torch.int32), ids.new_empty(A + 1, dtype=torch.int32))


MIXED_FAMILY = OpFamily(
    OP_MIXED,
    Inputs=MixedAdapterInputs,
    schema="(Tensor h, Tensor W_down, Tensor? b_down, Tensor W_up, Tensor? b_up, Tensor adapter_ids, "
    "str activation, float[] scalings, bool residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    backward_schema="(Tensor dy, Tensor h, Tensor W_down, Tensor? b_down, Tensor W_up, Tensor? b_up, Tensor z, "
    "Tensor order, Tensor sorted_ids, Tensor seg, str activation, float[] scalings, bool residual)",
    differentiable=("h", "W_down", "b_down", "W_up", "b_up"),
    # Saved: h, z [N, m] and the routing (order, sorted ids, segment starts: computed once in the forward).
    save=lambda inp, out: (inp.h, inp.W_down, inp.b_down, inp.W_up, inp.b_up, out[1], out[2], out[3], out[4],
                           inp.activation, inp.scalings, inp.residual),
    fake=_mixed_fake,
    backward_fake=lambda dy, h, Wd, bd, Wu, bu, z, o, i, s, act, sc, res, needs: _grads_fake(h, Wd, bd, Wu, bu, needs),
    public_outputs=1,
    primary="h",
    preference={"cuda": ("triton",), "cpu": ("reference",)},
    autocast=("h",),
    doc="row i: out_i = [h_i +] s_a · (act(h_i W_down[a]ᵀ + b_down[a]) W_up[a]ᵀ + b_up[a]), a = adapter_ids[i]",
)


def _per_adapter(b, a):
    return None if b is None else b[a]


@MIXED_FAMILY.forward("reference", devices=("cpu", "cuda"))
def _mixed_reference_forward(h, W_down, b_down, W_up, b_up, adapter_ids, activation, scalings, residual):
    """A loop over the adapters: gather each one's rows, run the single-adapter reference, scatter back."""
    order, sorted_ids, seg = _route(adapter_ids, W_down.shape[0])
    y = torch.empty_like(h)
    z = h.new_empty(h.shape[0], W_down.shape[-2])
    bounds = seg.tolist()
    for a in range(W_down.shape[0]):
        rows = order[bounds[a]: bounds[a + 1]]
        if rows.numel():
            ya, za = _reference_forward(h[rows], W_down[a], _per_adapter(b_down, a), W_up[a],
                                        _per_adapter(b_up, a), activation, float(scalings[a]), residual)
            y[rows], z[rows] = ya, za
    return y, z, order, sorted_ids, seg


@MIXED_FAMILY.backward("reference")
def _mixed_reference_backward(dy, h, W_down, b_down, W_up, b_up, z, order, sorted_ids, seg, activation, scalings,
                              residual, needs):
    """The same loop over the adapters."""
    needs = _bias_needs(needs, b_down, b_up)
    A = W_down.shape[0]
    like = (h, W_down, b_down, W_up, b_up)
    out = [torch.zeros_like(t) if n else None for t, n in zip(like, needs)]
    if out[0] is not None:
        out[0] = torch.empty_like(h)
    bounds = seg.tolist()
    for a in range(A):
        rows = order[bounds[a]: bounds[a + 1]]
        if not rows.numel():
            continue
        g = _reference_backward(dy[rows], h[rows], W_down[a], _per_adapter(b_down, a), W_up[a],
                                _per_adapter(b_up, a), z[rows], activation, float(scalings[a]), residual, needs)
        if g[0] is not None:
            out[0][rows] = g[0]
        for k in range(1, 5):
            if g[k] is not None:
                out[k][a] = g[k]
    return tuple(out)


def _scaling_arg(scalings, device):
    # One float when every adapter has the same scaling (no device tensor per call), else fp32 [A].
    s = [float(x) for x in scalings]
    return s[0] if all(x == s[0] for x in s) else torch.tensor(s, dtype=torch.float32, device=device)


@MIXED_FAMILY.forward("triton", devices=("cuda",), dtypes=_TRITON_DTYPES)
def _mixed_triton_forward(h, W_down, b_down, W_up, b_up, adapter_ids, activation, scalings, residual):
    """The fused single-adapter kernel over rows sorted by id; each row block loops over the ids it holds."""
    k = _triton()
    r = k.Routing(*_route(adapter_ids, W_down.shape[0]))
    y, z = k.adapter_forward(h, W_down, b_down, W_up, b_up, activation, _scaling_arg(scalings, h.device), residual,
                             routing=r)
    return y, z, r.order, r.ids, r.seg


@MIXED_FAMILY.backward("triton", devices=("cuda",), dtypes=_TRITON_DTYPES)
def _mixed_triton_backward(dy, h, W_down, b_down, W_up, b_up, z, order, sorted_ids, seg, activation, scalings,
                           residual, needs):
    """The fused backward; the column pass walks each adapter's segment of the sorted rows."""
    k = _triton()
    return k.adapter_backward(dy.contiguous(), h, W_down, b_down, W_up, b_up, z, activation,
                              _scaling_arg(scalings, h.device), residual, _bias_needs(needs, b_down, b_up),
                              routing=k.Routing(order, sorted_ids, seg))


MIXED_FAMILY.why_not("triton", both=True)(_why_not_fused)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------
def _check_activation(activation) -> None:
    if not isinstance(activation, str):
        raise TypeError(f"{OP}: activation must be a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def validate(h, W_down, b_down, W_up, b_up, activation, scaling, residual, *, op=OP, stacked=False) -> None:
    """Shapes, devices, types; raises TypeError/ValueError naming the op and the argument."""
    nd = 3 if stacked else 2
    v.check_tensor(op, "h", h, min_ndim=1)
    v.check_tensor(op, "W_down", W_down, ndim=nd)
    v.check_tensor(op, "W_up", W_up, ndim=nd)
    if b_down is not None:
        v.check_tensor(op, "b_down", b_down, ndim=nd - 1)
    if b_up is not None:
        v.check_tensor(op, "b_up", b_up, ndim=nd - 1)
    v.check_same_device(op, h=h, W_down=W_down, b_down=b_down, W_up=W_up, b_up=b_up)
    H, m = h.shape[-1], W_down.shape[-2]
    v.check_nonzero(op, "h", h, -1, "hidden size H")
    if m == 0:
        raise ValueError(f"{op}: W_down has 0 rows (shape {tuple(W_down.shape)}); the bottleneck width m must be >= 1")
    last = nd - 1
    v.check_size(op, "W_down", W_down, last, H, "hidden size H = h.shape[-1]")
    v.check_size(op, "W_up", W_up, last - 1, H, "hidden size H = h.shape[-1]")
    v.check_size(op, "W_up", W_up, last, m, "bottleneck width m = W_down.shape[-2]")
    if b_down is not None:
        v.check_size(op, "b_down", b_down, nd - 2, m, "bottleneck width m = W_down.shape[-2]")
    if b_up is not None:
        v.check_size(op, "b_up", b_up, nd - 2, H, "hidden size H = h.shape[-1]")
    if stacked:
        A = W_down.shape[0]
        for name, t in (("W_up", W_up), ("b_down", b_down), ("b_up", b_up)):
            if t is not None:
                v.check_size(op, name, t, 0, A, "number of adapters A = W_down.shape[0]")
    _check_activation(activation)
    if not isinstance(residual, bool):
        raise TypeError(f"{op}: residual must be a bool, got {type(residual).__name__}")


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
    if type(scaling) is float and -math.inf < scaling < math.inf and type(activation) is str \
            and type(residual) is bool:
        # The steady state: a signature validated before (activation and residual in it), then the backend.
        hit = FAMILY.steady_hit((activation, residual), h, W_down, b_down, W_up, b_up)
        if hit is not None:
            h2d = h if h.dim() == 2 and h.is_contiguous() else h.reshape(-1, h.shape[-1]).contiguous()
            node = hit[2]
            y = (node(h2d, W_down, b_down, W_up, b_up, activation, scaling, residual) if node is not None else
                 FAMILY.run_eager(AdapterInputs(h2d, W_down, b_down, W_up, b_up, activation, scaling, residual),
                                  hit[0], hit[1]))
            return y if h2d is h else y.reshape(h.shape)
    validate(h, W_down, b_down, W_up, b_up, activation, scaling, residual)
    scaling = v.check_finite(OP, "scaling", scaling)
    key = None if torch.compiler.is_compiling() else _key(h, W_down, b_down, W_up, b_up, activation, residual)
    if h.dim() == 2 and h.is_contiguous():
        return FAMILY.call_checked(AdapterInputs(h, W_down, b_down, W_up, b_up, activation, scaling, residual), key)
    H = h.shape[-1]
    h2d = h.reshape(-1, H).contiguous()
    y = FAMILY.call_checked(AdapterInputs(h2d, W_down, b_down, W_up, b_up, activation, scaling, residual), key)
    return y.reshape(h.shape)


def _key(h, W_down, b_down, W_up, b_up, activation, residual):
    sig = signature(h, W_down, b_down, W_up, b_up)
    return None if sig is None or type(activation) is not str or type(residual) is not bool else (
        (activation, residual), sig)


def bottleneck_adapter_mixed(h: Tensor, W_down: Tensor, b_down: Tensor | None, W_up: Tensor, b_up: Tensor | None,
                             adapter_ids: Tensor, activation: str = "relu", scalings=1.0,
                             residual: bool = True) -> Tensor:
    """Several bottleneck adapters in one batch: row i of h (over its leading dims) uses adapter
    ``adapter_ids[i]`` of the stacked weights, in one fused kernel (forward and backward).

    Args:
        h: [..., H]; adapter_ids: integer tensor with h's leading shape (one id per row), or [B] for h [B, T, H]
            (one id per sequence), each in [0, A).
        W_down: [A, m, H]; b_down: [A, m] or None; W_up: [A, H, m]; b_up: [A, H] or None.
        scalings: a float for every adapter, or a sequence of A floats.
    """
    validate(h, W_down, b_down, W_up, b_up, activation, 1.0, residual, op=OP_MIXED, stacked=True)
    A = W_down.shape[0]
    if isinstance(scalings, (int, float)):
        scalings = (float(scalings),) * A
    scalings = tuple(v.check_finite(OP_MIXED, "scalings", s) for s in scalings)
    if len(scalings) != A:
        raise ValueError(f"{OP_MIXED}: scalings has {len(scalings)} entries for A = {A} adapters")
    if not isinstance(adapter_ids, Tensor) or adapter_ids.dtype.is_floating_point or adapter_ids.is_complex() \
            or adapter_ids.dtype == torch.bool:
        raise TypeError(f"{OP_MIXED}: adapter_ids must be an integer tensor")
    if adapter_ids.device != h.device:
        raise ValueError(f"{OP_MIXED}: adapter_ids is on {adapter_ids.device}, h on {h.device}")
    lead = h.shape[:-1]
    if adapter_ids.shape != lead:
        if h.dim() >= 2 and adapter_ids.dim() == 1 and adapter_ids.shape[0] == lead[0]:
            adapter_ids = adapter_ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
        else:
            raise ValueError(f"{OP_MIXED}: adapter_ids has shape {tuple(adapter_ids.shape)}; expected h's leading "
                             f"shape {tuple(lead)} (one id per row) or [{lead[0] if lead else 1}] (one per sequence)")
    ids = adapter_ids.reshape(-1)
    if not torch.compiler.is_compiling() and ids.numel():
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync, not two
        if lo < 0 or hi >= A:
            raise ValueError(f"{OP_MIXED}: adapter_ids must lie in [0, {A}), got values in [{lo}, {hi}]")
    H = h.shape[-1]
    h2d = h.reshape(-1, H).contiguous()
    y = MIXED_FAMILY(MixedAdapterInputs(h2d, W_down, b_down, W_up, b_up, ids.contiguous(), activation, scalings,
                                        residual))
    return y.reshape(h.shape)
