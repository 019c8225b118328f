"""The library's dropout mask: Triton's ``tl.rand`` reproduced bit for bit in plain PyTorch.

Definition (every backend -- reference, triton, CUDA, CPU C++ -- must produce exactly this mask, so the
mask is regenerated from ``(seed, offset)`` wherever it is needed and never stored):

- key ``(k0, k1) = (seed mod 2**64) & 0xFFFFFFFF, (seed mod 2**64) >> 32``;
- counter ``(c0, c1, c2, c3) = (offset mod 2**32, 0, 0, 0)``;
- Philox 4x32 with 10 rounds (constants of ``triton/language/random.py``), keep the first output word ``w``;
- ``u = float32(v) * float32(4.6566127342e-10)`` with ``v = w`` if ``w < 2**31`` else ``~w & 0x7FFFFFFF``
  (Triton's ``uint_to_uniform_float``: the word read as int32, negatives folded with ``~``), so
  ``u`` is in ``[0, 1)``;
- element ``(i, j)`` of a ``[rows, cols]`` activation uses ``offset = i * cols + j`` and is KEPT iff
  ``u >= float32(p)``.

In a Triton kernel the same value is ``tl.rand(seed, offs)`` with ``offs`` a ``uint32`` tensor holding
``(i * cols + j) mod 2**32`` (an int64 offset would feed its high word into ``c1``).

The Philox arithmetic runs in int64 (32x32-bit products split into 16-bit halves so nothing overflows),
so it works on any device and dtype-agnostic backend.
"""

from __future__ import annotations

import torch

__all__ = ["philox_uniform", "dropout_keep_mask", "normalize_seed"]

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit words: the largest float with (2**31 - 1) * scale < 1.
_UNIFORM_SCALE = 4.6566127342e-10
# Elements per chunk of dropout_keep_mask: bounds the int64 temporaries (~10 live) to ~400 MB.
_CHUNK = 1 << 22


def normalize_seed(seed: int) -> int:
    """The seed as a signed 64-bit value with the same bits as ``seed mod 2**64``.

    Triton types an int kernel argument as i32/i64/u64 by its value and sign-extends it to u64 inside
    ``tl.rand``; passing this form keeps it a signed i32/i64, so the key is ``seed mod 2**64`` either way.
    """
    seed = int(seed) % (1 << 64)
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * x`` for ``a``, ``x`` < 2**32 without leaving int64."""
    xh = x >> 16
    xl = x & 0xFFFF
    ph = xh * a  # < 2**48
    pl = xl * a  # < 2**48
    hi = (ph + (pl >> 16)) >> 16
    lo = (((ph & 0xFFFF) << 16) + pl) & _MASK32
    return hi, lo


def _philox_word0(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """First Philox-4x32-10 output word (as int64 in [0, 2**32)) for counters ``(counter, 0, 0, 0)``."""
    s = int(seed) % (1 << 64)
    k0, k1 = s & _MASK32, s >> 32
    c0 = counter
    c1 = torch.zeros_like(counter)
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` bit for bit: float32 uniforms in [0, 1), same shape and device as offsets.

    ``offsets`` (any integer dtype) are taken modulo 2**32 as the uint32 Philox counter.
    """
    if offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
        raise TypeError(f"philox_uniform: offsets must be an integer tensor, got {offsets.dtype}")
    counter = offsets.to(torch.int64) & _MASK32
    w = _philox_word0(seed, counter)
    # Triton reads the word as int32 and folds negatives with ~x: for w >= 2**31 that is w ^ 0xFFFFFFFF.
    v = torch.where(w >= (1 << 31), w ^ _MASK32, w)
    scale = torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=offsets.device)
    return v.to(torch.float32) * scale


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Bool keep mask ``[rows, cols]``: element (i, j) uses offset ``i * cols + j`` (mod 2**32), kept iff
    ``u >= float32(p)``. ``p <= 0`` keeps everything (no RNG is evaluated)."""
    rows, cols = int(rows), int(cols)
    if rows < 0 or cols < 0:
        raise ValueError(f"dropout_keep_mask: rows and cols must be >= 0, got {rows}, {cols}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if p <= 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    numel = rows * cols
    out = torch.empty(numel, dtype=torch.bool, device=device)
    p32 = torch.tensor(p, dtype=torch.float32, device=device)
    for start in range(0, numel, _CHUNK):
        end = min(numel, start + _CHUNK)
        offsets = torch.arange(start, end, dtype=torch.int64, device=device)
        out[start:end] = philox_uniform(seed, offsets) >= p32
    return out.view(rows, cols)
