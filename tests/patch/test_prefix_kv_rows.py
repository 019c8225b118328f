"""Prefix tuning computes k/v straight into prefix_kv_buffer rows (v_proj and the rotary embedding of k redirected),
so the concat backend attends over [prefix; k] without a copy: the same logits and gradients as the model's own code,
the rows really used, everything restored by remove_prefix (also after copy.deepcopy)."""

import contextlib
import copy
import dataclasses
import gc
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from peft_kernels import _config, use_backend  # noqa: E402
from peft_kernels.patch import prefix_rows  # noqa: E402
from peft_kernels.patch.prefix import apply_prefix_tuning, remove_prefix  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.patch.test_prefix_tuning import make_arch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
PA = sys.modules["peft_kernels.ops.prefix_attention"]
P, B, L = 4, 3, 7
KINDS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]  # the Llama-family attentions (qwen2: biased v_proj)


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[2, -3:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


@contextlib.contextmanager
def _rows(enabled):
    """PEFT_KERNELS_PREFIX_ROWS as the process would read it (1: also on CPU tensors, 0: never)."""
    saved = _config.SETTINGS
    _config.SETTINGS = dataclasses.replace(saved, prefix_rows=enabled)
    try:
        yield
    finally:
        _config.SETTINGS = saved


def _step(model, backend, rows=True):
    """A training step with k/v in reserved rows (rows=True) or as the model computes them (False)."""
    ids, mask, labels = _inputs()
    model.zero_grad(set_to_none=True)
    with use_backend(backend, strict=True), _rows(rows):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def spy(monkeypatch):
    """Whether each k/v the concat backend attends over was in a prefix_kv_buffer."""
    seen = []
    original = PA._concat_kv_heads

    def concat_kv_heads(t, prefix, reserved=True):
        seen.append(reserved and PA.reserved_rows(t, prefix.shape[-2]) is not None)
        return original(t, prefix, reserved)

    monkeypatch.setattr(PA, "_concat_kv_heads", concat_kv_heads)
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_rows_reserved_and_same_numbers(kind, spy):
    model = make_arch(kind)
    before = set(model.state_dict())
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    attn = model.model.layers[0].self_attn
    assert type(attn.v_proj) is prefix_rows._RowsLinear and isinstance(attn.v_proj, nn.Linear)
    assert set(model.state_dict()) - before == {n for n in model.state_dict() if n.startswith("peft_kernels_prefix")}
    logits, grads = _step(model, "concat")
    layers = model.config.num_hidden_layers
    assert spy.count(True) == 4 * layers and all(spy), spy  # k and v, forward and backward, every layer
    ref_logits, ref_grads = _step(model, "reference", rows=False)  # the model's own k/v, no buffer
    assert_close(logits, ref_logits, rtol=1e-4, atol=2e-5, name="logits")
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=2e-5, name=n)


def test_cache_and_the_cpu_default_leave_kv_alone(spy):
    model = make_arch("llama")
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    ids, mask, _ = _inputs()
    with use_backend("concat", strict=True), _rows(True):
        model(input_ids=ids, attention_mask=mask)  # transformers makes a DynamicCache: it concatenates k itself
    assert spy and not any(spy)
    spy.clear()
    with use_backend("concat", strict=True):  # the default on CPU tensors: not reserved (CPU dispatch: LSE merge)
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert spy and not any(spy)


def test_remove_restores_and_deepcopy_keeps_its_own():
    mod = importlib.import_module("transformers.models.llama.modeling_llama")
    gc.collect()  # models of earlier tests dropped without remove_prefix: no longer relying on the replacement
    original = prefix_rows._ROTARY.get(mod.__name__, (mod.apply_rotary_pos_emb,))[0]
    model = make_arch("llama")
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    assert mod.apply_rotary_pos_emb is not original and mod.apply_rotary_pos_emb.__wrapped__ is original
    clone = copy.deepcopy(model)
    remove_prefix(clone)
    assert type(clone.model.layers[0].self_attn.v_proj) is nn.Linear
    assert not clone.model.layers[0].self_attn._forward_pre_hooks
    assert mod.apply_rotary_pos_emb is not original  # the original model still relies on it
    assert type(model.model.layers[0].self_attn.v_proj) is prefix_rows._RowsLinear
    logits, _ = _step(model, "concat")
    remove_prefix(model)
    assert mod.apply_rotary_pos_emb is original
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear
    assert not model.model.layers[0].self_attn._forward_pre_hooks and not model.model.layers[0].self_attn._forward_hooks
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)  # patch again: works as the first time
    assert type(model.model.layers[0].self_attn.v_proj) is prefix_rows._RowsLinear
    remove_prefix(model)
    assert mod.apply_rotary_pos_emb is original


def test_gradient_checkpointing(spy):
    model = make_arch("llama").train()
    model.gradient_checkpointing_enable()
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    logits, grads = _step(model, "concat")
    assert spy and all(spy)
    ref_logits, ref_grads = _step(model, "reference", rows=False)
    assert_close(logits, ref_logits, rtol=1e-4, atol=2e-5)
    for n in grads:
        assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=2e-5, name=n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_as_its_forward_ran(reentrant, spy):
    """The recomputation inside the backward redirects k/v exactly as the forward did, whatever ran in between
    (here: a cached generation-style forward, and the backend switch ended) -- checkpointing compares what each
    saved (it raised CheckpointError: 32 vs 31 tensors)."""
    model = make_arch("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # (reentrant checkpoints pass gradients only to inputs that need them)
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    ids, mask, labels = _inputs()
    with _rows(True):
        with use_backend("concat", strict=True):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # a KV cache: nothing reserved in this one
        model.train()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(spy)
    _, ref_grads = _step(model, "reference", rows=False)
    for n in grads:
        assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=2e-5, name=n)


def test_frozen_v_proj_keeps_no_input_alive():
    """What the redirected v_proj saves for backward is what F.linear saves: with a frozen weight, not its input
    (it kept x, one [B, L, hidden] activation per layer)."""
    lin = nn.Linear(12, 16).requires_grad_(False)
    x = torch.randn(3, 5, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        prefix_rows._LinearIntoRows.apply(x, lin.weight, lin.bias, 2, 4)
    assert tuple(x.shape) not in [tuple(s) for s in saved]


def test_batch_of_one_is_recognised(spy):
    """B = 1: the model's .view gives the batch dim another stride (any stride is valid for a size-1 dim)."""
    model = make_arch("llama")
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    ids = _inputs()[0][:1]
    with use_backend("concat", strict=True), _rows(True):
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    assert spy and all(spy)


def test_patched_model_under_cpu_autocast():
    """Rotary leaves q/k in fp32 beside v_proj's bf16 output under autocast; the patched model runs as SDPA's does."""
    model = make_arch("llama")
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    ids, mask, labels = _inputs()
    fp32 = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(loss) and abs(loss.item() - fp32.item()) < 0.05 * abs(fp32.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotary_into_rows_is_the_models_rotary_bit_for_bit(dtype):
    mod = importlib.import_module("transformers.models.llama.modeling_llama")
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, h, 5, 8, generator=g).to(dtype).requires_grad_() for h in (4, 2))
    cos, sin = (torch.randn(2, 5, 8, generator=g).to(dtype) for _ in range(2))
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    q, k = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k))  # HF layout
    q0, k0 = mod.apply_rotary_pos_emb(q, k, cos, sin)
    ref = torch.autograd.grad((q0, k0), (q, k), (gq, gk))
    wrapped = prefix_rows._rotary_wrapper(mod.apply_rotary_pos_emb, mod.rotate_half)
    prefix_rows._ACTIVE.rows = 3
    try:
        q1, k1 = wrapped(q, k, cos, sin)
    finally:
        prefix_rows._ACTIVE.rows = None
    assert PA.reserved_rows(k1, 3) is not None
    assert torch.equal(q1, q0) and torch.equal(k1, k0)
    gk_rows = torch.empty_like(k1).copy_(gk)  # the upstream gradient as the concat backend returns it: in the buffer
    got = torch.autograd.grad((q1, k1), (q, k), (gq, gk_rows))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert got[1].stride() == k.stride()  # dk in k's layout: the k_proj backward views it without a copy


def test_rotary_falls_back_to_the_models_own_with_its_arguments():
    """Where the redirect does not apply (cos/sin of another dtype than k), the model's function gets the cos/sin it
    was given (it got them unsqueezed twice: 5-D q/k)."""
    mod = importlib.import_module("transformers.models.llama.modeling_llama")
    q, k = torch.randn(2, 4, 5, 8).bfloat16(), torch.randn(2, 2, 5, 8).bfloat16()
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    wrapped = prefix_rows._rotary_wrapper(mod.apply_rotary_pos_emb, mod.rotate_half)
    prefix_rows._ACTIVE.rows = 3
    try:
        got = wrapped(q, k, cos, sin)
    finally:
        prefix_rows._ACTIVE.rows = None
    for a, b in zip(got, mod.apply_rotary_pos_emb(q, k, cos, sin)):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_into_rows_matches_linear(bias):
    lin = nn.Linear(12, 16, bias=bias)
    x = torch.randn(3, 5, 12, requires_grad=True)
    y = prefix_rows._LinearIntoRows.apply(x, lin.weight, lin.bias, 2, 4)
    ref = F.linear(x, lin.weight, lin.bias)
    assert PA.reserved_rows(y.view(3, 5, 4, 4).transpose(1, 2), 2) is not None
    assert_close(y, ref)
    gy = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, lin.weight] + ([lin.bias] if bias else []), gy)
    want = torch.autograd.grad(ref, [x, lin.weight] + ([lin.bias] if bias else []), gy)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_v_proj_per_sequence_rule():
    """On CUDA v_proj computes into the buffer (one GEMM per sequence) only where each GEMM fills ~a wave of SMs."""
    assert prefix_rows.gemm_fills(2048, 4096, 132)  # Llama-2-7B: 16 x 32 tiles per sequence
    assert prefix_rows.gemm_fills(2048, 1024, 132)  # Llama-3-8B (8 KV heads): 128 tiles, ~one wave
    assert not prefix_rows.gemm_fills(2048, 256, 132)  # TinyLlama (4 x 64): 32 tiles; v is copied instead
    assert not prefix_rows.gemm_fills(128, 4096, 132)


@pytest.mark.gpu
def test_gpu_model_attends_over_reserved_rows(spy, monkeypatch):
    """On CUDA the rows are reserved under automatic dispatch too (concat forced here to see them used); v_proj's
    per-sequence rule forced on for the tiny model."""
    monkeypatch.setattr(prefix_rows, "gemm_fills", lambda rows, n, sms: True)
    model = make_arch("llama").cuda()
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    ids, mask, labels = (t.cuda() for t in _inputs())

    def step(backend):
        model.zero_grad(set_to_none=True)
        with use_backend(backend, strict=True):
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    logits, grads = step("concat")
    assert spy and all(spy)
    with _rows(False):
        ref_logits, ref_grads = step("reference")
    assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3, name="logits")
    for n in grads:
        assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-3, name=n)
