"""Keys and values computed straight into reserved rows (``prefix_kv_buffer`` / ``reserved_buffer``), so that prefix
attention's ``concat`` backend attends over ``[prefix; k]`` without a concatenation copy of k or v (the op writes
the prefix into the P rows in front of them).

While a patched attention layer runs without a KV cache (``use_cache=False``, as training runs), the producers of
its k and v write into such a buffer, where the model's code is a form checked here (by source):

- a projection whose output the attention turns into k or v by views alone (its class swapped for a subclass with
  this behaviour; parameters and state_dict unchanged): ``v_proj`` (Llama family), the fused ``qkv_proj`` (Phi-3:
  its v is a block of the buffer's columns) and ``c_attn`` Conv1D (GPT-2: k and v both are), ``key``/``value``
  (BERT, RoBERTa). It computes ``x W^T + b`` per sequence into the buffer;
- the modeling module's ``apply_rotary_pos_emb`` (a module global, replaced while a patched model of that type
  exists; full or Phi-3's partial rotary): it writes the rotated keys ``k cos + rotate_half(k) sin`` into the buffer.

Both are the model's own math in the same order (the rotary part bit for bit; a projection as one GEMM per sequence,
so within that GEMM's rounding); their backward is the model's own gradient, and they keep for it what the model's
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
from torch import Tensor, nn

from peft_kernels import _config
from peft_kernels.ops.prefix_kv_buffer import is_dense, prefix_kv_buffer, reserved_buffer

try:
    from transformers.pytorch_utils import Conv1D  # GPT-2's fused q|k|v projection
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

_ACTIVE = threading.local()  # .rows: P while a patched attention layer computes its k/v, else None
_ROWS_ATTR = "_peft_kernels_prefix_rows"  # on a patched attention module: P
_PRODUCER_ATTR = "_peft_kernels_prefix_rows_producer"  # on its k/v projections: True
# modeling module name -> (its original apply_rotary_pos_emb, our replacement, the attention modules relying on it:
# held weakly, so a model dropped without remove_prefix never pins it)
_ROTARY: dict[str, tuple] = {}


def _rows() -> int | None:
    return getattr(_ACTIVE, "rows", None)


def _plain(*tensors) -> bool:
    return all(type(t) is Tensor or type(t) is nn.Parameter for t in tensors if t is not None)


def _may_redirect(x: Tensor) -> bool:
    return not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)


# --- v (and k where no rotary follows): the projection into the buffer ---------------------------------------------
class _LinearIntoRows(torch.autograd.Function):
    """F.linear(x, weight, bias) for x [B, L, K] (weight [N, K]; transformers' Conv1D: [K, N], ``in_out``), its output
    [B, L, N] computed into a ``reserved_buffer``."""

    @staticmethod
    def forward(ctx, x, weight, bias, P: int, in_out: bool):
        B, L, _ = x.shape
        w = weight if in_out else weight.t()  # [K, N]
        out = reserved_buffer(B, L, w.shape[1], P, dtype=x.dtype, device=x.device)
        for b in range(B):  # one GEMM per sequence: the buffer has P rows between sequences
            if bias is None:
                torch.mm(x[b], w, out=out[b])
            else:
                torch.addmm(bias, x[b], w, out=out[b])
        # What F.linear keeps: x only for the weight's gradient (a frozen projection keeps none of its input alive).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        ctx.has_bias, ctx.in_out = bias is not None, in_out
        ctx.x_layout = (x.shape, x.stride(), x.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            shape, stride, dtype = ctx.x_layout
            dx = torch.empty_strided(shape, stride, dtype=dtype, device=g.device)
            for b in range(shape[0]):
                torch.mm(g[b], w.t(), out=dx[b])
        if ctx.needs_input_grad[1]:  # in the weight's own orientation (no transposed view for AccumulateGrad)
            if ctx.in_out:
                dw = sum(x[b].t() @ g[b] for b in range(x.shape[0]))
            else:
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
    """A projection computed as one GEMM per sequence only where each fills the GPU: with few KV heads (n = Hkv * D
    small) the B GEMMs would leave most SMs idle and cost more than the copy of v they save (the concat backend
    then copies v alone, a few MB). On the CPU (tests) always."""
    return not x.is_cuda or gemm_fills(x.shape[1], n, _sm_count(x.device.index or 0))


class _IntoRows:
    """The producer of an attention's k/v (its class swapped for a subclass with this forward while prefix tuning
    patches the layer): while the layer runs (``_ACTIVE.rows``), its output is computed into reserved rows;
    otherwise, and for anything unusual, it is its own class's forward."""

    _in_out = False  # weight [in, out] (transformers' Conv1D)

    def forward(self, x: Tensor) -> Tensor:
        P = _rows()
        w, bias = self.weight, self.bias
        if (P is None or _PRODUCER_ATTR not in self.__dict__ or not isinstance(x, Tensor) or x.dim() != 3
                or 0 in x.shape or not _plain(x, w, bias) or x.dtype != w.dtype or not _may_redirect(x)
                or not _per_sequence_gemm_fills(x, w.shape[1] if self._in_out else w.shape[0])):
            return super().forward(x)
        return _LinearIntoRows.apply(x, w, bias, P, self._in_out)


class _RowsLinear(_IntoRows, nn.Linear):
    pass


_PRODUCER_CLASSES = {nn.Linear: _RowsLinear}
if Conv1D is not None:
    class _RowsConv1D(_IntoRows, Conv1D):
        _in_out = True

    _PRODUCER_CLASSES[Conv1D] = _RowsConv1D


# --- k: the rotary embedding of the keys into the buffer ---------------------------------------------------------
class _RotaryIntoRows(torch.autograd.Function):
    """k cos + rotate_half(k) sin over k's first cos.shape[-1] features, the rest passed through (cos/sin broadcast
    to k's shape), written into a prefix_kv_buffer."""

    @staticmethod
    def forward(ctx, k, cos, sin, P: int, rotate_half):
        B, H, L, D = k.shape
        rd = cos.shape[-1]
        out = prefix_kv_buffer(B, L, H, D, P, dtype=k.dtype, device=k.device)
        if rd == D:
            torch.add(k * cos, rotate_half(k) * sin, out=out)
        else:  # partial rotary (Phi-3): the model's cat([rotated, k_pass]) written in place
            k_rot = k[..., :rd]
            torch.add(k_rot * cos, rotate_half(k_rot) * sin, out=out[..., :rd])
            out[..., rd:].copy_(k[..., rd:])
        ctx.save_for_backward(cos, sin)
        # dk in k's own layout (transformers' [B, L, H, D]): the k_proj backward then views it, as it views the
        # gradient the model's own rotary part gives (g arrives with the buffer's gaps between sequences).
        ctx.k_layout = (k.shape, k.stride()) if is_dense(k) else None
        return out

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        rd = cos.shape[-1]
        g_rot = g[..., :rd]
        t = g_rot * sin
        h = rd // 2  # rotate_half's adjoint: (t1, t2) -> (t2, -t1); dk = g cos + (t2, -t1), exactly
        if ctx.k_layout is None:
            dk = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        else:
            dk = torch.empty_strided(*ctx.k_layout, dtype=g.dtype, device=g.device)
        torch.mul(g_rot, cos, out=dk[..., :rd])
        dk[..., :h] += t[..., h:]
        dk[..., h:rd] -= t[..., :h]
        if rd < g.shape[-1]:
            dk[..., rd:].copy_(g[..., rd:])
        return dk, None, None, None, None


def _rotary_wrapper(original, rotate_half, partial: bool):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        P = _rows()
        if (P is None or args or kwargs or not _plain(q, k, cos, sin) or k.dim() != 4 or q.dim() != 4
                or cos.requires_grad or sin.requires_grad or not _may_redirect(k)):
            return original(q, k, cos, sin, *args, **kwargs)
        cos1, sin1 = cos.unsqueeze(1), sin.unsqueeze(1)
        rd = cos1.shape[-1]
        shape = (*k.shape[:-1], rd)
        if ((rd != k.shape[-1] and not partial) or rd % 2 or rd > k.shape[-1]
                or torch.broadcast_shapes(shape, cos1.shape, sin1.shape) != shape
                or torch.promote_types(torch.promote_types(k.dtype, cos.dtype), sin.dtype) != k.dtype):
            return original(q, k, cos, sin)
        if partial:  # the original's q lines
            q_rot, q_pass = q[..., :rd], q[..., rd:]
            q_embed = torch.cat([(q_rot * cos1) + (rotate_half(q_rot) * sin1), q_pass], dim=-1)
        else:
            q_embed = (q * cos1) + (rotate_half(q) * sin1)
        return q_embed, _RotaryIntoRows.apply(k, cos1, sin1, P, rotate_half)

    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


# The rotary functions these modules define, as source (after the docstring): only those are redirected.
_ROTARY_BODIES = {
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
""": False,
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed
""": True,  # partial rotary (Phi-3)
}
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


def _rotary_kind(mod) -> bool | None:
    """Whether the modeling module's rotary function is partial (True), full (False) or not one we know (None)."""
    fn, rh = getattr(mod, "apply_rotary_pos_emb", None), getattr(mod, "rotate_half", None)
    if fn is None or rh is None:
        return None
    try:
        return _ROTARY_BODIES.get(_body(fn)) if _body(rh) == _ROTATE_HALF_BODY else None
    except (OSError, TypeError):
        return None


# The k/v producers of the attentions prefix tuning patches: (child name, the source lines of the attention's forward
# that make k or v from its output by views alone). A producer is redirected only where its lines are all there.
_PRODUCERS = (
    ("v_proj", ("self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)",)),  # Llama family
    ("qkv_proj", ("qkv = self.qkv_proj(hidden_states)",  # Phi-3: v is a column block (k is rotated: a new tensor)
                  "value_states = qkv[..., query_pos + self.num_key_value_heads * self.head_dim :]",
                  "value_states = value_states.view(hidden_shape).transpose(1, 2)")),
    ("c_attn", ("query_states, key_states, value_states = self.c_attn(hidden_states).split(self.split_size, dim=2)",
                "key_states = key_states.view(shape_kv).transpose(1, 2)",  # GPT-2: k and v column blocks
                "value_states = value_states.view(shape_kv).transpose(1, 2)")),
    ("key", ("key_layer = self.key(hidden_states).view(*hidden_shape).transpose(1, 2)",)),  # BERT, RoBERTa
    ("value", ("value_layer = self.value(hidden_states).view(*hidden_shape).transpose(1, 2)",)),
)


def _producers(module) -> list[str]:
    """The children of `module` whose output its forward turns into k or v by views alone (see _PRODUCERS)."""
    found = [(name, lines) for name, lines in _PRODUCERS if type(module._modules.get(name)) in _PRODUCER_CLASSES]
    if not found:
        return []
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):  # no source to check (built at run time, a frozen install): leave it alone
        return []
    return [name for name, lines in found if all(line in src for line in lines)]


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
    """Redirect k/v of each module in `attention` into reserved rows where the model's code is a form we know (its
    projections' lines, its rotary function); returns what was redirected per module class."""
    done = set()
    for module in attention:
        mod = importlib.import_module(type(module).__module__)
        producers = _producers(module)
        partial = _ROTARY[mod.__name__][3] if mod.__name__ in _ROTARY else _rotary_kind(mod)
        if not producers and partial is None:
            continue
        module.__dict__[_ROWS_ATTR] = P
        for name in producers:
            child = module._modules[name]
            child.__class__ = _PRODUCER_CLASSES[type(child)]
            child.__dict__[_PRODUCER_ATTR] = True
        if partial is not None:
            if mod.__name__ not in _ROTARY:
                wrapper = _rotary_wrapper(mod.apply_rotary_pos_emb, mod.rotate_half, partial)
                _ROTARY[mod.__name__] = (mod.apply_rotary_pos_emb, wrapper, weakref.WeakSet(), partial)
                mod.apply_rotary_pos_emb = wrapper
            _ROTARY[mod.__name__][2].add(module)
        module.register_forward_pre_hook(_begin, with_kwargs=True)
        module.register_forward_hook(_end, with_kwargs=True, always_call=True)
        redirected = [*producers] + (["rotary k"] if partial is not None else [])
        done.add(f"{type(module).__name__}: " + " + ".join(redirected))
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
        for child in module.children():
            if isinstance(child, _IntoRows):
                child.__class__ = next(c for c, ours in _PRODUCER_CLASSES.items() if ours is type(child))
                child.__dict__.pop(_PRODUCER_ATTR, None)
        name = type(module).__module__
        entry = _ROTARY.get(name)
        if entry is not None:
            entry[2].discard(module)
            if not entry[2]:
                mod = importlib.import_module(name)
                if mod.apply_rotary_pos_emb is entry[1]:  # (replaced again since, by someone else: theirs stays)
                    mod.apply_rotary_pos_emb = entry[0]
                del _ROTARY[name]
