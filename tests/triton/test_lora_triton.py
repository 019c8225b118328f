"""Triton LoRA kernels (peft_kernels/triton/lora.py) vs float64 math with the same dropout keep mask.

Runs under TRITON_INTERPRET=1 on CPU tensors (small, odd shapes; fp32 and fp16 -- bf16 tl.dot is wrong in
the interpreter), or natively when CUDA is present (bf16 added). Both GEMM paths (TMA descriptors +
persistent loop, pointer fallback) are forced in turn and checked to be the ones that ran.
"""

import pytest
import torch

from tests.helpers import INTERPRET, assert_close, assert_within_eager_error, triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from peft_kernels.ops.dropout_mask import dropout_keep_mask, normalize_seed, philox_uniform  # noqa: E402
from peft_kernels.triton import lora as tk  # noqa: E402
from peft_kernels.triton.lora import _keep_mask  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" and not INTERPRET else [])
NAMES = ("y", "S", "dx", "dW", "db", "dA", "dB")


def _tma_available() -> bool:
    return INTERPRET or (DEV == "cuda" and torch.cuda.get_device_capability()[0] >= 9)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Launchers fill their outputs with NaN first: an element a kernel fails to write shows up.
    monkeypatch.setattr(tk, "POISON_OUTPUTS", True)


class _Spy:
    """Counts launches of a (autotuned) kernel while delegating to it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def spies(monkeypatch):
    out = {"tma": _Spy(tk._gemm_lora_tma_kernel), "pointer": _Spy(tk._gemm_lora_ptr_kernel)}
    monkeypatch.setattr(tk, "_gemm_lora_tma_kernel", out["tma"])
    monkeypatch.setattr(tk, "_gemm_lora_ptr_kernel", out["pointer"])
    return out


# ------------------------------------------------------------------------------------------------------
# The math, twice: float64 oracle and eager PyTorch in the activation dtype (for the low-precision rule).
# ------------------------------------------------------------------------------------------------------


def _math(x, W, b, A, B, s, p, seed, dy, dtype):
    M, K = x.shape
    keep = dropout_keep_mask(seed, M, K, p, x.device).to(dtype)
    x, W, A, B, dy = (t.to(dtype) for t in (x, W, A, B, dy))
    b = b.to(dtype) if b is not None else None
    xd = x * keep / (1 - p)
    S = xd @ A.T
    y = x @ W.T + s * (S @ B.T)
    if b is not None:
        y = y + b
    G = s * (dy @ B)
    dx = dy @ W + keep / (1 - p) * (G @ A)
    return {"y": y, "S": S, "dx": dx, "dW": dy.T @ x, "db": dy.sum(0), "dA": G.T @ xd, "dB": s * (dy.T @ S)}


def _inputs(M, K, N, r, dtype, bias, adapter_dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * M + 10 * K + N + r)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dt)

    x = rnd(M, K)
    W = rnd(N, K, scale=K**-0.5)
    b = rnd(N) if bias else None
    A = rnd(r, K, scale=K**-0.5, dt=adapter_dtype)
    B = rnd(N, r, scale=r**-0.5, dt=adapter_dtype)  # nonzero B (not peft's zero init): the LoRA term counts
    dy = rnd(M, N)
    return x, W, b, A, B, dy


def _run(x, W, b, A, B, dy, s, p, seed, needs=(True,) * 5):
    y, S = tk.lora_forward(x, W, b, A, B, s, p, seed)
    grads = tk.lora_backward(dy, x, W, A, B, S, s, p, seed, *needs)
    return dict(zip(NAMES, (y, S, *grads)))


def _check(out, x, W, b, A, B, dy, s, p, seed, names=NAMES):
    dtype = x.dtype
    oracle = _math(x, W, b, A, B, s, p, seed, dy, torch.float64)
    eager = _math(x, W, b, A, B, s, p, seed, dy, dtype) if dtype != torch.float32 else None
    expected_dtype = {
        "y": dtype,
        "S": dtype,
        "dx": dtype,
        "dW": W.dtype,
        "db": W.dtype,
        "dA": A.dtype,
        "dB": B.dtype,
    }
    for name in names:
        o, ref = out[name], oracle[name]
        assert o is not None, name
        assert o.dtype == expected_dtype[name], f"{name}: dtype {o.dtype}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values (unwritten poison?)"
        if dtype == torch.float32:
            # ieee fp32 dots: only summation-order differences against float64.
            scale = max(1.0, ref.abs().max().item())
            assert_close(o, ref, dtype=torch.float32, rtol=1e-4, atol=1e-5 * scale, name=name)
        else:
            assert_within_eager_error(o, eager[name], ref, factor=2.0, floor=1e-5, name=name)


# ------------------------------------------------------------------------------------------------------
# The mask: the kernels' tl.rand use is bit-identical to ops.dropout_mask.
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _rand_probe(out_ptr, off_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    off = tl.load(off_ptr + i, mask=m, other=0).to(tl.uint32)
    tl.store(out_ptr + i, tl.rand(seed, off), mask=m)


@triton.jit
def _keep_probe(out_ptr, seed, p, row0, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_C)
    keep = _keep_mask(seed, p, row0 + rr, cc, n_cols)
    tl.store(out_ptr + rr[:, None] * BLOCK_C + cc[None, :], keep.to(tl.int8))


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**31 + 7, 2**40 + 3, 2**63 + 5])
def test_philox_uniform_matches_tl_rand(seed):
    offs = torch.cat(
        [
            torch.arange(0, 200),
            torch.tensor([2**31 - 1, 2**31, 2**31 + 5, 3_000_000_000, 2**32 - 1]),
            torch.randint(0, 2**32, (300,), generator=torch.Generator().manual_seed(seed % 1000)),
        ]
    ).to(device=DEV, dtype=torch.int64)
    out = torch.full((offs.numel(),), float("nan"), device=DEV)
    # The launchers pass normalize_seed(seed); do the same here.
    _rand_probe[(triton.cdiv(offs.numel(), 128),)](out, offs, normalize_seed(seed), offs.numel(), BLOCK=128)
    ref = philox_uniform(seed, offs)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("row0,n_cols", [(0, 37), (2**31 // 1031 - 8, 1031), (2**22 + 3, 1031)])
def test_kernel_keep_mask_wraps_like_reference(row0, n_cols):
    # Rows far down a tall activation: flat offsets cross 2**31 and 2**32 (wrapped to uint32).
    seed, p, R, C = 2**40 + 3, 0.3, 16, 32
    out = torch.full((R, C), -1, dtype=torch.int8, device=DEV)
    _keep_probe[(1,)](out, normalize_seed(seed), p, row0, n_cols, BLOCK_R=R, BLOCK_C=C)
    rows = torch.arange(row0, row0 + R, device=DEV, dtype=torch.int64)[:, None]
    cols = torch.arange(C, device=DEV, dtype=torch.int64)[None, :]
    u = philox_uniform(seed, rows * n_cols + cols)
    assert torch.equal(out.bool(), u >= torch.tensor(p, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------------
# Forward + all five gradients, both paths.
# ------------------------------------------------------------------------------------------------------

SHAPES = [  # M, K, N, r
    (1, 40, 72, 8),
    (17, 100, 40, 1),
    (17, 72, 40, 64),
    (123, 72, 100, 16),
    (123, 40, 72, 1),
]


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}r{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["pointer", "tma"])
def test_forward_backward(path, dtype, shape, bias, p, spies):
    if path == "tma" and not _tma_available():
        pytest.skip("TMA path needs a Hopper+ GPU")
    M, K, N, r = shape
    x, W, b, A, B, dy = _inputs(M, K, N, r, dtype, bias)
    s, seed = 0.75, 2**40 + 12345
    with tk.force_path(path):
        if path == "tma" and not tk.tma_compatible(x, W, dy):
            # 16-byte strides impossible (e.g. fp16 with 100 columns): forcing TMA must fail loudly.
            with pytest.raises(ValueError, match="TMA"):
                _run(x, W, b, A, B, dy, s, p, seed)
            return
        out = _run(x, W, b, A, B, dy, s, p, seed)
    _check(out, x, W, b, A, B, dy, s, p, seed)
    other = "pointer" if path == "tma" else "tma"
    assert spies[path].launches == 3 and spies[other].launches == 0  # y, dx, dW


def test_auto_path_falls_back_to_pointer(spies):
    # fp16 rows of 100 elements are 200 bytes: not 16-byte aligned, TMA cannot take them.
    x, W, b, A, B, dy = _inputs(17, 100, 40, 8, torch.float16, True)
    assert not tk.tma_compatible(x, W)
    out = _run(x, W, b, A, B, dy, 0.5, 0.1, 3)
    _check(out, x, W, b, A, B, dy, 0.5, 0.1, 3)
    assert spies["pointer"].launches == 3 and spies["tma"].launches == 0
    if _tma_available():
        x, W, b, A, B, dy = _inputs(17, 40, 72, 8, torch.float16, True)
        _run(x, W, b, A, B, dy, 0.5, 0.1, 3)
        assert spies["tma"].launches == 3


@pytest.mark.parametrize("path", ["pointer", "tma"])
def test_rank_128_and_low_precision_adapters(path):
    if path == "tma" and not _tma_available():
        pytest.skip("TMA path needs a Hopper+ GPU")
    x, W, b, A, B, dy = _inputs(33, 40, 72, 128, torch.float16, False)
    with tk.force_path(path):
        out = _run(x, W, b, A, B, dy, 2.0, 0.1, 77)
    _check(out, x, W, b, A, B, dy, 2.0, 0.1, 77)
    # Adapter weights in the activation dtype: gradients come back in that dtype.
    x, W, b, A, B, dy = _inputs(33, 40, 72, 8, torch.float16, True, adapter_dtype=torch.float16)
    with tk.force_path(path):
        out = _run(x, W, b, A, B, dy, 0.5, 0.0, 5)
    assert out["dA"].dtype == torch.float16 and out["dB"].dtype == torch.float16
    _check(out, x, W, b, A, B, dy, 0.5, 0.0, 5)


@pytest.mark.parametrize(
    "needs",
    [
        (True, False, False, False, False),
        (False, False, False, True, True),
        (False, False, True, False, False),
        (False, True, False, False, True),
        (True, False, True, True, False),
    ],
)
def test_gradient_subsets(needs):
    x, W, b, A, B, dy = _inputs(17, 40, 72, 8, torch.float32, True)
    out = _run(x, W, b, A, B, dy, 0.5, 0.1, 11, needs=needs)
    wanted = [n for n, want in zip(NAMES[2:], needs) if want]
    for n, want in zip(NAMES[2:], needs):
        assert (out[n] is not None) == want, n
    _check(out, x, W, b, A, B, dy, 0.5, 0.1, 11, names=("y", "S", *wanted))


@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_strided_activations(layout):
    # Non-contiguous x / dy: a column slice (row stride > K) or transposed storage.
    M, K, N, r = 19, 40, 72, 8
    x, W, b, A, B, dy = _inputs(M, K, N, r, torch.float32, True)
    if layout == "row_slice":
        xs = torch.zeros(M, K + 8, device=DEV)
        xs[:, 3 : 3 + K] = x  # base pointer 12 bytes in: TMA-incompatible, pointer path serves
        x = xs[:, 3 : 3 + K]
        assert not tk.tma_compatible(x)
    else:
        x = x.t().contiguous().t()
        dy = dy.t().contiguous().t()
    out = _run(x, W, b, A, B, dy, 0.5, 0.1, 21)
    _check(out, x, W, b, A, B, dy, 0.5, 0.1, 21)


def test_deterministic_mode_matches_and_repeats():
    x, W, b, A, B, dy = _inputs(123, 40, 72, 16, torch.float32, True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out1 = _run(x, W, b, A, B, dy, 0.5, 0.1, 8)
        out2 = _run(x, W, b, A, B, dy, 0.5, 0.1, 8)
    finally:
        torch.use_deterministic_algorithms(before)
    _check(out1, x, W, b, A, B, dy, 0.5, 0.1, 8)
    for n in NAMES:
        assert torch.equal(out1[n], out2[n]), n


def test_empty_batch_and_seed_changes_mask():
    x, W, b, A, B, dy = _inputs(1, 40, 72, 8, torch.float32, True)
    out = _run(x[:0], W, b, A, B, dy[:0], 0.5, 0.1, 1)
    assert out["y"].shape == (0, 72) and out["S"].shape == (0, 8) and out["dx"].shape == (0, 40)
    for n, shape in (("dW", (72, 40)), ("db", (72,)), ("dA", (8, 40)), ("dB", (72, 8))):
        assert out[n].shape == shape and not out[n].any(), n
    x, W, b, A, B, dy = _inputs(17, 40, 72, 8, torch.float32, False)
    s1 = tk.lora_forward(x, W, b, A, B, 1.0, 0.5, 1)[1]
    s2 = tk.lora_forward(x, W, b, A, B, 1.0, 0.5, 2)[1]
    assert not torch.equal(s1, s2)


def test_supports_and_validation():
    x, W, b, A, B, dy = _inputs(4, 40, 72, 8, torch.float32, False)
    assert tk.supports(x, W, A) == (True, "")
    cases = [
        ((x[None], W, A), "2-D"),
        ((x, W.double(), A), "weight dtype"),
        ((x.double(), W.double(), A), "x dtype"),
        ((x, W[:, :39], A), "in_features"),
        ((x, W, torch.zeros(129, 40, device=DEV)), "rank"),
    ]
    if INTERPRET:
        cases.append(((x.bfloat16(), W.bfloat16(), A), "bf16"))
    for args, why in cases:
        ok, reason = tk.supports(*args)
        assert not ok and why in reason, (why, reason)
    with pytest.raises(ValueError, match="dropout_p"):
        tk.lora_forward(x, W, b, A, B, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="lora_B"):
        tk.lora_forward(x, W, b, A, B[:, :4], 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="rank"):
        big_A, big_B = torch.zeros(129, 40, device=DEV), torch.zeros(72, 129, device=DEV)
        tk.lora_forward(x, W, b, big_A, big_B, 1.0, 0.0, 0)
    if _tma_available():
        assert tk.tma_compatible(x, W, W.t())
        assert not tk.tma_compatible(x[:, 1:])  # base pointer 4 bytes in
        assert not tk.tma_compatible(torch.zeros(4, 10, dtype=torch.float16, device=DEV))  # 20-byte rows
