"""prefix_kv_buffer: K/V computed into a buffer with the prefix rows reserved, attended by the `concat` backend with
no concatenation copy (forward and backward), exact against the float64 reference; the rows in front of any other
tensor are never written."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peft_kernels import prefix_attention, use_backend
from peft_kernels.ops.prefix_attention import prefix_attention_reference
from peft_kernels.ops.prefix_kv_buffer import prefix_kv_buffer, reserved_rows
from tests.helpers import assert_close

B, HQ, L, D, P = 2, 4, 13, 16, 5


class _BigCopies(TorchDispatchMode):
    """Records the aten calls that write a tensor of at least `numel` elements by copying (cat / copy_ / clone /
    contiguous's copy): a K/V concatenation or a layout copy of k, v, dk or dv."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.calls = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        big = isinstance(out, torch.Tensor) and out.numel() >= self.numel
        if big and name in ("cat", "copy_", "clone", "_to_copy"):
            self.calls.append(name)
        return out


def _kv(hkv, reserved, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, L, hkv, D, generator=g).transpose(1, 2) for _ in range(2))
    if not reserved:
        return k.requires_grad_(), v.requires_grad_()
    kb, vb = prefix_kv_buffer(B, L, hkv, D, P), prefix_kv_buffer(B, L, hkv, D, P)
    with torch.no_grad():
        kb.copy_(k)
        vb.copy_(v)
    return kb.requires_grad_(), vb.requires_grad_()


def _prefix(hkv, shared, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (hkv, P, D) if shared else (B, hkv, P, D)
    return [torch.randn(*shape, generator=g).requires_grad_() for _ in range(2)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_batch"])
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("pad", [False, True], ids=["nomask", "padding"])
def test_reserved_rows_exact_and_no_copy(causal, shared, hkv, pad):
    q = torch.randn(B, L, HQ, D, generator=torch.Generator().manual_seed(2)).transpose(1, 2).requires_grad_()
    k, v = _kv(hkv, reserved=True)
    pk, pv = _prefix(hkv, shared)
    mask = None
    if pad:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, -4:] = False
    version = k._version
    grads_seen = {}
    k.register_hook(lambda g: grads_seen.setdefault("k", g))
    copies = _BigCopies(B * L * hkv * D)
    with use_backend("concat", strict=True), copies:
        out = prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=mask)
        grads = torch.autograd.grad(out, (q, k, v, pk, pv), torch.ones_like(out) * 0.5 + q.detach())
    assert copies.calls == [], f"k/v (or their gradients) were copied: {copies.calls}"
    assert k._version == version  # the prefix rows are written through an alias: k's consumers see no change
    assert grads_seen["k"].stride(0) == (P + L) * hkv * D  # dk is a view of dK over [prefix; k]: not copied out

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = prefix_attention_reference(*ref_in, causal=causal, key_padding_mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_in, (torch.ones_like(out) * 0.5 + q.detach()).double())
    assert_close(out, ref.float(), name="out")
    for name, a, b in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, ref_grads):
        assert a.dtype == torch.float32
        assert_close(a, b.float(), name=name)


def test_without_reserved_rows_the_concat_copies():
    """The control for the test above: the same call on ordinary k/v concatenates them (so the spy sees copies)."""
    q = torch.randn(B, HQ, L, D, requires_grad=True)
    k, v = _kv(4, reserved=False)
    pk, pv = _prefix(4, True)
    copies = _BigCopies(B * L * 4 * D)
    with use_backend("concat", strict=True), copies:
        prefix_attention(q, k, v, pk, pv, causal=True).sum().backward()
    assert copies.calls.count("copy_") + copies.calls.count("cat") >= 2


def test_rows_in_front_of_other_tensors_are_never_written():
    """A view with the geometry of a reserved buffer, made by someone else, keeps its rows; so does a reserved buffer
    used with another prefix length, or sliced."""
    full = torch.full((B, P + L, 4, D), 7.0)
    k = full[:, P:].transpose(1, 2)
    assert reserved_rows(k, P) is None
    q = torch.randn(B, 4, L, D)
    pk, pv = (t.detach() for t in _prefix(4, True))
    with use_backend("concat", strict=True):
        out = prefix_attention(q, k, k, pk, pv, causal=True)
    assert torch.equal(full[:, :P], torch.full_like(full[:, :P], 7.0))
    assert_close(out, prefix_attention_reference(q, k, k, pk, pv, causal=True))
    kb = prefix_kv_buffer(B, L, 4, D, P)
    assert reserved_rows(kb, P) is not None
    assert reserved_rows(kb, P - 1) is None
    assert reserved_rows(kb[:, :, : L - 1], P) is None
    assert reserved_rows(kb[:1], P) is None


def test_prefix_kv_buffer_layout_and_arguments():
    kb = prefix_kv_buffer(B, L, 2, D, P, dtype=torch.float16)
    assert kb.shape == (B, 2, L, D) and kb.dtype == torch.float16
    assert kb.stride() == ((P + L) * 2 * D, D, 2 * D, 1)  # transformers' [B, L, H, D] layout, P rows longer
    with pytest.raises(TypeError, match="prefix_kv_buffer: num_prefix must be an int"):
        prefix_kv_buffer(B, L, 2, D, 2.0)
    with pytest.raises(ValueError, match="prefix_kv_buffer: seq_len must be >= 1"):
        prefix_kv_buffer(B, 0, 2, D, P)
    with pytest.raises(TypeError, match="prefix_kv_buffer: batch must be an int"):
        prefix_kv_buffer(True, L, 2, D, P)


def test_reserved_rows_under_torch_compile():
    """The compiled op (its custom ops) takes a reserved buffer too, with the same numbers; its gradients are laid
    out as its fake kernels say (copied, where the eager path returns views)."""
    q = torch.randn(B, HQ, L, D, requires_grad=True)
    k, v = _kv(2, reserved=True)
    pk, pv = _prefix(2, True)

    def f(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, causal=True)

    with use_backend("concat", strict=True):
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, pk, pv)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, pk, pv))
        ref = f(q, k, v, pk, pv)
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, pk, pv))
    assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b)


def test_one_buffer_passed_as_k_and_v():
    """Its reserved rows hold one prefix: v is concatenated instead, and the answer is right (it took prefix_v for
    both halves before)."""
    kv = prefix_kv_buffer(B, L, 2, D, P)
    with torch.no_grad():
        kv.copy_(torch.randn(B, 2, L, D))
    q = torch.randn(B, HQ, L, D)
    pk, pv = (t.detach() for t in _prefix(2, True))
    ref = prefix_attention_reference(q.double(), kv.double(), kv.double(), pk.double(), pv.double(), causal=True)
    for v in (kv, kv.detach()):
        with use_backend("concat", strict=True):
            out = prefix_attention(q, kv, v, pk, pv, causal=True)
        assert_close(out, ref.float())


def test_mixed_qkv_dtypes_under_autocast():
    """As SDPA: under autocast q/k/v are cast to its dtype before they are compared (a model's rotary part leaves
    q/k in fp32 beside a bf16 v_proj output)."""
    q, k = torch.randn(B, HQ, L, D), torch.randn(B, 2, L, D)
    v = torch.randn(B, 2, L, D).bfloat16()
    pk, pv = (t.detach() for t in _prefix(2, True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prefix_attention(q, k, v, pk, pv, causal=True)
    assert out.dtype == torch.bfloat16
    ref = prefix_attention_reference(q.bfloat16().double(), k.bfloat16().double(), v.double(), pk.double(),
                                     pv.double(), causal=True)
    assert_close(out.float(), ref.float(), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="prefix_attention: v has dtype"):
        prefix_attention(q, k, v, pk, pv, causal=True)  # without autocast the mismatch is still an error


def test_prefix_kv_buffer_dtype_argument():
    with pytest.raises(TypeError, match="prefix_kv_buffer: dtype must be a floating torch.dtype"):
        prefix_kv_buffer(B, L, 2, D, P, dtype="float32")
    with pytest.raises(TypeError, match="prefix_kv_buffer: dtype must be a floating torch.dtype"):
        prefix_kv_buffer(B, L, 2, D, P, dtype=torch.int64)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_other_backends_take_reserved_buffers(backend):
    """Dispatch may pick another backend for k/v in a buffer (it measures them all on CUDA): each reads the gapped
    views as any strided tensor, and the answer is the reference's."""
    q = torch.randn(B, HQ, L, D, requires_grad=True)
    k, v = _kv(2, reserved=True)
    pk, pv = _prefix(2, True)
    with use_backend(backend, strict=True):
        out = prefix_attention(q, k, v, pk, pv, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, pk, pv))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = prefix_attention_reference(*ref_in, causal=True)
    assert_close(out, ref.float())
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), ref_in)):
        assert_close(a, b.float())


def test_compiled_with_dispatch_timing_on(monkeypatch):
    """Dispatch timing (CUDA's default) keys on whether k/v are reserved: under torch.compile that key is computed
    without the registry, which dynamo cannot trace (fullgraph failed)."""
    from peft_kernels import _config

    monkeypatch.setattr(_config, "tune_dispatch", lambda device_type: True)
    q = torch.randn(B, HQ, L, D)
    k, v = (t.detach() for t in _kv(2, reserved=False))
    pk, pv = (t.detach() for t in _prefix(2, True))
    f = torch.compile(lambda *a: prefix_attention(*a, causal=True), fullgraph=True, backend="aot_eager")
    assert_close(f(q, k, v, pk, pv), prefix_attention_reference(q, k, v, pk, pv, causal=True))


def test_dispatch_timing_runs_the_backward_as_the_eager_step(monkeypatch):
    """run_once (what dispatch times) runs a backend's backward as the eager step does: gradients may be views (it
    copied dk/dv, charging concat for copies the training step does not make)."""
    import sys

    from peft_kernels import _op

    pa = sys.modules["peft_kernels.ops.prefix_attention"]
    seen = []
    backend = pa.FAMILY.backward_backends["concat"]
    original = backend.run
    monkeypatch.setattr(backend, "run", lambda *a: (seen.append(_op.grads_may_be_views()), original(*a))[1])
    q = torch.randn(B, HQ, L, D, requires_grad=True)
    k, v = _kv(2, reserved=True)
    pk, pv = _prefix(2, True)
    pa.FAMILY.run_once("concat", pa.FAMILY.Inputs(q, k, v, pk, pv, True, None, D**-0.5))
    assert seen == [True]
