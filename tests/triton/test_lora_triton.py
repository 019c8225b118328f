"""Triton LoRA kernels (peft_kernels/triton/lora.py) vs float64 math with the same dropout keep mask.

Runs under TRITON_INTERPRET=1 on CPU tensors (small, odd shapes; fp32 and fp16 -- bf16 tl.dot is wrong in
the interpreter), or natively when CUDA is present (bf16 added). Both GEMM paths (TMA descriptors +
persistent loop, pointer fallback) are forced in turn and checked to be the ones that ran. Launches per
forward + backward are counted (Triton launches through ``launch_hook``, ATen kernels by a dispatch mode).
"""

import pytest
import torch

from tests.helpers import INTERPRET, assert_close, assert_within_eager_error, triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from peft_kernels import _config  # noqa: E402
from peft_kernels.ops.dropout_mask import (  # noqa: E402
    dropout_bits,
    dropout_keep_mask,
    keep_threshold,
    normalize_seed,
    philox4x32,
)
from peft_kernels.triton import lora as tk  # noqa: E402
from peft_kernels.triton.lora import _keep_tile  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" and not INTERPRET else [])
NAMES = ("y", "S", "dx", "dW", "db", "dA", "dB")


def _tma_available() -> bool:
    return INTERPRET or (DEV == "cuda" and torch.cuda.get_device_capability()[0] >= 9)


@pytest.fixture(autouse=True)
def _poison():
    # Launchers fill their outputs with NaN first: an element a kernel fails to write shows up.
    with _config.poison():
        yield


class _Launches:
    """Counts Triton launches per kernel (through tk.launch_hook) while running them."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        self.kernels: list[object] = []
        self.paused = None  # set by _AtenCount: no ATen counting inside a Triton launch (the interpreter copies)
        real = tk.launch_hook

        def hook(name, kernel, grid, *args, **kwargs):
            self.names.append(name)
            self.kernels.append(kernel)
            if self.paused is None:
                return real(name, kernel, grid, *args, **kwargs)
            with self.paused():
                return real(name, kernel, grid, *args, **kwargs)

        monkeypatch.setattr(tk, "launch_hook", hook)

    def count(self, kernel) -> int:
        return sum(k is kernel for k in self.kernels)


@pytest.fixture
def launches(monkeypatch):
    return _Launches(monkeypatch)


@pytest.fixture
def spies(launches):
    class _Spies(dict):
        def __getitem__(self, path):
            kernel = tk._gemm_lora_tma_kernel if path == "tma" else tk._gemm_lora_ptr_kernel
            return type("Spy", (), {"launches": launches.count(kernel)})

    return _Spies()


# ATen ops that launch no kernel (allocation without fill, views, metadata).
_NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "t", "transpose", "view", "_unsafe_view",
    "as_strided", "slice", "select", "detach", "alias", "expand", "unsqueeze", "squeeze", "permute", "reshape",
    "_reshape_alias", "lift_fresh", "is_same_size", "sym_size", "sym_stride", "sym_numel",
}  # fmt: skip


class _AtenCount(TorchDispatchMode):
    """ATen ops that run a kernel on the device (everything but allocations and views)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.off = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.off and name not in _NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


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
def _philox_probe(out_ptr, q_ptr, row_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    q = tl.load(q_ptr + i, mask=m, other=0).to(tl.uint32)
    r = tl.load(row_ptr + i, mask=m, other=0).to(tl.uint32)
    z = q * 0
    w0, w1, w2, w3 = tl.philox(seed, q, r, z, z)
    tl.store(out_ptr + i * 4 + 0, w0.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + i * 4 + 1, w1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + i * 4 + 2, w2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + i * 4 + 3, w3.to(tl.int32, bitcast=True), mask=m)


@triton.jit
def _keep_probe(out_ptr, seed, keep_t, row0, col0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_C)
    keep = _keep_tile(seed, keep_t, row0 + rr, col0, BLOCK_R, BLOCK_C)
    tl.store(out_ptr + rr[:, None] * BLOCK_C + cc[None, :], keep.to(tl.int8))


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**31 + 7, 2**40 + 3, 2**63 + 5])
def test_philox4x32_matches_tl_philox(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    q = torch.cat([torch.arange(0, 64), torch.tensor([2**31 - 1, 2**31, 2**32 - 1]),
                   torch.randint(0, 2**32, (200,), generator=g)])  # fmt: skip
    rows = torch.cat([torch.arange(64).flip(0), torch.tensor([0, 2**31 + 5, 2**32 - 1]),
                      torch.randint(0, 2**32, (200,), generator=g)])  # fmt: skip
    q, rows = q.to(DEV), rows.to(DEV)
    out = torch.zeros((q.numel(), 4), dtype=torch.int32, device=DEV)
    # The launchers pass normalize_seed(seed); do the same here.
    _philox_probe[(triton.cdiv(q.numel(), 128),)](out, q, rows, normalize_seed(seed), q.numel(), BLOCK=128)
    ref = torch.stack(philox4x32(seed, q, rows), dim=-1)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, ref)


@pytest.mark.parametrize("row0,col0", [(0, 0), (2**31 - 8, 1032), (2**32 - 16, 2**31)])
@pytest.mark.parametrize("p", [0.3, 0.05, 3276.5 / 65536, 65535 / 65536])
def test_kernel_keep_tile_matches_reference(row0, col0, p):
    # Rows far down a tall activation and columns far right: the counters are (col // 8, row) as uint32.
    # p = 3276.5/65536 rounds up to t = 3277 (as 0.05 does); 65535/65536 keeps only the value 65535.
    seed, R, C = 2**40 + 3, 16, 32
    out = torch.full((R, C), -1, dtype=torch.int8, device=DEV)
    t = keep_threshold(p)
    _keep_probe[(1,)](out, normalize_seed(seed), t, row0, col0, BLOCK_R=R, BLOCK_C=C)
    q = torch.arange(col0 // 8, col0 // 8 + C // 8, device=DEV, dtype=torch.int64)
    rows = torch.arange(row0, row0 + R, device=DEV, dtype=torch.int64)
    c0, c1 = torch.broadcast_tensors(q[None, :], rows[:, None])
    u = torch.stack([h for w in philox4x32(seed, c0, c1) for h in (w & 0xFFFF, w >> 16)], dim=-1).view(R, C)
    assert torch.equal(out.bool(), u >= t)
    if row0 == 0 and col0 == 0:
        assert torch.equal(out.bool(), dropout_keep_mask(seed, R, C, p, DEV))
        assert torch.equal(u, dropout_bits(seed, R, C, DEV).to(torch.int64))


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
    with _config.force_gemm_path(path):
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
    with _config.force_gemm_path(path):
        out = _run(x, W, b, A, B, dy, 2.0, 0.1, 77)
    _check(out, x, W, b, A, B, dy, 2.0, 0.1, 77)
    # Adapter weights in the activation dtype: gradients come back in that dtype.
    x, W, b, A, B, dy = _inputs(33, 40, 72, 8, torch.float16, True, adapter_dtype=torch.float16)
    with _config.force_gemm_path(path):
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
    assert tk.why_not(x, W, A) is None and tk.why_not(x, W, A, B) is None
    cases = [
        ((x[None], W, A), "2-D"),
        ((x, W.double(), A), "weight dtype"),
        ((x.double(), W.double(), A), "x dtype"),
        ((x, W[:, :39], A), "in_features"),
        ((x, W, torch.zeros(129, 40, device=DEV)), "rank"),
    ]
    if INTERPRET:
        cases.append(((x.bfloat16(), W.bfloat16(), A), "bf16"))
    cases.append(((x, W, A, B[:, :4]), "lora_B"))
    cases.append(((x, W, A, B.double()), "lora_B dtype"))
    for args, why in cases:
        reason = tk.why_not(*args)
        assert reason is not None and why in reason, (why, reason)
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


# ------------------------------------------------------------------------------------------------------
# Strided bias, launches per step, pruning by shared memory.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["pointer", "tma"])
def test_strided_bias(path):
    # A bias view with stride 2 (e.g. a slice of a fused parameter): read with its stride, not as contiguous.
    if path == "tma" and not _tma_available():
        pytest.skip("TMA path needs a Hopper+ GPU")
    x, W, _, A, B, dy = _inputs(19, 40, 72, 8, torch.float32, False)
    b = torch.randn(2 * 72, generator=torch.Generator().manual_seed(3)).to(DEV)[::2]
    assert b.stride(0) == 2
    with _config.force_gemm_path(path):
        out = _run(x, W, b, A, B, dy, 0.5, 0.1, 4)
    _check(out, x, W, b, A, B, dy, 0.5, 0.1, 4)


@pytest.mark.parametrize(
    "dropout,needs,adapter_dtype,expected",
    [
        # fwd: S, y. bwd: one zeroed fp32 workspace (dB/dA atomics), the dy pass (G, dB), dx with dA fused.
        (0.0, (True, False, False, True, True), torch.float32, (4, ["zero_"])),
        (0.1, (True, False, False, True, True), torch.float32, (4, ["zero_"])),
        # + db into the workspace, + dW GEMM.
        (0.1, (True, True, True, True, True), torch.float32, (5, ["zero_"])),
        # fp16 activations and adapters: dA and dB come back from the fp32 workspace through one cast each.
        (0.0, (True, False, False, True, True), torch.float16, (4, ["zero_", "_to_copy", "_to_copy"])),
        # no dx (first layer): dA by its own pass over x and its split-M sum.
        (0.0, (False, False, False, True, True), torch.float32, (4, ["zero_", "sum"])),
    ],
)
def test_launches_per_forward_backward(dropout, needs, adapter_dtype, expected, launches):
    M, K, N, r = 33, 40, 72, 8
    x, W, b, A, B, dy = _inputs(M, K, N, r, adapter_dtype, True, adapter_dtype=adapter_dtype)
    aten = _AtenCount()

    @__import__("contextlib").contextmanager
    def paused():
        aten.off += 1
        try:
            yield
        finally:
            aten.off -= 1

    launches.paused = paused
    with _config.poison(False), aten:
        out = _run(x, W, b, A, B, dy, 0.5, dropout, 9, needs=needs)
    ops = [o if o != "zeros" else "zero_" for o in aten.ops]
    n_triton, n_aten = expected
    assert len(launches.names) == n_triton, launches.names
    assert sorted(ops) == sorted(n_aten), ops
    _check(out, x, W, b, A, B, dy, 0.5, dropout, 9, names=("y", "S") + tuple(
        n for n, want in zip(NAMES[2:], needs) if want))  # fmt: skip


def test_split_rule_fills_the_machine():
    # The benchmark shape keeps one split (no partial buffer, no extra launch); small M splits the reduction.
    for programs in (128, 256):  # S at M = 8192 (64/32-row configs), the dy pass (32 rows)
        assert tk._splits(programs, 4096, 256, 132) == (1, 4096)
    assert tk._splits(8, 4096, 256, 132) == (8, 512)  # M = 512: 8 -> 64 programs
    for programs, length, granule in ((1, 4096, 256), (2, 14336, 256), (47, 4096, 256), (1, 150, 32), (3, 4096, 128)):
        k, per = tk._splits(programs, length, granule, 132)
        assert per % granule == 0 or k == 1  # whole granules: no block straddles two splits
        assert (k - 1) * per < length <= k * per  # every split non-empty, all columns covered
        assert k == 1 or per >= 2 * granule
        assert programs * k <= 4 * 132 + programs
    assert tk._splits(1, 100, 64, 132) == (1, 100)  # too short to split


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M", [1, 7, 123])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_small_m_split_passes(M, dtype, p, launches, monkeypatch):
    # On a 16-SM machine these M leave most SMs idle: the S pass splits K = 200 into 3 (96, 96, 8 columns) and
    # the dy pass N = 150 into 2 (96, 54) -- fp32 partials, one deterministic sum launch each.
    monkeypatch.setattr(tk, "_sm_count", lambda dev: 16)
    K, N, r = 200, 150, 4
    assert tk._splits(triton.cdiv(M, 32), K, 32, 16)[0] == 3 and tk._splits(triton.cdiv(M, 32), N, 32, 16)[0] == 2
    x, W, b, A, B, dy = _inputs(M, K, N, r, dtype, True)
    out = _run(x, W, b, A, B, dy, 0.5, p, 31)
    _check(out, x, W, b, A, B, dy, 0.5, p, 31)
    assert launches.names.count("lora_sum") == 2, launches.names
    # Deterministic mode (per-row-block dB/db partials next to the split G partials): same answer, repeatable.
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        det1, det2 = _run(x, W, b, A, B, dy, 0.5, p, 31), _run(x, W, b, A, B, dy, 0.5, p, 31)
    finally:
        torch.use_deterministic_algorithms(before)
    _check(det1, x, W, b, A, B, dy, 0.5, p, 31)
    for n in NAMES:
        assert torch.equal(det1[n], det2[n]), n


def test_no_split_when_the_grid_fills_the_machine(launches):
    # The interpreter's 4 "SMs" are filled by M = 123 (4 row blocks): no partial buffers, no sum launches.
    x, W, b, A, B, dy = _inputs(123, 200, 150, 4, torch.float32, True)
    out = _run(x, W, b, A, B, dy, 0.5, 0.1, 3)
    _check(out, x, W, b, A, B, dy, 0.5, 0.1, 3)
    assert "lora_sum" not in launches.names


def test_autotune_configs_pruned_by_shared_memory():
    class _T:
        def __init__(self, es):
            self.es = es

        def element_size(self):
            return self.es

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tk._GEMM_SHAPES + [(128, 256, 64, 8, 4)]
    ]
    args = {"M": 8192, "N": 4096, "a_ptr": _T(2), "c_ptr": _T(2), "stride_a": 4096}
    kept = tk._prune_gemm(configs, args, R_PAD=16, FUSE_DA=False, HAS_DROPOUT=False)
    shapes = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in kept}
    assert (128, 256, 3) in shapes and (128, 256, 4) not in shapes  # 4-stage 128x256 needs > 227 KB
    for c in kept:
        kw = c.kwargs
        assert (
            tk.gemm_smem_estimate(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, 2, 2, 16, True)
            <= tk.SMEM_LIMIT
        )
    # fp32 at r = 128 with the fused dA and dropout: only small tiles fit; never an empty list.
    args32 = dict(args, a_ptr=_T(4), c_ptr=_T(4))
    kept32 = tk._prune_gemm(configs, args32, R_PAD=128, FUSE_DA=True, HAS_DROPOUT=True)
    assert kept32 and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept32)
    for c in kept32:
        kw = c.kwargs
        est = tk.gemm_smem_estimate(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, 4, 4, 128, True,
                                    fuse_da=True, dropout=True)  # fmt: skip
        assert est <= tk.SMEM_LIMIT


def test_interpreter_blocks_reach_odd_tails():
    # Smaller tiles than the defaults: several row/column tiles with partial tails in every kernel.
    if not INTERPRET:
        pytest.skip("block overrides apply under the interpreter")
    x, W, b, A, B, dy = _inputs(37, 52, 44, 8, torch.float32, True)
    blocks = dict(lora_gemm={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                  lora_down={"BLOCK_M": 16, "BLOCK_K": 16}, lora_dy={"BLOCK_N": 16})  # fmt: skip
    for path in ("pointer", "tma"):
        with _config.override_interpret_blocks(**blocks), _config.force_gemm_path(path):
            out = _run(x, W, b, A, B, dy, 0.5, 0.2, 5)
        _check(out, x, W, b, A, B, dy, 0.5, 0.2, 5)
