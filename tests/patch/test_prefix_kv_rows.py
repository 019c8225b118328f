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
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from peft_kernels import _config, use_backend  # noqa: E402
from peft_kernels.patch import prefix_rows  # noqa: E402
from peft_kernels.patch.prefix import apply_prefix_tuning, remove_prefix  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.patch.test_prefix_tuning import inputs, make, make_arch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
PA = sys.modules["peft_kernels.ops.prefix_attention"]
P, B, L = 4, 3, 7
# The Llama-family attentions (qwen2: biased v_proj; v_proj and the rotary k redirected), Phi-3 (v a column block of
# the fused qkv_proj; rotary k, also partial), GPT-2 (k and v column blocks of the fused Conv1D c_attn), BERT/RoBERTa
# (key and value projections, not causal).
KINDS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "phi3_partial", "gpt2", "bert", "roberta"]
ENCODERS = ("bert", "roberta")


def _model(kind):
    if kind in ENCODERS:
        return make(kind)
    if kind == "phi3_partial":
        return make_arch("phi3", partial_rotary_factor=0.5)
    return make_arch(kind)


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


def _step(model, backend, rows=True, kind="llama"):
    """A training step with k/v in reserved rows (rows=True) or as the model computes them (False)."""
    ids, mask, labels = inputs(kind) if kind in ENCODERS else _inputs()
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
    model = _model(kind)
    before = set(model.state_dict())
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    layers = model.config.num_hidden_layers
    redirected = [m for m in model.modules() if isinstance(m, prefix_rows._IntoRows)]  # still the model's classes
    assert len(redirected) == (2 if kind in ENCODERS else 1) * layers  # key + value, else v_proj/qkv_proj/c_attn
    assert all(isinstance(m, (nn.Linear, Conv1D)) for m in redirected)
    assert set(model.state_dict()) - before == {n for n in model.state_dict() if n.startswith("peft_kernels_prefix")}
    logits, grads = _step(model, "concat", kind=kind)
    assert spy.count(True) == 4 * layers and all(spy), spy  # k and v, forward and backward, every layer
    ref_logits, ref_grads = _step(model, "reference", rows=False, kind=kind)  # the model's own k/v, no buffer
    assert_close(logits, ref_logits, rtol=1e-4, atol=2e-5, name="logits")
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=2e-5, name=n)


def test_cache_and_the_cpu_default_leave_kv_alone(monkeypatch):
    made = []  # buffers the producers computed k/v into

    def counted(make_buffer):
        return lambda *args, **kw: made.append(args) or make_buffer(*args, **kw)

    for name in ("reserved_buffer", "prefix_kv_buffer"):
        monkeypatch.setattr(prefix_rows, name, counted(getattr(prefix_rows, name)))
    model = make_arch("llama")
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    ids, mask, _ = _inputs()
    with use_backend("concat", strict=True), _rows(True):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert made  # (the control: redirected)
        made.clear()
        model(input_ids=ids, attention_mask=mask)  # transformers makes a DynamicCache: it concatenates k itself
    assert not made
    with use_backend("concat", strict=True):  # the default on CPU tensors: not reserved (CPU dispatch: LSE merge)
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert not made


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
        prefix_rows._LinearIntoRows.apply(x, lin.weight, lin.bias, 2, False)
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


@pytest.mark.parametrize("model", ["llama", "phi3", "phi3_partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotary_into_rows_is_the_models_rotary_bit_for_bit(dtype, model):
    """Llama's rotary function and Phi-3's (partial rotary: the first cos.shape[-1] features rotated, the rest
    passed through), forward and backward."""
    name = model.split("_")[0]
    mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    partial = prefix_rows._rotary_kind(mod)
    assert partial == (model != "llama")
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, h, 5, 8, generator=g).to(dtype).requires_grad_() for h in (4, 2))
    rd = 4 if model == "phi3_partial" else 8
    cos, sin = (torch.randn(2, 5, rd, generator=g).to(dtype) for _ in range(2))
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    q, k = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k))  # HF layout
    q0, k0 = mod.apply_rotary_pos_emb(q, k, cos, sin)
    ref = torch.autograd.grad((q0, k0), (q, k), (gq, gk))
    wrapped = prefix_rows._rotary_wrapper(mod.apply_rotary_pos_emb, mod.rotate_half, partial)
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
    wrapped = prefix_rows._rotary_wrapper(mod.apply_rotary_pos_emb, mod.rotate_half, False)
    prefix_rows._ACTIVE.rows = 3
    try:
        got = wrapped(q, k, cos, sin)
    finally:
        prefix_rows._ACTIVE.rows = None
    for a, b in zip(got, mod.apply_rotary_pos_emb(q, k, cos, sin)):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_into_rows_matches_the_layer(bias, conv1d):
    """Into reserved rows: nn.Linear (weight [out, in]) or GPT-2's Conv1D (weight [in, out], always a bias), with
    k/v heads viewed out of any block of its columns recognised (a fused q|k|v projection)."""
    if conv1d:
        if not bias:
            pytest.skip("Conv1D always has a bias")
        lin = Conv1D(48, 12)
        nn.init.normal_(lin.bias)
    else:
        lin = nn.Linear(12, 48, bias=bias)
    x = torch.randn(3, 5, 12, requires_grad=True)
    y = prefix_rows._LinearIntoRows.apply(x, lin.weight, lin.bias, 2, conv1d)
    ref = lin(x)
    for block in range(3):  # [q | k | v], 4 heads of 4 each
        heads = y[..., 16 * block:16 * (block + 1)].view(3, 5, 4, 4).transpose(1, 2)
        full = PA.reserved_rows(heads, 2)
        assert full is not None and full.shape == (3, 4, 7, 4) and torch.equal(full[:, :, 2:], heads)
    assert PA.reserved_rows(y[..., 8:24].view(3, 5, 4, 4).transpose(1, 2), 3) is None  # another P
    assert_close(y, ref)
    gy = torch.randn_like(ref)
    params = [x, lin.weight] + ([lin.bias] if bias else [])
    got, want = torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy)
    for a, b in zip(got, want):
        assert a.stride() == b.stride()
        assert_close(a, b)


def test_fused_kv_blocks_of_one_buffer_each_get_their_rows():
    """k and v as two column blocks of one fused projection's buffer: both attended over their own reserved rows (no
    copy), exact; the same block passed as both (or overlapping heads) has rows for one prefix: v is concatenated."""
    from peft_kernels.ops.prefix_kv_buffer import reserved_buffer, share_rows

    g = torch.Generator().manual_seed(0)
    qkv = reserved_buffer(2, 6, 3 * 8, P)
    qkv.copy_(torch.randn(2, 6, 24, generator=g))
    q, k, v = (t.view(2, 6, 2, 4).transpose(1, 2) for t in qkv.split(8, dim=2))
    pk, pv = torch.randn(2, P, 4, generator=g), torch.randn(2, P, 4, generator=g)
    assert not share_rows(k, v) and share_rows(k, k)
    assert share_rows(qkv[..., 4:12].view(2, 6, 2, 4).transpose(1, 2), k)
    dense = [t.contiguous() for t in (q, k, v)]
    with use_backend("reference", strict=True):
        want = PA.prefix_attention(*dense, pk, pv, causal=True)
        want_same = PA.prefix_attention(dense[0], dense[1], dense[1], pk, pv, causal=True)
    seen = []
    original = PA._concat_kv_heads

    def concat_kv_heads(t, prefix, reserved=True):
        seen.append(reserved and PA.reserved_rows(t, prefix.shape[-2]) is not None)
        return original(t, prefix, reserved)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PA, "_concat_kv_heads", concat_kv_heads)
        with use_backend("concat", strict=True):
            got = PA.prefix_attention(q, k, v, pk, pv, causal=True)
            assert seen == [True, True]
            seen.clear()
            same = PA.prefix_attention(q, k, k, pk, pv, causal=True)
            assert seen == [True, False]
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_close(same, want_same, rtol=1e-5, atol=1e-6)


def test_v_proj_per_sequence_rule():
    """On CUDA v_proj computes into the buffer (one GEMM per sequence) only where each GEMM fills ~a wave of SMs."""
    assert prefix_rows.gemm_fills(2048, 4096, 132)  # Llama-2-7B: 16 x 32 tiles per sequence
    assert prefix_rows.gemm_fills(2048, 1024, 132)  # Llama-3-8B (8 KV heads): 128 tiles, ~one wave
    assert not prefix_rows.gemm_fills(2048, 256, 132)  # TinyLlama (4 x 64): 32 tiles; v is copied instead
    assert not prefix_rows.gemm_fills(128, 4096, 132)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "phi3", "gpt2", "bert"])
def test_gpu_model_attends_over_reserved_rows(kind, spy, monkeypatch):
    """On CUDA the rows are reserved under automatic dispatch too (concat forced here to see them used); the
    projections' per-sequence rule forced on for the tiny model."""
    monkeypatch.setattr(prefix_rows, "gemm_fills", lambda rows, n, sms: True)
    model = _model(kind).cuda()
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    ids, mask, labels = (t.cuda() for t in (inputs(kind) if kind in ENCODERS else _inputs()))

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


@pytest.mark.parametrize("kind", ["phi3", "gpt2", "bert"])
def test_remove_restores_fused_and_encoder_producers(kind):
    """qkv_proj / c_attn / key+value get their own classes back (state_dict and pickling as before the patch)."""
    import pickle

    model = _model(kind)
    classes = {n: type(m) for n, m in model.named_modules()}
    apply_prefix_tuning(model, num_virtual_tokens=P, projection=False)
    assert any(isinstance(m, prefix_rows._IntoRows) for m in model.modules())
    clone = pickle.loads(pickle.dumps(model))  # our classes are importable by name
    assert any(isinstance(m, prefix_rows._IntoRows) for m in clone.modules())
    remove_prefix(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
