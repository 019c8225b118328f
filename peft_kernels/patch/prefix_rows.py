"""Keys and values computed straight into ``prefix_kv_buffer`` rows, so that prefix attention's ``concat`` backend
attends over ``[prefix; k]`` without a concatenation copy of k or v (the op writes the prefix into the P rows in
front of them).

For the Llama-family attentions prefix tuning patches (q/k/v projections, rotary embedding on q and k through the
modeling module's ``apply_rotary_pos_emb``, then the attention function), while a patched layer runs without a
KV cache (``use_cache=False``, as training runs), the two producers of the attention's k and v write into such a buffer:

- v: the ``v_proj`` ``nn.Linear`` (its class swapped for ``_RowsLinear``; parameters and state_dict unchanged)
  computes ``x W^T + b`` per sequence into the buffer;
- k: the modeling module's ``apply_rotary_pos_emb`` (a module global, replaced while a patched model of that type
  exists) writes the rotated keys ``k cos + rotate_half(k) sin`` into the buffer.

Both are the model's own math in the same order (the rotary part bit for bit; v_proj as one GEMM per sequence, so
within that GEMM's rounding); their backward is the model's own gradient, and they keep for it what the model's
ops keep. Anything else (a cache being decoded, autocast, torch.compile tracing, gradients for cos/sin, another
signature) runs the model's code untouched. On CPU tensors only with PEFT_KERNELS_PREFIX_ROWS=1.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peft_kernels import _config
from peft_kernels.ops.prefix_kv_buffer import is_dense, prefix_kv_buffer

_ACTIVE = threading.local()  # .rows: P while a patched attention layer computes its k/v, else None
_ROWS_ATTR = "_peft_kernels_prefix_rows"  # on a patched attention module: P
_HEADS_ATTR = "_peft_kernels_prefix_rows_heads"  # on its v_proj: the KV heads of its output
# modeling module name -> (its original apply_rotary_pos_emb, our replacement, the attention modules relying on it:
# held weakly, so a model dropped without remove_prefix never pins it)
_ROTARY: dict[str, tuple] = {}


def _rows() -> int | None:
    return getattr(_ACTIVE, "rows", None)


def _plain(*tensors) -> bool:
    return all(type(t) is Tensor or type(t) is nn.Parameter for t in tensors if t is not None)


def _may_redirect(x: Tensor) -> bool:
    return not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)


# --- v: the value projection into the buffer ---------------------------------------------------------------------
class _LinearIntoRows(torch.autograd.Function):
    """F.linear(x, weight, bias) for x [B, L, K], its output [B, L, H·D] written into a prefix_kv_buffer."""

    @staticmethod
    def forward(ctx, x, weight, bias, P: int, H: int):
        B, L, _ = x.shape
        D = weight.shape[0] // H
        out = prefix_kv_buffer(B, L, H, D, P, dtype=x.dtype, device=x.device).transpose(1, 2).flatten(2)
        wt = weight.t()
        for b in range(B):  # one GEMM per sequence: the buffer has P rows between sequences
            if bias is None:
                torch.mm(x[b], wt, out=out[b])
            else:
                torch.addmm(bias, x[b], wt, out=out[b])
        # What F.linear keeps: x only for the weight's gradient (a frozen v_proj keeps none of its input alive).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        ctx.x_layout = (x.shape, x.stride(), x.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            shape, stride, dtype = ctx.x_layout
            dx = torch.empty_strided(shape, stride, dtype=dtype, device=g.device)
            for b in range(shape[0]):
                torch.mm(g[b], weight, out=dx[b])
        if ctx.needs_input_grad[1]:
            dw = sum(g[b].t() @ x[b] for b in range(x.shape[0]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum((0, 1))
        return dx, dw, db, None, None


_TILE = 128  # the output tile edge of a cuBLAS-class GEMM, for the rule below


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemm_fills(rows: int, n: int, sms: int) -> bool:
    """Whether a [rows, K] x [K, n] GEMM fills ~a wave of `sms` SMs with 128 x 128 output tiles (then B of them,
    one per sequence, take about as long as one GEMM over all B sequences)."""
    return -(-rows // _TILE) * -(-n // _TILE) >= 0.9 * sms


def _per_sequence_gemm_fills(x: Tensor, n: int) -> bool:
    """v_proj computed as one GEMM per sequence only where each fills the GPU: with few KV heads (n = Hkv * D
    small) the B GEMMs would leave most SMs idle and cost more than the copy of v they save (the concat backend
    then copies v alone, a few MB). On the CPU (tests) always."""
    return not x.is_cuda or gemm_fills(x.shape[1], n, _sm_count(x.device.index or 0))


class _RowsLinear(nn.Linear):
    """The attention's v_proj while prefix tuning patches its layer: while the layer runs (``_ACTIVE.rows``), its
    output is computed into a prefix_kv_buffer; otherwise it is nn.Linear."""

    def forward(self, x: Tensor) -> Tensor:
        P = _rows()
        heads = self.__dict__.get(_HEADS_ATTR)
        if (P is None or heads is None or x.dim() != 3 or 0 in x.shape or not _plain(x) or x.dtype != self.weight.dtype
                or not _may_redirect(x) or not _per_sequence_gemm_fills(x, self.out_features)):
            return F.linear(x, self.weight, self.bias)
        return _LinearIntoRows.apply(x, self.weight, self.bias, P, heads)


# --- k: the rotary embedding of the keys into the buffer ---------------------------------------------------------
class _RotaryIntoRows(torch.autograd.Function):
    """k cos + rotate_half(k) sin (cos/sin broadcast to k's shape), written into a prefix_kv_buffer."""

    @staticmethod
    def forward(ctx, k, cos, sin, P: int, rotate_half):
        B, H, L, D = k.shape
        out = prefix_kv_buffer(B, L, H, D, P, dtype=k.dtype, device=k.device)
        torch.add(k * cos, rotate_half(k) * sin, out=out)
        ctx.save_for_backward(cos, sin)
        # dk in k's own layout (transformers' [B, L, H, D]): the k_proj backward then views it, as it views the
        # gradient the model's own rotary part gives (g arrives with the buffer's gaps between sequences).
        ctx.k_layout = (k.shape, k.stride()) if is_dense(k) else None
        return out

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        t = g * sin
        h = t.shape[-1] // 2  # rotate_half's adjoint: (t1, t2) -> (t2, -t1); dk = g cos + (t2, -t1), exactly
        if ctx.k_layout is None:
            dk = torch.mul(g, cos)
        else:
            dk = torch.mul(g, cos, out=torch.empty_strided(*ctx.k_layout, dtype=g.dtype, device=g.device))
        dk[..., :h] += t[..., h:]
        dk[..., h:] -= t[..., :h]
        return dk, None, None, None, None


def _rotary_wrapper(original, rotate_half):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        P = _rows()
        if (P is None or args or kwargs or not _plain(q, k, cos, sin) or k.dim() != 4 or q.dim() != 4
                or cos.requires_grad or sin.requires_grad or not _may_redirect(k)):
            return original(q, k, cos, sin, *args, **kwargs)
        cos1, sin1 = cos.unsqueeze(1), sin.unsqueeze(1)
        if (torch.broadcast_shapes(k.shape, cos1.shape, sin1.shape) != k.shape
                or torch.promote_types(torch.promote_types(k.dtype, cos.dtype), sin.dtype) != k.dtype):
            return original(q, k, cos, sin)
        q_embed = (q * cos1) + (rotate_half(q) * sin1)  # the original's q line
        return q_embed, _RotaryIntoRows.apply(k, cos1, sin1, P, rotate_half)

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


# The rotary function these modules define, as source (after its docstring): only that one is redirected.
_ROTARY_BODY = """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
"""
_ROTATE_HALF_BODY = """
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
"""


def _body(fn) -> str:
    src = inspect.getsource(inspect.unwrap(fn))
    if '"""' in src:
        src = src[src.index('"""', src.index('"""') + 3) + 3:]
    return "\n" + "\n".join(line for line in src.splitlines() if line.strip()) + "\n"


def _known_rotary(mod) -> bool:
    fn, rh = getattr(mod, "apply_rotary_pos_emb", None), getattr(mod, "rotate_half", None)
    if fn is None or rh is None:
        return False
    try:
        return _body(fn) == _ROTARY_BODY and _body(rh) == _ROTATE_HALF_BODY
    except (OSError, TypeError):
        return False


def _value_heads(module) -> int | None:
    """KV heads of a module whose forward computes value_states = self.v_proj(h).view(..., -1, head_dim)."""
    v = module._modules.get("v_proj")
    head_dim = getattr(module, "head_dim", None)
    if type(v) is not nn.Linear or not isinstance(head_dim, int) or head_dim <= 0 or v.out_features % head_dim:
        return None
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):  # no source to check (built at run time, a frozen install): leave it alone
        return None
    if "self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)" not in src:
        return None
    return v.out_features // head_dim


# --- install / remove ---------------------------------------------------------------------------------------------
def _wanted(x) -> bool:
    """Whether to reserve the rows: on CUDA tensors, where dispatch measures the concat backend among the others;
    on CPU tensors only with PEFT_KERNELS_PREFIX_ROWS=1 (tests: CPU dispatch takes the LSE merge for causal
    attention, which gains nothing from them). Process-wide, never per call: a checkpointed layer recomputed in the
    backward must build the graph its forward built."""
    if not isinstance(x, Tensor):
        return False
    setting = _config.SETTINGS.prefix_rows
    return x.is_cuda if setting is None else setting


def _begin(module, args, kwargs):
    if torch.compiler.is_compiling():  # the producers run the model's own code there (_may_redirect)
        return
    # With a KV cache (transformers makes one unless use_cache=False) the attention gets the cache's concatenation,
    # not the tensors computed here: nothing to reserve. (A checkpoint recomputes with the same arguments.)
    no_cache = all(kwargs.get(name) is None for name in ("cache", "past_key_values", "past_key_value"))
    wanted = no_cache and _wanted(kwargs.get("hidden_states", args[0] if args else None))
    _ACTIVE.rows = module.__dict__[_ROWS_ATTR] if wanted else None


def _end(module, args, kwargs, output):
    if not torch.compiler.is_compiling():
        _ACTIVE.rows = None


def install(attention: list[nn.Module], P: int) -> list[str]:
    """Redirect k/v of each module in `attention` into prefix_kv_buffer rows where the model's code is the
    Llama-family form; returns what was redirected per module class."""
    done = set()
    for module in attention:
        mod = importlib.import_module(type(module).__module__)
        heads = _value_heads(module)
        rotary = mod.__name__ in _ROTARY or _known_rotary(mod)
        if heads is None and not rotary:
            continue
        module.__dict__[_ROWS_ATTR] = P
        if heads is not None:
            v = module._modules["v_proj"]
            v.__class__ = _RowsLinear
            v.__dict__[_HEADS_ATTR] = heads
        if rotary:
            if mod.__name__ not in _ROTARY:
                wrapper = _rotary_wrapper(mod.apply_rotary_pos_emb, mod.rotate_half)
                _ROTARY[mod.__name__] = (mod.apply_rotary_pos_emb, wrapper, weakref.WeakSet())
                mod.apply_rotary_pos_emb = wrapper
            _ROTARY[mod.__name__][2].add(module)
        module.register_forward_pre_hook(_begin, with_kwargs=True)
        module.register_forward_hook(_end, with_kwargs=True, always_call=True)
        done.add(f"{type(module).__name__}: " + " + ".join(
            n for n, on in (("v_proj", heads is not None), ("rotary k", rotary)) if on))
    return sorted(done)


def remove(model) -> None:
    """Undo ``install`` on every module of `model` (the originals back; the rotary function once no module relies
    on it). Hooks are found by identity, which survives copy.deepcopy(model)."""
    for module in model.modules():
        if _ROWS_ATTR not in module.__dict__:
            continue
        for hooks, fn in ((module._forward_pre_hooks, _begin), (module._forward_hooks, _end)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        del module.__dict__[_ROWS_ATTR]
        v = module._modules.get("v_proj")
        if type(v) is _RowsLinear:
            v.__class__ = nn.Linear
            v.__dict__.pop(_HEADS_ATTR, None)
        name = type(module).__module__
        entry = _ROTARY.get(name)
        if entry is not None:
            entry[2].discard(module)
            if not entry[2]:
                mod = importlib.import_module(name)
                if mod.apply_rotary_pos_emb is entry[1]:  # (replaced again since, by someone else: theirs stays)
                    mod.apply_rotary_pos_emb = entry[0]
                del _ROTARY[name]
