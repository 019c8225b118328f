"""Triton BitFit kernels (peft_kernels/triton/bias_only.py) vs float64 math.

Under TRITON_INTERPRET=1 on CPU tensors (odd shapes M = 1, 123; K, N = 80, 431; fp32 and fp16 -- bf16 tl.dot is
wrong in the interpreter), or natively on a GPU (bf16 added). Both GEMM paths are forced in turn; launches are
counted: the backward is one dx GEMM (which also produces the db partials) plus one tiny reduction, never a dW
GEMM and never a second pass over dy.
"""

import pytest
import torch

from tests.helpers import INTERPRET, assert_close, assert_within_eager_error, triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

from peft_kernels import _config  # noqa: E402
from peft_kernels.triton import bias_only as tb  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" and not INTERPRET else [])
SHAPES = [(1, 80, 80), (1, 431, 80), (123, 80, 431), (123, 431, 80)]  # M, K, N


class _Spy:
    """Counts launches of a (possibly autotuned) kernel while delegating to it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def spies(monkeypatch):
    names = ["_gemm_tma_kernel", "_gemm_ptr_kernel", "_column_sum_kernel", "_reduce_rows_kernel"]
    out = {n: _Spy(getattr(tb, n)) for n in names}
    for n, spy in out.items():
        monkeypatch.setattr(tb, n, spy)
    return out


@pytest.fixture(autouse=True)
def _poison():
    with _config.poison():  # launchers fill outputs with NaN first: an element a kernel misses shows up
        yield


def _inputs(M, K, N, dtype, bias_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + M * 1000 + K * 10 + N)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEV)

    return rnd(M, K), rnd(N, K, scale=K**-0.5), rnd(N, dt=bias_dtype), rnd(M, N)


def _paths(*tensors):
    return ["pointer"] + (["tma"] if tb.tma_compatible(*tensors) else [])


def _check(got, want_fp64, eager, name):
    if got.dtype == torch.float32:
        assert_close(got, want_fp64.float(), rtol=2e-4, atol=2e-4, name=name)
    else:
        assert_within_eager_error(got, eager, want_fp64, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, N", SHAPES)
def test_forward_and_backward_match_float64(M, K, N, dtype, spies):
    x, W, b, dy = _inputs(M, K, N, dtype)
    xd, Wd, bd, dyd = (t.double() for t in (x, W, b, dy))
    y64, dx64, db64 = xd @ Wd.T + bd, dyd @ Wd, dyd.sum(0)
    for path in _paths(x, W, dy):
        with _config.force_gemm_path(path):
            y = tb.bias_only_forward(x, W, b)
            dx, db = tb.bias_only_backward(dy, W, True, True, torch.float32)
        assert y.dtype == dtype and dx.dtype == dtype and db.dtype == torch.float32
        _check(y, y64, x @ W.T + b.to(dtype), f"y ({path})")
        _check(dx, dx64, dy @ W, f"dx ({path})")
        assert_close(db, db64.float(), rtol=1e-5, atol=1e-4, name=f"db ({path})")
    kernel = {"pointer": "_gemm_ptr_kernel", "tma": "_gemm_tma_kernel"}
    for path in _paths(x, W, dy):
        assert spies[kernel[path]].launches == 2, f"{path}: expected one forward and one dx GEMM"
    assert spies["_column_sum_kernel"].launches == 0, "db must come from the dx GEMM's pass over dy"


def test_backward_launches_one_gemm_no_dw_no_second_dy_pass(spies):
    x, W, b, dy = _inputs(123, 80, 431, torch.float32)
    with _config.force_gemm_path("pointer"):
        dx, db = tb.bias_only_backward(dy, W, True, True, torch.float32)
    assert spies["_gemm_ptr_kernel"].launches == 1 and spies["_reduce_rows_kernel"].launches == 1
    assert spies["_column_sum_kernel"].launches == 0 and spies["_gemm_tma_kernel"].launches == 0
    assert dx.shape == (123, 80) and db.shape == (431,)  # no [N, K] output exists


def test_db_only_is_one_column_pass(spies):
    x, W, b, dy = _inputs(123, 80, 431, torch.float16)
    dx, db = tb.bias_only_backward(dy, W, False, True, torch.float32)
    assert dx is None
    assert_close(db, dy.double().sum(0).float(), rtol=1e-5, atol=1e-3)
    assert spies["_column_sum_kernel"].launches == 1 and spies["_reduce_rows_kernel"].launches == 1
    assert spies["_gemm_ptr_kernel"].launches + spies["_gemm_tma_kernel"].launches == 0


def test_dx_only_skips_the_column_sums(spies):
    x, W, b, dy = _inputs(37, 80, 80, torch.float32)
    dx, db = tb.bias_only_backward(dy, W, True, False, torch.float32)
    assert db is None
    assert_close(dx, (dy.double() @ W.double()).float(), rtol=2e-4, atol=2e-4)
    assert spies["_reduce_rows_kernel"].launches == 0


@pytest.mark.skipif(not INTERPRET, reason="block sizes are overridden under the interpreter only")
@pytest.mark.parametrize("path", ["pointer", "tma"])
@pytest.mark.parametrize("blocks", [(16, 16, 16), (16, 64, 16), (32, 16, 64)])
def test_many_tiles_and_owners(blocks, path):
    """Small tiles: many m tiles and reduction steps, with more or fewer k-tile columns than steps, so every
    program owns several partial slices, or none; on the TMA path each of the few persistent programs also walks
    many tiles."""
    shapes = [(123, 80, 431), (77, 431, 80)] if path == "pointer" else [(123, 80, 160), (77, 160, 80)]
    for M, K, N in shapes:  # more reduction steps than k columns, then fewer
        x, W, b, dy = _inputs(M, K, N, torch.float32, seed=3)
        with _config.override_interpret_blocks(bias_only_gemm=blocks), _config.force_gemm_path(path):
            dx, db = tb.bias_only_backward(dy, W, True, True, torch.float32)
        assert_close(dx, (dy.double() @ W.double()).float(), rtol=2e-4, atol=2e-4, name=f"dx {M}x{K}x{N}")
        assert_close(db, dy.double().sum(0).float(), rtol=1e-5, atol=1e-4, name=f"db {M}x{K}x{N}")


def test_db_is_deterministic_and_in_the_bias_dtype():
    x, W, b, dy = _inputs(123, 80, 80, torch.float16)
    runs = [tb.bias_only_backward(dy, W, True, True, dt)[1] for dt in (torch.float32, torch.float32, torch.float16)]
    assert torch.equal(runs[0], runs[1])
    assert runs[2].dtype == torch.float16
    assert_close(runs[2], runs[0].half(), rtol=0, atol=0)


def test_transposed_weight_view():
    """GPT-2's Conv1D stores W as [K, N]: the layer passes weight.t(), a column-major view."""
    x, W, b, dy = _inputs(33, 80, 80, torch.float32)
    Wt = W.T.contiguous().T  # same values, column-major strides
    for path in _paths(x, Wt, dy):
        with _config.force_gemm_path(path):
            y = tb.bias_only_forward(x, Wt, b)
            dx, db = tb.bias_only_backward(dy, Wt, True, True, torch.float32)
        assert_close(y, (x.double() @ W.double().T + b.double()).float(), rtol=2e-4, atol=2e-4)
        assert_close(dx, (dy.double() @ W.double()).float(), rtol=2e-4, atol=2e-4)


def test_forced_tma_on_misaligned_operands_raises():
    x, W, b, dy = _inputs(5, 80, 431, torch.float16)  # N = 431 halves: a 862-byte row stride
    if not tb.tma_compatible(x):
        pytest.skip("no TMA on this device")
    with _config.force_gemm_path("tma"), pytest.raises(ValueError, match="TMA path forced"):
        tb.bias_only_backward(dy, W, True, True, torch.float32)


def test_empty_batch():
    x, W, b, dy = _inputs(1, 80, 80, torch.float32)
    y = tb.bias_only_forward(x[:0], W, b)
    dx, db = tb.bias_only_backward(dy[:0], W, True, True, torch.float32)
    assert y.shape == (0, 80) and dx.shape == (0, 80)
    assert torch.equal(db, torch.zeros(80, device=DEV))


def test_why_not():
    x, W, _, _ = _inputs(3, 80, 80, torch.float32)
    assert tb.why_not(x, W) is None
    assert "dtype" in tb.why_not(x.double(), W.double())
    if INTERPRET:
        assert "bf16" in tb.why_not(x.bfloat16(), W.bfloat16())
