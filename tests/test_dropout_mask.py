"""The library's dropout mask (ops/dropout_mask.py) without Triton: golden values, statistics, determinism.

The golden words were produced by ``tl.philox(seed, q, row, 0, 0)`` (Triton 3.8, under TRITON_INTERPRET=1) on
uint32 counters; tests/triton/test_lora_triton.py re-checks the match against a live kernel (and the Triton
keep tile against this reference), and tests/test_native_kernels.py the CPU/CUDA kernels against it.
"""

import math

import pytest
import torch

import peft_kernels.ops.dropout_mask as dm
from peft_kernels.ops.dropout_mask import dropout_bits, dropout_keep_mask, keep_threshold, normalize_seed, philox4x32

GOLDEN_COUNTERS = [(0, 0), (0, 1), (5, 250), (2**31 + 5, 3), (2**32 - 1, 2**30 - 1)]  # (row, column group q)
GOLDEN = {
    1234: [0x2090B348, 0xDA7CF0AB, 0x4401906F, 0xCBCA470E, 0x9EEEDE35, 0x1CBE137C, 0xFA277093, 0x147EDD50,
           0x2B77753A, 0x5F18E71D, 0xB6A111AC, 0xB46CFC26, 0x688692A1, 0x21EBED14, 0xF4625EA0, 0xC1CB1419,
           0x8556344D, 0x83061340, 0x047D15B9, 0xAC3A344B],
    2**40 + 3: [0x55D6FAB1, 0xB1404635, 0xB7259AAA, 0xE70CF7C6, 0x23D24D0E, 0xA8DF4FDE, 0x05601C1E, 0xC05AF117,
                0xBA0AFA2A, 0xF5A1676E, 0xF692BA55, 0xDC07DC4D, 0x514D708D, 0x345864EC, 0x996B5CFE, 0xFCA61A2B,
                0xBB491BCE, 0x48B292CC, 0xC512BA7B, 0xFF6F1E89],
}  # fmt: skip


@pytest.mark.parametrize("seed", list(GOLDEN))
def test_golden_words_match_tl_philox(seed, device):
    rows = torch.tensor([c[0] for c in GOLDEN_COUNTERS], dtype=torch.int64, device=device)
    qs = torch.tensor([c[1] for c in GOLDEN_COUNTERS], dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(seed, qs, rows), dim=-1)  # [counters, 4]
    assert words.flatten().cpu().tolist() == GOLDEN[seed]
    # Element (row, 8q + 2w + h) of the mask takes half h (0: low 16 bits, 1: high) of word w at counter (q, row).
    for k, (row, q) in enumerate(GOLDEN_COUNTERS[:3]):
        got = dropout_bits(seed, 1, 8 * q + 8, device, row0=row)[0, 8 * q :].cpu().tolist()
        want = [half for w in GOLDEN[seed][4 * k : 4 * k + 4] for half in (w & 0xFFFF, w >> 16)]
        assert got == want


def test_philox_counters_wrap_modulo_2_32(device):
    q = torch.tensor([3, 2**31 + 5, 2**32 - 1], dtype=torch.int64, device=device)
    r = torch.tensor([7, 0, 2**32 - 2], dtype=torch.int64, device=device)
    a = philox4x32(7, q, r)
    b = philox4x32(7, q + 2**32, r - 2**32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(TypeError):
        philox4x32(1, torch.zeros(3), torch.zeros(3, dtype=torch.int64))


def test_seed_taken_modulo_2_64(device):
    assert torch.equal(dropout_bits(-1, 3, 9, device), dropout_bits(2**64 - 1, 3, 9, device))
    assert torch.equal(dropout_bits(5, 3, 9, device), dropout_bits(2**64 + 5, 3, 9, device))
    assert normalize_seed(2**64 - 1) == -1
    assert normalize_seed(2**63 - 1) == 2**63 - 1 and normalize_seed(7) == 7


def test_keep_threshold_quantizes_p_to_2_pow_minus_16():
    assert keep_threshold(0.05) == 3277  # 0.05 * 65536 = 3276.8: drop rate 3277 / 65536 = 0.0500031
    assert keep_threshold(0.0) == 0 and keep_threshold(-0.5) == 0
    assert keep_threshold(1.0) == 65536 and keep_threshold(1.5) == 65536
    for k in (1, 2, 3276, 32768, 65535):
        assert keep_threshold(k / 65536) == k  # exact multiples of 2**-16 are exact
        assert keep_threshold((k + 0.5) / 65536) == k + 1  # halfway rounds up
        assert keep_threshold((k + 0.49) / 65536) == k
    assert keep_threshold(1e-6) == 0  # below 2**-17: no dropout at all
    for p in (0.05, 0.1, 0.3, 0.9, 1 / 3):
        assert abs(keep_threshold(p) / 65536 - p) <= 2**-17
    with pytest.raises(ValueError, match="NaN"):
        keep_threshold(float("nan"))


def test_bits_range_moments_and_independence(device):
    u = dropout_bits(99, 200, 1000, device)
    assert u.dtype == torch.int32
    assert 0 <= u.min().item() and u.max().item() < 65536
    uf = u.double() / 65536
    assert abs(uf.mean().item() - 0.5) < 4e-3  # sd of the mean ~ 0.29/sqrt(2e5) = 6.5e-4
    assert abs(uf.var().item() - 1 / 12) < 2e-3
    # The eight 16-bit values of one Philox call (two halves of each of four words) are uncorrelated.
    cols = torch.stack([uf[:, c::8].flatten() for c in range(8)])
    c = torch.corrcoef(cols)
    assert (c - torch.eye(8, dtype=c.dtype, device=c.device)).abs().max().item() < 0.02
    # Every value occurs: 16 bits, no stuck bit.
    for bit in range(16):
        share = ((u >> bit) & 1).double().mean().item()
        assert abs(share - 0.5) < 0.01, bit


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate(p, device):
    rows, cols = 300, 1001
    keep = dropout_keep_mask(17, rows, cols, p, device)
    assert keep.shape == (rows, cols) and keep.dtype == torch.bool and keep.device.type == device
    n = rows * cols
    sd = math.sqrt(p * (1 - p) / n)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 6 * sd + 2**-17  # p quantized to 2**-16
    assert abs(rate - (1 - keep_threshold(p) / 65536)) < 6 * sd
    # No structure along rows or columns (nor by column mod 8: the word and the half): rates stay near 1-p.
    assert (keep.float().mean(1) - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / cols)
    assert (keep.float().mean(0) - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / rows)
    for c in range(8):
        assert abs(keep[:, c::8].float().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) * 8 / n)


def test_keep_rate_at_the_benchmark_p_on_a_large_mask(device):
    # 4 M elements at p = 0.05: sd of the rate 1.1e-4, so a bias of 5e-4 (e.g. an off-by-one in the halves)
    # would show; the quantized rate 3277/65536 is what it must hit.
    p, rows, cols = 0.05, 512, 8192
    rate = 1 - dropout_keep_mask(2**40 + 3, rows, cols, p, device).double().mean().item()
    sd = math.sqrt(p * (1 - p) / (rows * cols))
    assert abs(rate - 3277 / 65536) < 5 * sd


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
    u = dropout_bits(seed, 5, 11, device)
    assert torch.equal(keep, u >= keep_threshold(p))
    assert torch.equal(dropout_bits(seed, 2, 11, device, row0=3), u[3:5])
    # The threshold is inclusive: an element whose 16 bits equal t is kept, one below it dropped.
    v = int(u[0, 0])
    assert dropout_keep_mask(seed, 1, 1, v / 65536, device).item()
    if v < 65535:
        assert not dropout_keep_mask(seed, 1, 1, (v + 1) / 65536, device).item()


def test_edge_probabilities_and_sizes(device):
    assert dropout_keep_mask(1, 4, 6, 0.0, device).all()
    assert not dropout_keep_mask(1, 4, 6, 1.0, device).any()
    u = dropout_bits(1, 40, 64, device)
    assert torch.equal(dropout_keep_mask(1, 40, 64, 65535 / 65536, device), u == 65535)
    assert dropout_keep_mask(1, 0, 6, 0.5, device).shape == (0, 6)
    assert dropout_keep_mask(1, 3, 0, 0.5, device).shape == (3, 0)
    with pytest.raises(ValueError, match="rows"):
        dropout_keep_mask(1, -1, 6, 0.5, device)


def test_chunking_does_not_change_the_mask(device, monkeypatch):
    full = dropout_keep_mask(8, 33, 31, 0.25, device)
    monkeypatch.setattr(dm, "_CHUNK", 5)
    assert torch.equal(dm.dropout_keep_mask(8, 33, 31, 0.25, device), full)
