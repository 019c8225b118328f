"""The library's dropout mask, in plain PyTorch (the definition every backend reproduces bit for bit).

Definition (reference, triton, CUDA and CPU C++ produce exactly this mask, so it is regenerated from the seed
wherever it is needed and never stored):

- key ``(k0, k1) = (seed mod 2**64) & 0xFFFFFFFF, (seed mod 2**64) >> 32``;
- element ``(i, j)`` of a ``[rows, cols]`` activation takes 16 bits of Philox-4x32 with 10 rounds (constants
  of ``triton/language/random.py``) at counter ``(c0, c1, c2, c3) = (j div 8, i mod 2**32, 0, 0)``: word
  ``(j mod 8) div 2``, its low half for even ``j``, its high half for odd ``j`` -- ``u = (w >> 16 * (j mod 2))
  & 0xFFFF`` -- so one Philox call gives the keep decisions of eight neighbouring columns;
- the element is KEPT iff ``u >= t`` with ``t = keep_threshold(p) = floor(p * 65536 + 0.5)``: **p is quantized
  to a multiple of 2**-16** (the drop rate is exactly ``t / 65536``, within 2**-17 of p; at p = 0.05 it is
  0.0500031). ``p = 1`` drops everything (t = 65536), ``p <= 0`` keeps everything. The kept values are scaled
  by the nominal ``1 / (1 - p)`` (a relative bias below 1e-5, far below one bf16 ulp).

Why 16-bit halves: the mask is regenerated in up to three kernels per step, and a Philox call (10 rounds:
20 32x32-bit multiplies) is the whole cost; eight decisions per call instead of four halve it, and a 16-bit
uniform resolves p to 1.5e-5, ample for dropout.

In a Triton kernel the four words are ``tl.philox(seed, j // 8, i, 0, 0)`` on uint32 counters
(``peft_kernels/triton/lora.py:_keep_tile``); in C++ ``peft_kernels::philox4`` (csrc/include/peft_kernels/philox.h).
Rows stay below 2**32 and columns below 2**35, so no two elements of any realistic activation share
a counter.

The Philox arithmetic runs in int64 (32x32-bit products split into 16-bit halves so nothing overflows),
so it works on any device.
"""

from __future__ import annotations

import math

import torch

__all__ = ["philox4x32", "dropout_bits", "dropout_keep_mask", "keep_threshold", "normalize_seed"]

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
# Columns per Philox call (4 words x 2 halves).
COLS_PER_CALL = 8
# Philox calls per chunk of dropout_bits: bounds the int64 temporaries (~12 live) to ~400 MB.
_CHUNK = 1 << 22


def normalize_seed(seed: int) -> int:
    """The seed as a signed 64-bit value with the same bits as ``seed mod 2**64``.

    Triton types an int kernel argument as i32/i64/u64 by its value and sign-extends it to u64 inside
    ``tl.philox``; passing this form keeps it a signed i32/i64, so the key is ``seed mod 2**64`` either way.
    """
    seed = int(seed) % (1 << 64)
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def keep_threshold(p: float) -> int:
    """The 16-bit keep threshold ``t`` of drop probability ``p``: an element is kept iff its 16 bits >= t.
    ``floor(p * 65536 + 0.5)`` clamped to [0, 65536] (p * 65536 is exact in double, so every backend agrees)."""
    p = float(p)
    if p != p:
        raise ValueError("keep_threshold: p is NaN")
    return min(65536, max(0, math.floor(p * 65536.0 + 0.5)))


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * x`` for ``a``, ``x`` < 2**32 without leaving int64."""
    xh = x >> 16
    xl = x & 0xFFFF
    ph = xh * a  # < 2**48
    pl = xl * a  # < 2**48
    hi = (ph + (pl >> 16)) >> 16
    lo = (((ph & 0xFFFF) << 16) + pl) & _MASK32
    return hi, lo


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox-4x32-10 output words (int64 in [0, 2**32)) for counters ``(c0, c1, 0, 0)`` (integer
    tensors of one shape, taken mod 2**32) and key ``seed mod 2**64`` -- ``tl.philox(seed, c0, c1, 0, 0)``."""
    for c in (c0, c1):
        if c.dtype.is_floating_point or c.dtype == torch.bool:
            raise TypeError(f"philox4x32: counters must be integer tensors, got {c.dtype}")
    s = int(seed) % (1 << 64)
    k0, k1 = s & _MASK32, s >> 32
    c0 = c0.to(torch.int64) & _MASK32
    c1 = c1.to(torch.int64) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_bits(seed: int, rows: int, cols: int, device=None, row0: int = 0) -> torch.Tensor:
    """The 16-bit values ``u[i, j]`` (int32 in [0, 65536)) of the mask definition for rows ``row0 .. row0 +
    rows - 1``: element (i, j) is kept iff ``u[i, j] >= keep_threshold(p)``."""
    rows, cols = int(rows), int(cols)
    if rows < 0 or cols < 0:
        raise ValueError(f"dropout_bits: rows and cols must be >= 0, got {rows}, {cols}")
    device = torch.device("cpu") if device is None else torch.device(device)
    groups = (cols + COLS_PER_CALL - 1) // COLS_PER_CALL
    out = torch.empty(rows, groups * COLS_PER_CALL, dtype=torch.int32, device=device)
    rows_per_chunk = max(1, _CHUNK // max(1, groups))
    q = torch.arange(groups, dtype=torch.int64, device=device)
    for start in range(0, rows, rows_per_chunk):
        end = min(rows, start + rows_per_chunk)
        i = torch.arange(row0 + start, row0 + end, dtype=torch.int64, device=device)
        c0, c1 = torch.broadcast_tensors(q[None, :], i[:, None])
        # Column 8q + 2w + h takes half h (0: low, 1: high) of word w.
        halves = [part for w in philox4x32(seed, c0, c1) for part in (w & 0xFFFF, w >> 16)]
        out[start:end] = torch.stack(halves, dim=-1).view(end - start, groups * COLS_PER_CALL).to(torch.int32)
    return out[:, :cols]


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Bool keep mask ``[rows, cols]``: element (i, j) kept iff ``u[i, j] >= keep_threshold(p)`` (module doc).
    ``p <= 0`` keeps everything (no RNG is evaluated)."""
    rows, cols = int(rows), int(cols)
    if rows < 0 or cols < 0:
        raise ValueError(f"dropout_keep_mask: rows and cols must be >= 0, got {rows}, {cols}")
    device = torch.device("cpu") if device is None else torch.device(device)
    t = keep_threshold(p)
    if t == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    return dropout_bits(seed, rows, cols, device) >= t
