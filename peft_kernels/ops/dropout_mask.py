"""The library's dropout mask, in plain PyTorch (the definition every backend reproduces bit for bit).

Definition (reference, triton, CUDA and CPU C++ produce exactly this mask, so it is regenerated from the seed
wherever it is needed and never stored):

- key ``(k0, k1) = (seed mod 2**64) & 0xFFFFFFFF, (seed mod 2**64) >> 32``;
- element ``(i, j)`` of a ``[rows, cols]`` activation takes word ``j mod 4`` of Philox-4x32 with 10 rounds
  (constants of ``triton/language/random.py``) at counter ``(c0, c1, c2, c3) = (j div 4, i mod 2**32, 0, 0)``
  -- one Philox call gives the keep bits of four neighbouring columns;
- ``u = float32(v) * float32(4.6566127342e-10)`` with ``v = w`` if ``w < 2**31`` else ``~w & 0x7FFFFFFF``
  (Triton's ``uint_to_uniform_float``: the word read as int32, negatives folded with ``~``), so ``u`` is
  in ``[0, 1)``;
- the element is KEPT iff ``u >= float32(p)``.

In a Triton kernel the four words are ``tl.philox(seed, j // 4, i, 0, 0)`` on uint32 counters
(``peft_kernels/triton/lora.py:_keep_tile``); in C++ ``peft_kernels::philox4`` (csrc/include/peft_kernels/philox.h).
Rows and columns each stay below 2**32 (columns below 2**34), so no two elements of any realistic activation
share a counter.

The Philox arithmetic runs in int64 (32x32-bit products split into 16-bit halves so nothing overflows),
so it works on any device.
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32", "dropout_uniform", "dropout_keep_mask", "normalize_seed"]

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit words: the largest float with (2**31 - 1) * scale < 1.
_UNIFORM_SCALE = 4.6566127342e-10
# Philox calls per chunk of dropout_uniform: bounds the int64 temporaries (~12 live) to ~400 MB.
_CHUNK = 1 << 22


def normalize_seed(seed: int) -> int:
    """The seed as a signed 64-bit value with the same bits as ``seed mod 2**64``.

    Triton types an int kernel argument as i32/i64/u64 by its value and sign-extends it to u64 inside
    ``tl.philox``; passing this form keeps it a signed i32/i64, so the key is ``seed mod 2**64`` either way.
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


def _to_uniform(w: torch.Tensor) -> torch.Tensor:
    # Triton reads the word as int32 and folds negatives with ~x: for w >= 2**31 that is w ^ 0xFFFFFFFF.
    v = torch.where(w >= (1 << 31), w ^ _MASK32, w)
    return v.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=w.device)


def dropout_uniform(seed: int, rows: int, cols: int, device=None, row0: int = 0) -> torch.Tensor:
    """The float32 uniforms ``u[i, j]`` of the mask definition for rows ``row0 .. row0 + rows - 1``."""
    rows, cols = int(rows), int(cols)
    if rows < 0 or cols < 0:
        raise ValueError(f"dropout_uniform: rows and cols must be >= 0, got {rows}, {cols}")
    device = torch.device("cpu") if device is None else torch.device(device)
    groups = (cols + 3) // 4
    out = torch.empty(rows, groups * 4, dtype=torch.float32, device=device)
    rows_per_chunk = max(1, _CHUNK // max(1, groups))
    q = torch.arange(groups, dtype=torch.int64, device=device)
    for start in range(0, rows, rows_per_chunk):
        end = min(rows, start + rows_per_chunk)
        i = torch.arange(row0 + start, row0 + end, dtype=torch.int64, device=device)
        c0, c1 = torch.broadcast_tensors(q[None, :], i[:, None])
        words = philox4x32(seed, c0, c1)
        out[start:end] = torch.stack([_to_uniform(w) for w in words], dim=-1).view(end - start, groups * 4)
    return out[:, :cols]


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Bool keep mask ``[rows, cols]``: element (i, j) kept iff ``u[i, j] >= float32(p)`` (module doc).
    ``p <= 0`` keeps everything (no RNG is evaluated)."""
    rows, cols = int(rows), int(cols)
    if rows < 0 or cols < 0:
        raise ValueError(f"dropout_keep_mask: rows and cols must be >= 0, got {rows}, {cols}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if p <= 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    return dropout_uniform(seed, rows, cols, device) >= torch.tensor(p, dtype=torch.float32, device=device)
