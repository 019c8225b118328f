"""The library's dropout mask (ops/dropout_mask.py) without Triton: golden values, statistics, determinism.

The golden values were produced by ``tl.rand(seed, offset)`` (Triton 3.8, under TRITON_INTERPRET=1) with a
uint32 offset; tests/triton/test_lora_triton.py re-checks the match against a live kernel.
"""

import math

import pytest
import torch

from peft_kernels.ops.dropout_mask import dropout_keep_mask, normalize_seed, philox_uniform

GOLDEN_OFFSETS = [0, 1, 2, 1000, 2**31 + 5, 2**32 - 1]
GOLDEN = {
    1234: ["0x1.0485980000000p-2", "0x1.8444860000000p-1", "0x1.fe4e440000000p-2",
           "0x1.4610dc0000000p-1", "0x1.7ad8680000000p-2", "0x1.ec28f40000000p-2"],
    2**40 + 3: ["0x1.575be80000000p-1", "0x1.1e92660000000p-2", "0x1.0494cc0000000p-6",
                "0x1.f7d2820000000p-1", "0x1.2814d80000000p-2", "0x1.de9f780000000p-2"],
}  # fmt: skip


@pytest.mark.parametrize("seed", list(GOLDEN))
def test_golden_values_match_tl_rand(seed, device):
    u = philox_uniform(seed, torch.tensor(GOLDEN_OFFSETS, dtype=torch.int64, device=device))
    assert u.dtype == torch.float32
    assert [float(v).hex() for v in u.cpu().tolist()] == GOLDEN[seed]


def test_offsets_wrap_modulo_2_32(device):
    offs = torch.tensor([3, 2**31 + 5, 2**32 - 1], dtype=torch.int64, device=device)
    a = philox_uniform(7, offs)
    b = philox_uniform(7, offs + 2**32)
    c = philox_uniform(7, offs - 2**32)  # negative int64 offsets wrap the same way
    assert torch.equal(a, b) and torch.equal(a, c)


def test_seed_taken_modulo_2_64(device):
    offs = torch.arange(64, device=device)
    assert torch.equal(philox_uniform(-1, offs), philox_uniform(2**64 - 1, offs))
    assert torch.equal(philox_uniform(5, offs), philox_uniform(2**64 + 5, offs))
    assert normalize_seed(2**64 - 1) == -1
    assert normalize_seed(2**63 - 1) == 2**63 - 1 and normalize_seed(7) == 7


def test_uniform_range_and_moments(device):
    u = philox_uniform(99, torch.arange(200_000, device=device))
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 4e-3  # sd of the mean ~ 0.29/sqrt(2e5) = 6.5e-4
    assert abs(u.var().item() - 1 / 12) < 2e-3


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate(p, device):
    rows, cols = 300, 1000
    keep = dropout_keep_mask(17, rows, cols, p, device)
    assert keep.shape == (rows, cols) and keep.dtype == torch.bool and keep.device.type == device
    n = rows * cols
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 6 * sd
    # No structure along rows or columns: per-row and per-column keep rates stay near 1-p.
    assert (keep.float().mean(1) - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / cols)
    assert (keep.float().mean(0) - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / rows)


def test_deterministic_and_seed_dependent(device):
    a = dropout_keep_mask(123, 37, 53, 0.3, device)
    b = dropout_keep_mask(123, 37, 53, 0.3, device)
    c = dropout_keep_mask(124, 37, 53, 0.3, device)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Different seeds agree on about p^2 + (1-p)^2 of the elements, not more.
    agree = (a == c).float().mean().item()
    assert abs(agree - (0.3**2 + 0.7**2)) < 0.05


def test_mask_is_flat_offset_layout(device):
    # Element (i, j) uses offset i*cols + j: the mask is the flat uniform stream reshaped.
    rows, cols, p, seed = 5, 11, 0.4, 2**40 + 3
    keep = dropout_keep_mask(seed, rows, cols, p, device)
    u = philox_uniform(seed, torch.arange(rows * cols, device=device)).view(rows, cols)
    assert torch.equal(keep, u >= torch.tensor(p, dtype=torch.float32))
    # Threshold compared in float32: u equal to float32(p) is kept.
    u0 = philox_uniform(seed, torch.tensor([0], device=device)).item()
    assert dropout_keep_mask(seed, 1, 1, u0, device).item()


def test_edge_probabilities_and_sizes(device):
    assert dropout_keep_mask(1, 4, 6, 0.0, device).all()
    assert not dropout_keep_mask(1, 4, 6, 1.0, device).any()
    assert dropout_keep_mask(1, 0, 6, 0.5, device).shape == (0, 6)
    with pytest.raises(TypeError):
        philox_uniform(1, torch.zeros(3))


def test_chunking_does_not_change_the_mask(device, monkeypatch):
    import peft_kernels.ops.dropout_mask as dm

    full = dropout_keep_mask(8, 33, 31, 0.25, device)
    monkeypatch.setattr(dm, "_CHUNK", 100)
    assert torch.equal(dm.dropout_keep_mask(8, 33, 31, 0.25, device), full)
