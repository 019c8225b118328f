"""Benchmark cases, one function per op family: the anchors (floor, HF peft, eager, torch.compile, SDPA,
FlexAttention) and ours under each backend, at the target sizes on CUDA and at small sizes on the CPU.

Every setup builds fresh random inputs (never zeros: LoRA's B and the like are initialised at random too)
and returns a closure running one fwd+bwd step; gradients are dropped after each step so that nothing
accumulates across repetitions.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernels.bench.harness import Case, Skip, Workload


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _rand(shape, device, dtype, scale=1.0, grad=False) -> torch.Tensor:
    t = torch.randn(shape, device=device, dtype=dtype)
    if scale != 1.0:
        t.mul_(scale)
    return t.requires_grad_(grad)


def _step(forward: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], dy: torch.Tensor | None = None,
          note: str = "") -> Workload:
    """fwd+bwd with a fixed random upstream gradient (or .backward() of a scalar loss)."""

    def fwd_bwd():
        out = forward()
        if dy is not None:
            out.backward(dy)
        elif out.requires_grad:
            out.backward()
        for p in params:
            p.grad = None

    return Workload(fwd_bwd, forward, note)


def _cuda_only(device: str, what: str) -> None:
    if device != "cuda":
        raise Skip(f"{what} runs on CUDA only in this suite")


def _compile(fn):
    # dynamic=False: each case has one static shape; automatic dynamic shapes would hand later shapes
    # generic kernels after a recompile.
    return torch.compile(fn, dynamic=False)


def _family(module: str):
    """The op family an ops module defines (its FAMILY)."""
    return importlib.import_module(module).FAMILY


def _ours_cases(family: str, shape: str, device: str, module: str, name: str,
                build: Callable[[Callable], Workload], inputs: Callable[[], tuple] | None = None,
                extra: Sequence[tuple[str, Callable[[Callable], Workload]]] = ()) -> list[Case]:
    """One case per forward backend the op family declares (``ours_<backend>``, forced with
    ``use_backend(name, strict=True)``, skipped with the family's own reason where it cannot serve), then
    automatic selection (``ours_auto``, its note says what dispatch chose).

    build(fn) builds fresh inputs and returns the workload calling ``fn`` (the public op);
    inputs() gives the op's input record at the case's shapes (what dispatch sees), for the reasons and the note.
    extra: (suffix, build) pairs run under automatic selection only (e.g. with dropout).
    """
    from peft_kernels import _backends

    op_family = _family(module)
    backends = list(op_family.forward_backends)

    def forced(backend: str | None, build_fn):
        def setup():
            fn = getattr(importlib.import_module(module), name)
            record = inputs() if inputs is not None else None
            if backend is not None:
                if record is not None:
                    reason = op_family.why_not_reason(backend, record)
                    if reason is not None:
                        raise Skip(reason)

                def call(*a, **kw):
                    with _backends.use_backend(backend, strict=True):
                        return fn(*a, **kw)

                return build_fn(call)
            work = build_fn(fn)
            if record is not None:
                fwd, bwd = op_family.select(record)
                work.note = f"auto: {fwd}" + (f" (backward {bwd})" if bwd != fwd else "")
            return work

        return setup

    cases = [Case(family, shape, f"ours_{b}", forced(b, build)) for b in backends]
    cases.append(Case(family, shape, "ours_auto", forced(None, build)))
    cases += [Case(family, shape, f"ours_auto_{suffix}", forced(None, b)) for suffix, b in extra]
    return cases


def _eager_cases(family: str, shape: str, device: str, build: Callable[[Callable], Workload], fn: Callable,
                 eager_name: str = "eager", **eager_kw) -> list[Case]:
    """The eager anchor ``build(fn)`` (Case options ``eager_kw``) and its torch.compile twin "compile" (CUDA only)."""

    def variant(compiled: bool):
        def setup():
            if compiled:
                _cuda_only(device, "torch.compile")
            return build(_compile(fn) if compiled else fn)

        return setup

    return [Case(family, shape, eager_name, variant(False), **eager_kw),
            Case(family, shape, "compile", variant(True), compiled=True)]


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------
class _OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _peft_lora_layer(W: torch.Tensor, r: int, alpha: float, adapter_dtype: torch.dtype) -> nn.Module:
    """HF peft's lora.Linear around a frozen nn.Linear holding W, with random (non-zero) adapters."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise Skip(f"HF peft is not installed ({exc})") from None
    N, K = W.shape
    base = nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    base.weight = nn.Parameter(W, requires_grad=False)
    model = get_peft_model(_OneLinear(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                        target_modules=["proj"]))
    layer = model.base_model.model.proj
    # peft zero-initialises lora_B (and casts adapters per its autocast rule): set both explicitly.
    for pname, p in layer.named_parameters():
        if "lora_A" in pname:
            p.data = torch.randn(p.shape, device=W.device, dtype=adapter_dtype) * K**-0.5
        elif "lora_B" in pname:
            p.data = torch.randn(p.shape, device=W.device, dtype=adapter_dtype) * r**-0.5
    return layer


def lora_cases(device: str, quick: bool = False) -> list[Case]:
    if device == "cuda":
        M, r, dtype = 8192, 16, torch.bfloat16
        shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]
    else:
        M, r, dtype = 256, 16, torch.float32
        shapes = [(256, 256), (256, 512)]
    if quick:
        shapes = shapes[:1]
    alpha = 2.0 * r
    cases: list[Case] = []
    for K, N in shapes:
        shape = f"M={M} {K}->{N} r={r}"

        def make(K=K, N=N):
            x = _rand((M, K), device, dtype, grad=True)
            W = _rand((N, K), device, dtype, K**-0.5)
            A = _rand((r, K), device, torch.float32, K**-0.5, grad=True)
            B = _rand((N, r), device, torch.float32, r**-0.5, grad=True)
            return x, W, A, B, _rand((M, N), device, dtype)

        def frozen_base(make=make):
            x, W, _, _, dy = make()
            return _step(lambda: F.linear(x, W), [x], dy)

        def peft_variant(adapter_dtype, compiled=False, make=make):
            def setup():
                if compiled:
                    _cuda_only(device, "torch.compile")
                if adapter_dtype != torch.float32 and dtype == torch.float32:
                    raise Skip("the CPU run is fp32: bf16 adapters would be peft_fp32_adapters again")
                x, W, _, _, dy = make()
                layer = _peft_lora_layer(W, r, alpha, adapter_dtype)
                params = [x] + [p for p in layer.parameters() if p.requires_grad]
                run = _compile(layer) if compiled else layer
                note = f"adapters {adapter_dtype}".replace("torch.", "")
                return _step(lambda: run(x), params, dy, note=note)

            return setup

        def cublas_addmm(make=make):
            # The anchor "cuBLAS addmm_ autograd" (Unsloth's design): two GEMMs, the low-rank term
            # accumulated in place, autograd for the backward; fp32 adapters cast to the activation dtype.
            x, W, A, B, dy = make()

            def fwd():
                return (x @ W.t()).addmm_(x @ A.to(dtype).t(), B.to(dtype).t(), alpha=alpha / r)

            return _step(fwd, [x, A, B], dy, note="adapters float32, cast per step")

        def ours_build(dropout_p, make=make):
            def build(fn):
                x, W, A, B, dy = make()
                return _step(lambda: fn(x, W, None, A, B, alpha / r, dropout_p), [x, A, B], dy,
                             note="adapters float32")

            return build

        def lora_inputs(K=K, N=N):
            from peft_kernels.ops.lora import FAMILY

            grad = dict(requires_grad=True)
            return FAMILY.Inputs(torch.empty(M, K, device=device, dtype=dtype, **grad),
                                 torch.empty(N, K, device=device, dtype=dtype), None,
                                 torch.empty(r, K, device=device, dtype=torch.float32, **grad),
                                 torch.empty(N, r, device=device, dtype=torch.float32, **grad),
                                 alpha / r, 0.0, torch.zeros((), dtype=torch.int64))

        cases += [
            Case("lora", shape, "frozen_base", frozen_base, floor=True, note="F.linear, frozen W, dX only"),
            Case("lora", shape, "peft_fp32_adapters", peft_variant(torch.float32)),
            Case("lora", shape, "peft_bf16_adapters", peft_variant(torch.bfloat16)),
            Case("lora", shape, "peft_compile", peft_variant(torch.float32, compiled=True), compiled=True),
            Case("lora", shape, "cublas_addmm_autograd", cublas_addmm),
        ]
        cases += _ours_cases("lora", shape, device, "peft_kernels.ops.lora", "lora_linear", ours_build(0.0),
                             lora_inputs, extra=[("dropout0.05", ours_build(0.05))])
    return cases


# --------------------------------------------------------------------------------------------------
# BitFit (bias-only linear)
# --------------------------------------------------------------------------------------------------
def bias_only_cases(device: str, quick: bool = False) -> list[Case]:
    """BitFit: the frozen-W linear with a trainable bias (fwd + bwd: dX and db, never dW) beside the no-bias
    layer (the floor: the dX GEMM alone), eager nn.Linear and torch.compile; and the bias-only LayerNorm beside
    F.layer_norm with a frozen weight."""
    if device == "cuda":
        M, K, N, dtype = 8192, 4096, 14336, torch.bfloat16
    else:
        M, K, N, dtype = 256, 256, 512, torch.float32
    shape = f"M={M} {K}->{N}"
    from peft_kernels.ops.bias_norm import FAMILY as NORM
    from peft_kernels.ops.bias_only import FAMILY as LINEAR

    def make():
        x = _rand((M, K), device, dtype, grad=True)
        W = _rand((N, K), device, dtype, K**-0.5)
        b = _rand((N,), device, dtype, 0.1, grad=True)
        return x, W, b, _rand((M, N), device, dtype)

    def floor():
        x, W, _, dy = make()
        return _step(lambda: F.linear(x, W), [x], dy)

    def linear_module(compiled):
        def setup():
            if compiled:
                _cuda_only(device, "torch.compile")
            x, W, b, dy = make()
            lin = nn.Linear(K, N, bias=True, device=device, dtype=dtype)
            lin.weight = nn.Parameter(W, requires_grad=False)
            lin.bias = nn.Parameter(b.detach())
            run = _compile(lin) if compiled else lin
            return _step(lambda: run(x), [x, lin.bias], dy)

        return setup

    def build(fn):
        x, W, b, dy = make()
        return _step(lambda: fn(x, W, b), [x, b], dy)

    def record():  # what dispatch sees (tune key: shapes, dtypes, which inputs need grads)
        return LINEAR.Inputs(torch.empty(M, K, device=device, dtype=dtype, requires_grad=True),
                             torch.empty(N, K, device=device, dtype=dtype),
                             torch.empty(N, device=device, dtype=dtype, requires_grad=True))

    cases = [
        Case("bias_only", shape, "frozen_nobias", floor, floor=True, note="F.linear without bias, dX only"),
        Case("bias_only", shape, "eager_bias", linear_module(False), note="nn.Linear, frozen W, trainable b"),
        Case("bias_only", shape, "compile_bias", linear_module(True), compiled=True),
    ]
    cases += _ours_cases("bias_only", shape, device, "peft_kernels.ops.bias_only", "bias_only_linear",
                         build, record)
    if quick:
        return cases

    # The bias-only LayerNorm (BERT's norms under BitFit): M x H = M x K, frozen weight, trainable bias.
    H = K
    nshape = f"layer_norm M={M} H={H}"

    def make_norm():
        x = _rand((M, H), device, dtype, grad=True)
        w = (1 + 0.1 * torch.randn(H, device=device)).to(dtype)
        b = _rand((H,), device, dtype, 0.1, grad=True)
        return x, w, b, _rand((M, H), device, dtype)

    def norm_floor():  # what any norm backward must move: read x and dy, write dx (no bias, no weight grad)
        x, w, _, dy = make_norm()
        return _step(lambda: F.layer_norm(x, (H,), w), [x], dy)

    def norm_eager(compiled):
        def setup():
            if compiled:
                _cuda_only(device, "torch.compile")
            x, w, b, dy = make_norm()
            fn = _compile(F.layer_norm) if compiled else F.layer_norm
            return _step(lambda: fn(x, (H,), w, b), [x, b], dy)

        return setup

    def norm_build(fn):
        x, w, b, dy = make_norm()
        return _step(lambda: fn(x, w, b), [x, b], dy)

    def norm_record():
        return NORM.Inputs(torch.empty(M, H, device=device, dtype=dtype, requires_grad=True),
                           torch.empty(H, device=device, dtype=dtype),
                           torch.empty(H, device=device, dtype=dtype, requires_grad=True), 1e-5, False)

    cases += [
        Case("bias_only", nshape, "layer_norm_nobias", norm_floor, floor=True,
             note="F.layer_norm, frozen w, no bias: dx only"),
        Case("bias_only", nshape, "eager_layer_norm", norm_eager(False), note="F.layer_norm, frozen w, trainable b"),
        Case("bias_only", nshape, "compile_layer_norm", norm_eager(True), compiled=True),
    ]
    return cases + _ours_cases("bias_only", nshape, device, "peft_kernels.ops.bias_norm", "bias_only_norm",
                               norm_build, norm_record)


# --------------------------------------------------------------------------------------------------
# Prefix attention (prefix tuning / P-tuning v2)
# --------------------------------------------------------------------------------------------------
def prefix_attention_cases(device: str, quick: bool = False) -> list[Case]:
    """Prefix attention as a model runs it: q/k/v in transformers' [B, L, H, D] layout viewed as [B, H, L, D] (and
    an upstream gradient in that layout), fp32 master prefixes; anchors on the same tensors (the floor: SDPA causal
    without a prefix; SDPA over the concatenated keys with a bool mask / causal_lower_right; FlexAttention)."""
    if device == "cuda":
        B, H, L, D, P, dtype = 4, 32, 2048, 128, 32, torch.bfloat16
    else:
        B, H, L, D, P, dtype = 1, 2, 128, 64, 8, torch.float32
    shape = f"B={B} H={H} L={L} D={D} P={P} causal bf16-act fp32-prefix HL" if device == "cuda" else \
        f"B={B} H={H} L={L} D={D} P={P} causal fp32 HL"

    def hl(grad):  # [B, H, L, D] view of a [B, L, H, D] tensor: what transformers passes
        return _rand((B, L, H, D), device, dtype).transpose(1, 2).requires_grad_(grad)

    def make():
        q, k, v = (hl(True) for _ in range(3))
        pk, pv = (_rand((H, P, D), device, torch.float32, grad=True) for _ in range(2))
        return q, k, v, pk, pv, _rand((B, L, H, D), device, dtype).transpose(1, 2)

    def cat_kv(k, v, pk, pv):
        return (torch.cat([pk.to(dtype).expand(B, H, P, D), k], dim=2),
                torch.cat([pv.to(dtype).expand(B, H, P, D), v], dim=2))

    def floor():
        q, k, v, _, _, dy = make()
        return _step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], dy)

    def sdpa_bool_mask():
        q, k, v, pk, pv, dy = make()
        # [L, P+L]: query i sees key j iff j <= i + P (every prefix slot, causal among the real keys);
        # built once outside the step, as a model would.
        mask = torch.ones(L, P + L, dtype=torch.bool, device=device).tril(diagonal=P)

        def fwd():
            K, V = cat_kv(k, v, pk, pv)
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask)

        return _step(fwd, [q, k, v, pk, pv], dy)

    def sdpa_lower_right():
        try:
            from torch.nn.attention.bias import causal_lower_right
        except ImportError as exc:
            raise Skip(f"torch.nn.attention.bias.causal_lower_right unavailable ({exc})") from None
        q, k, v, pk, pv, dy = make()
        # Bottom-right causal over [prefix; keys]: query i sees key j iff j <= i + P, i.e. every prefix slot.
        bias = causal_lower_right(L, P + L)

        def fwd():
            K, V = cat_kv(k, v, pk, pv)
            return F.scaled_dot_product_attention(q, K, V, attn_mask=bias)

        return _step(fwd, [q, k, v, pk, pv], dy)

    def flex():
        _cuda_only(device, "FlexAttention (compiled)")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as exc:
            raise Skip(f"torch.nn.attention.flex_attention unavailable ({exc})") from None
        q, k, v, pk, pv, dy = make()

        def prefix_causal(b, h, q_idx, kv_idx):
            return (kv_idx < P) | (kv_idx - P <= q_idx)

        block_mask = create_block_mask(prefix_causal, B=None, H=None, Q_LEN=L, KV_LEN=P + L, device=device)
        attn = _compile(flex_attention)

        def fwd():
            K, V = cat_kv(k, v, pk, pv)
            return attn(q, K, V, block_mask=block_mask)

        return _step(fwd, [q, k, v, pk, pv], dy)

    def build(fn):
        q, k, v, pk, pv, dy = make()
        return _step(lambda: fn(q, k, v, pk, pv, causal=True), [q, k, v, pk, pv], dy)

    def reserved(backend):
        """k/v as prefix tuning computes them on CUDA: into prefix_kv_buffer rows (no concatenation copy), and not
        leaves: their gradient goes to the producer's backward (discarded here), as in a model (a leaf with gaps
        between its sequences would have AccumulateGrad copy it into a contiguous .grad)."""
        def setup():
            from peft_kernels import prefix_attention, prefix_kv_buffer, use_backend

            q, k, v, pk, pv, dy = make()
            kb, vb = (prefix_kv_buffer(B, L, H, D, P, dtype=dtype, device=device) for _ in range(2))
            with torch.no_grad():
                kb.copy_(k)
                vb.copy_(v)
            kb.requires_grad_(True)
            vb.requires_grad_(True)

            def fwd():
                with use_backend(backend, strict=True) if backend else contextlib.nullcontext():
                    return prefix_attention(q, _Sink.apply(kb), _Sink.apply(vb), pk, pv, causal=True)

            return _step(fwd, [q, pk, pv], dy)

        return setup

    def support_args():
        from peft_kernels.ops.prefix_attention import FAMILY

        q, k, v = (hl(True) for _ in range(3))
        pk, pv = (torch.empty(H, P, D, device=device, dtype=torch.float32, requires_grad=True) for _ in range(2))
        return FAMILY.Inputs(q, k, v, pk, pv, True, None, D**-0.5)

    cases = [
        Case("prefix_attention", shape, "sdpa_causal_noprefix", floor, floor=True),
        Case("prefix_attention", shape, "sdpa_cat_boolmask", sdpa_bool_mask),
        Case("prefix_attention", shape, "sdpa_cat_lower_right", sdpa_lower_right),
        Case("prefix_attention", shape, "flex_compiled", flex, compiled=True),
    ]
    return cases + _ours_cases("prefix_attention", shape, device, "peft_kernels.ops.prefix_attention",
                               "prefix_attention", build, support_args) + [
        Case("prefix_attention", shape, "ours_concat_reserved_rows", reserved("concat")),
        Case("prefix_attention", shape, "ours_auto_reserved_rows", reserved(None)),
    ]


class _Sink(torch.autograd.Function):
    """x itself (a view), its gradient consumed here: a non-leaf input whose producer's backward takes the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return None


# --------------------------------------------------------------------------------------------------
# Bottleneck adapter (Houlsby / Pfeiffer)
# --------------------------------------------------------------------------------------------------
def adapter_cases(device: str, quick: bool = False) -> list[Case]:
    if device == "cuda":
        N, H, m, dtype = 8192, 4096, 64, torch.bfloat16
    else:
        N, H, m, dtype = 256, 256, 16, torch.float32
    shape = f"N={N} H={H} m={m} relu residual"

    def make():
        h = _rand((N, H), device, dtype, grad=True)
        Wd = _rand((m, H), device, dtype, H**-0.5, grad=True)
        bd = _rand((m,), device, dtype, 0.1, grad=True)
        Wu = _rand((H, m), device, dtype, m**-0.5, grad=True)
        bu = _rand((H,), device, dtype, 0.1, grad=True)
        return h, Wd, bd, Wu, bu, _rand((N, H), device, dtype)

    def eager_adapter(h, Wd, bd, Wu, bu):
        return h + F.linear(F.relu(F.linear(h, Wd, bd)), Wu, bu)

    def floor():
        h, *_, dy = make()
        # h * 1.0 reads and writes N·H forward and again backward: the 4 passes no adapter can avoid.
        return _step(lambda: h * 1.0, [h], dy)

    def build_with(**kwargs):
        def build(fn):
            h, Wd, bd, Wu, bu, dy = make()
            return _step(lambda: fn(h, Wd, bd, Wu, bu, **kwargs), [h, Wd, bd, Wu, bu], dy)

        return build

    def record():
        from peft_kernels.ops.adapter import AdapterInputs

        h, Wd, bd, Wu, bu, _ = make()
        return AdapterInputs(h, Wd, bd, Wu, bu, "relu", 1.0, True)

    def mixed(n_adapters: int):
        # Every row picks one of n adapters (random ids) in the same fused kernel, fwd+bwd.
        def setup():
            from peft_kernels.ops.adapter import bottleneck_adapter_mixed

            h, _, _, _, _, dy = make()
            Wd = _rand((n_adapters, m, H), device, dtype, H**-0.5, grad=True)
            bd = _rand((n_adapters, m), device, dtype, 0.1, grad=True)
            Wu = _rand((n_adapters, H, m), device, dtype, m**-0.5, grad=True)
            bu = _rand((n_adapters, H), device, dtype, 0.1, grad=True)
            ids = torch.randint(0, n_adapters, (N,), device=device)
            return _step(lambda: bottleneck_adapter_mixed(h, Wd, bd, Wu, bu, ids, "relu"), [h, Wd, bd, Wu, bu], dy,
                         note=f"{n_adapters} adapters, random id per row")

        return setup

    cases = [
        Case("adapter", shape, "copy_floor", floor, floor=True, note="h*1.0: 4 passes over N·H"),
        *_eager_cases("adapter", shape, device, build_with(), eager_adapter),
    ]
    ours = build_with(activation="relu", scaling=1.0, residual=True)
    return cases + _ours_cases("adapter", shape, device, "peft_kernels.ops.adapter", "bottleneck_adapter",
                               ours, record) + [Case("adapter", shape, "ours_mixed4", mixed(4))]


# --------------------------------------------------------------------------------------------------
# Soft prompt (prompt tuning / P-tuning): embedding gather + concat
# --------------------------------------------------------------------------------------------------
def prompt_cases(device: str, quick: bool = False) -> list[Case]:
    if device == "cuda":
        B, S, P, H, V, dtype = 4, 2048, 32, 2048, 32000, torch.bfloat16
    else:
        B, S, P, H, V, dtype = 2, 128, 8, 256, 1000, torch.float32
    shape = f"B={B} S={S} P={P} H={H} V={V}"

    def make(batched=False):
        ids = torch.randint(0, V, (B, S), device=device)
        emb = _rand((V, H), device, dtype)
        prompt = _rand(((B,) if batched else ()) + (P, H), device, torch.float32, grad=True)  # fp32 master prompt
        return ids, emb, prompt, _rand((B, P + S, H), device, dtype)

    def eager_prompt(ids, emb, prompt, positions=None):
        return torch.cat([prompt.to(emb.dtype).unsqueeze(0).expand(B, P, H), F.embedding(ids, emb)], dim=1)

    def floor():
        ids, emb, _, _ = make()
        # The frozen lookup has nothing to differentiate: its fwd is the whole step.
        return _step(lambda: F.embedding(ids, emb), [])

    def build_with(template=False, batched=False):
        def build(fn):
            ids, emb, prompt, dy = make(batched)
            # A P-tuning template: virtual tokens spread over the sequence (device positions: the maps are built
            # per call, as the model patch does).
            positions = torch.linspace(0, S, P, device=device).long() if template else None
            return _step(lambda: fn(ids, emb, prompt, positions), [prompt], dy)

        return build

    def inputs():
        from peft_kernels.ops.prompt import FAMILY

        return FAMILY.Inputs(torch.zeros(B, S, device=device, dtype=torch.int64),
                             torch.empty(V, H, device=device, dtype=dtype),
                             torch.empty(P, H, device=device, dtype=torch.float32, requires_grad=True), None, None)

    cases = [
        Case("prompt", shape, "embedding_lookup", floor, floor=True, note="frozen F.embedding, S tokens"),
        *_eager_cases("prompt", shape, device, build_with(), eager_prompt, eager_name="eager_cat"),
    ]
    return cases + _ours_cases("prompt", shape, device, "peft_kernels.ops.prompt", "soft_prompt_embed",
                               build_with(), inputs,
                               extra=[("template", build_with(template=True)),
                                      ("per_example", build_with(batched=True))])


# --------------------------------------------------------------------------------------------------
# Distillation loss (KL at temperature T + hard-label CE)
# --------------------------------------------------------------------------------------------------
def distill_cases(device: str, quick: bool = False) -> list[Case]:
    """Row-wise loss on [N, V] logits (KL at T + hard CE, fwd+bwd, the gradient of the student logits), and the
    fused-linear loss with both heads (student head trains; vocab 32000 and 128256)."""
    T, alpha = 2.0, 0.5
    cuda = device == "cuda"

    def liger(what: str):
        _cuda_only(device, "Liger-Kernel")
        try:
            return importlib.import_module(what)
        except ImportError as exc:
            raise Skip(f"Liger-Kernel not installed ({exc})") from None

    def eager_loss(s, t, labels):
        # The DistilBERT recipe as users write it, with the usual fp32 upcast of the logits.
        s32, t32 = s.float(), t.float()
        kd = F.kl_div(F.log_softmax(s32 / T, dim=-1), F.log_softmax(t32 / T, dim=-1), reduction="batchmean",
                      log_target=True) * (T * T)
        ce = F.cross_entropy(s32, labels, ignore_index=-100)
        return alpha * kd + (1.0 - alpha) * ce

    def make_labels(N, V):
        labels = torch.randint(0, V, (N,), device=device)
        labels[torch.rand(N, device=device) < 0.05] = -100  # some ignored (padding) positions
        return labels

    # ---- row-wise: [N, V] logits ----
    N, V, dtype = (8192, 32000, torch.bfloat16) if cuda else (256, 1000, torch.float32)
    shape = f"{N}x{V} {str(dtype).replace('torch.', '')} T={T}"

    def make():
        return _rand((N, V), device, dtype, 2.0, grad=True), _rand((N, V), device, dtype, 2.0), make_labels(N, V)

    def build_with(**kwargs):
        def build(fn):
            s, t, labels = make()
            return _step(lambda: fn(s, t, labels, **kwargs), [s])

        return build

    def bytes_floor():
        s, t, _ = make()
        out = torch.empty_like(s)
        return Workload(lambda: torch.add(s.detach(), t, out=out), None,
                        "reads student + teacher, writes one [N, V]: the bytes the fused loss must move")

    def liger_rows():
        kl = liger("liger_kernel.transformers.kl_div").LigerKLDIVLoss(reduction="batchmean", log_target=True)
        ce = liger("liger_kernel.transformers.cross_entropy").LigerCrossEntropyLoss(ignore_index=-100)

        def loss(s, t, labels):
            kd = kl(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)) * (T * T)
            return alpha * kd + (1.0 - alpha) * ce(s, labels)

        work = build_with()(loss)
        work.note = "Liger KL on log-probs (log_softmax in PyTorch) + Liger CE"
        return work

    def row_record():
        from peft_kernels.ops.distill import DistillInputs

        s, t = (torch.empty((N, V), device=device, dtype=dtype) for _ in range(2))
        return DistillInputs(s, t, torch.empty(N, device=device, dtype=torch.long), None, T, alpha, -100, "mean",
                             "forward_kl", 0.5, True, False)

    cases = [Case("distill", shape, "bytes_floor", bytes_floor, floor=True)]
    cases += _eager_cases("distill", shape, device, build_with(), eager_loss)
    cases.append(Case("distill", shape, "liger", liger_rows))
    cases += _ours_cases("distill", shape, device, "peft_kernels.ops.distill", "distillation_loss",
                         build_with(temperature=T, alpha=alpha, ignore_index=-100), inputs=row_record,
                         extra=[("grad_in_logits", build_with(temperature=T, alpha=alpha, grad_in_logits=True))])

    # ---- fused linear: hidden states + both heads, the student head trains ----
    sizes = [(8192, 2048, 32000), (8192, 2048, 128256)] if cuda else [(256, 64, 1000)]
    for Nl, H, Vl in sizes[:1] if quick else sizes:
        lshape = f"{Nl}x{H}->{Vl} {str(dtype).replace('torch.', '')} T={T}"
        big = Vl > 32000

        def make_linear(Nl=Nl, H=H, Vl=Vl):
            h = _rand((Nl, H), device, dtype, grad=True)
            W = _rand((Vl, H), device, dtype, H**-0.5, grad=True)
            th = _rand((Nl, H), device, dtype)
            tW = _rand((Vl, H), device, dtype, H**-0.5)
            return h, W, th, tW, make_labels(Nl, Vl)

        def eager_linear(h, W, th, tW, labels):
            return eager_loss(h @ W.t(), th @ tW.t(), labels)

        def build_linear(fn, **kwargs):
            h, W, th, tW, labels = make_linear()
            return _step(lambda: fn(h, W, th, tW, labels, **kwargs), [h, W])

        def gemm_floor(make_linear=make_linear):
            h, W, th, tW, _ = make_linear()
            h, W = h.detach(), W.detach()

            def four():
                g = h @ W.t()
                th @ tW.t()
                g @ W
                g.t() @ h

            return Workload(four, None, "the four head GEMMs alone (student, teacher, dh, dW): holds the logits")

        def liger_linear(build_linear=build_linear):
            mod = liger("liger_kernel.chunked_loss")
            loss = mod.LigerFusedLinearJSDLoss(weight_hard_loss=1 - alpha, weight_soft_loss=alpha, beta=0.0,
                                               temperature=T)
            work = build_linear(lambda h, W, th, tW, labels: loss(h, W, th, tW, labels))
            work.note = "LigerFusedLinearJSDLoss(beta=0): forward KL, chunked, torch.compile'd chunks"
            return work

        def linear_record(Nl=Nl, H=H, Vl=Vl):
            from peft_kernels.ops.distill_linear import LinearDistillInputs, auto_chunk_size

            h, th = (torch.empty((Nl, H), device=device, dtype=dtype) for _ in range(2))
            W, tW = (torch.empty((Vl, H), device=device, dtype=dtype) for _ in range(2))
            return LinearDistillInputs(h, W, None, None, None, th, tW, None, None,
                                       torch.empty(Nl, device=device, dtype=torch.long), None, 1.0, T, alpha, -100,
                                       "mean", "forward_kl", 0.5, auto_chunk_size(Nl, H, Vl, h.device.type), 0b11)

        cases.append(Case("distill_linear", lshape, "gemm_floor", gemm_floor, floor=True))
        if not big:
            cases += _eager_cases("distill_linear", lshape, device, build_linear, eager_linear)
        cases.append(Case("distill_linear", lshape, "liger", liger_linear))
        ours = _ours_cases("distill_linear", lshape, device, "peft_kernels.ops.distill_linear",
                           "fused_linear_distillation_loss",
                           lambda fn, b=build_linear: b(lambda h, W, th, tW, labels: fn(
                               h, W, th, tW, labels, temperature=T, alpha=alpha)), inputs=linear_record)
        cases += [c for c in ours if not big or c.variant == "ours_auto"]
    return cases


FAMILIES: dict[str, Callable[[str, bool], list[Case]]] = {
    "lora": lora_cases,
    "bias_only": bias_only_cases,
    "prefix_attention": prefix_attention_cases,
    "adapter": adapter_cases,
    "prompt": prompt_cases,
    "distill": distill_cases,
}


def build_cases(families: Sequence[str], device: str, quick: bool = False) -> list[Case]:
    cases: list[Case] = []
    for fam in families:
        cases += FAMILIES[fam](device, quick)
    return cases
