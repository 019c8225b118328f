"""The library's dropout mask (ops/dropout_mask.py) without Triton: golden values, statistics, determinism.

The golden values were produced by ``tl.philox(seed, q, row, 0, 0)`` + ``tl.random.uint_to_uniform_float``
(Triton 3.8, under TRITON_INTERPRET=1) on uint32 counters; tests/triton/test_lora_triton.py re-checks the
match against a live kernel, and tests/test_native_kernels.py the CPU/CUDA kernels against this reference.
"""

import math

import pytest
import torch

import peft_kernels.ops.dropout_mask as dm
from peft_kernels.ops.dropout_mask import dropout_keep_mask, dropout_uniform, normalize_seed, philox4x32

GOLDEN_COUNTERS = [(0, 0), (0, 1), (5, 250), (2**31 + 5, 3), (2**32 - 1, 2**30 - 1)]  # (row, column group q)
GOLDEN = {
    1234: ["0x1.0485980000000p-2", "0x1.2c18780000000p-2", "0x1.1006400000000p-1", "0x1.a1adc60000000p-2",
           "0x1.8444860000000p-1", "0x1.cbe1360000000p-3", "0x1.7623da0000000p-5", "0x1.47edd20000000p-3",
           "0x1.5bbba80000000p-2", "0x1.7c639a0000000p-1", "0x1.257bb80000000p-1", "0x1.2e4c0e0000000p-1",
           "0x1.a21a480000000p-1", "0x1.0f5f660000000p-2", "0x1.73b42a0000000p-4", "0x1.f1a75e0000000p-2",
           "0x1.eaa72c0000000p-1", "0x1.f3e7b00000000p-1", "0x1.1f456c0000000p-5", "0x1.4f172c0000000p-1"],
    2**40 + 3: ["0x1.575be80000000p-1", "0x1.3afee60000000p-1", "0x1.2369940000000p-1", "0x1.8f30820000000p-3",
                "0x1.1e92660000000p-2", "0x1.5c82be0000000p-1", "0x1.5807060000000p-5", "0x1.fd28760000000p-2",
                "0x1.17d4160000000p-1", "0x1.4bd3100000000p-4", "0x1.2da8b40000000p-4", "0x1.1fc11c0000000p-2",
                "0x1.4535c00000000p-1", "0x1.a2c3260000000p-2", "0x1.9a528a0000000p-1", "0x1.acf2e80000000p-6",
                "0x1.12db8e0000000p-1", "0x1.22ca4a0000000p-1", "0x1.d76a2a0000000p-2", "0x1.21c2ea0000000p-8"],
}  # fmt: skip


@pytest.mark.parametrize("seed", list(GOLDEN))
def test_golden_values_match_tl_philox(seed, device):
    rows = torch.tensor([c[0] for c in GOLDEN_COUNTERS], dtype=torch.int64, device=device)
    qs = torch.tensor([c[1] for c in GOLDEN_COUNTERS], dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(seed, qs, rows), dim=-1)  # [counters, 4]
    u = dm._to_uniform(words)
    assert u.dtype == torch.float32
    assert [float(v).hex() for v in u.flatten().cpu().tolist()] == GOLDEN[seed]
    # Element (row, 4q + w) of the mask takes word w of the call at counter (q, row).
    for k, (row, q) in enumerate(GOLDEN_COUNTERS[:3]):
        got = dropout_uniform(seed, 1, 4 * q + 4, device, row0=row)[0, 4 * q :]
        assert torch.equal(got, u[k])


def test_philox_counters_wrap_modulo_2_32(device):
    q = torch.tensor([3, 2**31 + 5, 2**32 - 1], dtype=torch.int64, device=device)
    r = torch.tensor([7, 0, 2**32 - 2], dtype=torch.int64, device=device)
    a = philox4x32(7, q, r)
    b = philox4x32(7, q + 2**32, r - 2**32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(TypeError):
        philox4x32(1, torch.zeros(3), torch.zeros(3, dtype=torch.int64))


def test_seed_taken_modulo_2_64(device):
    assert torch.equal(dropout_uniform(-1, 3, 9, device), dropout_uniform(2**64 - 1, 3, 9, device))
    assert torch.equal(dropout_uniform(5, 3, 9, device), dropout_uniform(2**64 + 5, 3, 9, device))
    assert normalize_seed(2**64 - 1) == -1
    assert normalize_seed(2**63 - 1) == 2**63 - 1 and normalize_seed(7) == 7


def test_uniform_range_and_moments(device):
    u = dropout_uniform(99, 200, 1000, device)
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 4e-3  # sd of the mean ~ 0.29/sqrt(2e5) = 6.5e-4
    assert abs(u.var().item() - 1 / 12) < 2e-3
    # The four words of one Philox call are independent: neighbouring columns are uncorrelated.
    c = torch.corrcoef(torch.stack([u[:, 0::4].flatten(), u[:, 1::4].flatten(), u[:, 2::4].flatten()]))
    assert (c - torch.eye(3)).abs().max().item() < 0.02


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate(p, device):
    rows, cols = 300, 1001
    keep = dropout_keep_mask(17, rows, cols, p, device)
    assert keep.shape == (rows, cols) and keep.dtype == torch.bool and keep.device.type == device
    n = rows * cols
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 6 * sd
    # No structure along rows or columns (nor by column mod 4, the Philox word): rates stay near 1-p.
    assert (keep.float().mean(1) - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / cols)
    assert (keep.float().mean(0) - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / rows)
    for w in range(4):
        assert abs(keep[:, w::4].float().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) * 4 / n)


def test_deterministic_and_seed_dependent(device):
    a = dropout_keep_mask(123, 37, 53, 0.3, device)
    b = dropout_keep_mask(123, 37, 53, 0.3, device)
    c = dropout_keep_mask(124, 37, 53, 0.3, device)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Different seeds agree on about p^2 + (1-p)^2 of the elements, not more.
    agree = (a == c).float().mean().item()
    assert abs(agree - (0.3**2 + 0.7**2)) < 0.05


def test_mask_is_row_column_layout(device):
    # Element (i, j) depends on (i, j) only: a wider or taller activation has the same mask where they overlap,
    # and rows far down a tall activation are generated directly (row0).
    seed, p = 2**40 + 3, 0.4
    keep = dropout_keep_mask(seed, 5, 11, p, device)
    wide = dropout_keep_mask(seed, 7, 30, p, device)
    assert torch.equal(keep, wide[:5, :11])
    u = dropout_uniform(seed, 5, 11, device)
    assert torch.equal(keep, u >= torch.tensor(p, dtype=torch.float32))
    assert torch.equal(dropout_uniform(seed, 2, 11, device, row0=3), u[3:5])
    # Threshold compared in float32: u equal to float32(p) is kept.
    assert dropout_keep_mask(seed, 1, 1, u[0, 0].item(), device).item()


def test_edge_probabilities_and_sizes(device):
    assert dropout_keep_mask(1, 4, 6, 0.0, device).all()
    assert not dropout_keep_mask(1, 4, 6, 1.0, device).any()
    assert dropout_keep_mask(1, 0, 6, 0.5, device).shape == (0, 6)
    assert dropout_keep_mask(1, 3, 0, 0.5, device).shape == (3, 0)
    with pytest.raises(ValueError, match="rows"):
        dropout_keep_mask(1, -1, 6, 0.5, device)


def test_chunking_does_not_change_the_mask(device, monkeypatch):
    full = dropout_keep_mask(8, 33, 31, 0.25, device)
    monkeypatch.setattr(dm, "_CHUNK", 5)
    assert torch.equal(dm.dropout_keep_mask(8, 33, 31, 0.25, device), full)
