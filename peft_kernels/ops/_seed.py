"""Dropout seeds as int64 CPU scalar tensors.

A seed drawn from torch's generator as a tensor (not a Python int) stays a graph value under torch.compile,
so every step of a compiled model gets a fresh mask instead of one baked in at trace time.
"""

from __future__ import annotations

import torch


def as_seed_tensor(op: str, seed) -> torch.Tensor:
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: seed must be an int or a one-element integer tensor, got {seed.dtype} {seed.shape}")
        return seed.reshape(()).to(device="cpu", dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int, a one-element integer tensor or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{op}: seed must be in [0, 2**63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64)


def seed_value(seed: torch.Tensor) -> int:
    return int(seed.item())
