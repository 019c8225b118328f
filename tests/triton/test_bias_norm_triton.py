"""Triton bias-only norm kernels (peft_kernels/triton/bias_norm.py) vs float64 math: LayerNorm and RMSNorm,
odd shapes, fp32 and fp16 under TRITON_INTERPRET=1 (bf16 added on a GPU); the backward is one kernel over x and dy
plus the fixed-order db reduction (launches counted), deterministic."""

import pytest
import torch

from tests.helpers import INTERPRET, assert_close, assert_within_eager_error, triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

from peft_kernels import _config  # noqa: E402
from peft_kernels.ops.bias_norm import bias_only_norm_reference  # noqa: E402
from peft_kernels.triton import bias_norm as tn  # noqa: E402
from peft_kernels.triton import bias_only as tb  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" and not INTERPRET else [])


class _Spy:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture(autouse=True)
def _poison():
    with _config.poison():
        yield


def _inputs(M, H, dtype, param_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * M + H)
    x = (torch.randn(M, H, generator=g) * 2 + 0.3).to(dtype).to(DEV)
    w = (1 + 0.3 * torch.randn(H, generator=g)).to(param_dtype).to(DEV)
    b = torch.randn(H, generator=g).to(param_dtype).to(DEV)
    dy = torch.randn(M, H, generator=g).to(dtype).to(DEV)
    return x, w, b, dy


def _oracle(x, w, b, dy, eps, rms, dtype=torch.float64):
    xg, bg = x.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)
    y = bias_only_norm_reference(xg, w.to(dtype), bg, eps, rms, upcast=dtype == torch.float64)
    y.backward(dy.to(dtype))
    return y.detach(), xg.grad, bg.grad


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, H", [(1, 80), (123, 431), (37, 80)])
def test_matches_float64(M, H, dtype, rms, monkeypatch):
    spies = {n: _Spy(getattr(tn, n)) for n in ("_bias_norm_fwd_kernel", "_bias_norm_bwd_kernel")}
    for n, s in spies.items():
        monkeypatch.setattr(tn, n, s)
    reduce_spy = _Spy(tb._reduce_rows_kernel)
    monkeypatch.setattr(tb, "_reduce_rows_kernel", reduce_spy)
    x, w, b, dy = _inputs(M, H, dtype)
    y, mean, rstd = tn.bias_norm_forward(x, w, b, 1e-5, rms)
    dx, db = tn.bias_norm_backward(dy, x, w, mean, rstd, rms, True, True, torch.float32)
    y64, dx64, db64 = _oracle(x, w, b, dy, 1e-5, rms)
    assert y.dtype == dtype and dx.dtype == dtype and db.dtype == torch.float32
    assert mean.numel() == (0 if rms else M) and rstd.shape == (M,)
    if dtype == torch.float32:
        assert_close(y, y64.float(), rtol=1e-4, atol=1e-5, name="y")
        assert_close(dx, dx64.float(), rtol=1e-4, atol=1e-4, name="dx")
    else:
        # eager in the same dtype: the module's math with activations in `dtype` (fp32 internals, as torch does)
        ye, dxe, _ = _oracle(x, w, b, dy, 1e-5, rms, dtype=torch.float32)
        assert_within_eager_error(y, ye.to(dtype), y64, name="y")
        assert_within_eager_error(dx, dxe.to(dtype), dx64, name="dx")
    assert_close(db, db64.float(), rtol=1e-5, atol=1e-3, name="db")
    assert [s.launches for s in spies.values()] == [1, 1] and reduce_spy.launches == 1


@pytest.mark.skipif(not INTERPRET, reason="block sizes are overridden under the interpreter only")
@pytest.mark.parametrize("rows", [1, 4])
def test_programs_walk_several_row_blocks(rows):
    """Few rows per tile: each of the (few, under the interpreter) programs walks many row blocks, keeping its
    db running sum across them."""
    x, w, b, dy = _inputs(123, 80, torch.float32, seed=5)
    with _config.override_interpret_blocks(bias_norm=rows):
        y, mean, rstd = tn.bias_norm_forward(x, w, b, 1e-5, False)
        dx, db = tn.bias_norm_backward(dy, x, w, mean, rstd, False, True, True, torch.float32)
    y64, dx64, db64 = _oracle(x, w, b, dy, 1e-5, False)
    assert_close(y, y64.float(), rtol=1e-4, atol=1e-5)
    assert_close(dx, dx64.float(), rtol=1e-4, atol=1e-4)
    assert_close(db, db64.float(), rtol=1e-5, atol=1e-4)


def test_only_db_or_only_dx_and_determinism():
    x, w, b, dy = _inputs(57, 80, torch.float16)
    y, mean, rstd = tn.bias_norm_forward(x, w, b, 1e-5, True)
    dx, db = tn.bias_norm_backward(dy, x, w, mean, rstd, True, False, True, torch.float32)
    dx2, db2 = tn.bias_norm_backward(dy, x, w, mean, rstd, True, True, False, torch.float32)
    _, db3 = tn.bias_norm_backward(dy, x, w, mean, rstd, True, True, True, torch.float32)
    assert dx is None and db2 is None and dx2 is not None
    assert torch.equal(db, db3)
    _, dx64, db64 = _oracle(x, w, b, dy, 1e-5, True)
    assert_close(db, db64.float(), rtol=1e-5, atol=1e-3)


def test_empty_and_why_not():
    x, w, b, dy = _inputs(4, 80, torch.float32)
    y, mean, rstd = tn.bias_norm_forward(x[:0], w, b, 1e-5, False)
    dx, db = tn.bias_norm_backward(dy[:0], x[:0], w, mean, rstd, False, True, True, torch.float32)
    assert y.shape == (0, 80) and dx.shape == (0, 80) and torch.equal(db, torch.zeros(80, device=DEV))
    assert tn.why_not(x) is None
    assert "dtype" in tn.why_not(x.double())
    assert "hidden size" in tn.why_not(torch.empty(1, tn.MAX_HIDDEN + 1, device=DEV))
