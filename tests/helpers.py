"""Shared test helpers: closeness with per-dtype tolerances, the FlashAttention rule, and where Triton tests run."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_device() -> str:
    """The device a Triton test module runs on ("cuda" when present, else the CPU under TRITON_INTERPRET=1).
    Called at module level, before importing Triton code: skips the whole module when neither is available."""
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


# (rtol, atol) against a float64 oracle, per dtype of the tensor under test.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 2e-2),
}


def _describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> str:
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    idx = torch.nonzero(bad)[:5].tolist()
    worst = int(torch.argmax(err).item())
    worst_idx = list(torch.unravel_index(torch.tensor(worst), err.shape)) if err.dim() else []
    return (
        f"{int(bad.sum())} of {err.numel()} elements out of tolerance (rtol={rtol}, atol={atol}); "
        f"max abs err {err.max().item():.3e} at {[int(i) for i in worst_idx]} "
        f"(actual {a.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g}); "
        f"first bad indices {idx}"
    )


def assert_close(actual, expected, dtype=None, rtol=None, atol=None, name="tensor"):
    """Elementwise closeness with the tolerance of `dtype` (default: actual's dtype); NaN never passes."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    dtype = dtype or actual.dtype
    d_rtol, d_atol = TOLERANCES[dtype]
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    assert not torch.isnan(actual).any(), f"{name}: contains NaN"
    ok = torch.allclose(actual.double(), expected.double(), rtol=rtol, atol=atol)
    assert ok, f"{name}: " + _describe_mismatch(actual, expected, rtol, atol)


def rel_err(actual, expected) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_within_eager_error(actual, eager, oracle, factor=2.0, floor=1e-6, name="tensor"):
    """The FlashAttention rule: our low-precision error vs a float64 oracle is at most `factor` times the
    error that eager PyTorch in the same dtype makes against the same oracle (plus a small floor)."""
    assert not torch.isnan(actual).any(), f"{name}: contains NaN"
    ours, theirs = rel_err(actual, oracle), rel_err(eager, oracle)
    assert ours <= factor * theirs + floor, (
        f"{name}: relative error {ours:.3e} > {factor} x eager's {theirs:.3e} (+{floor})"
    )
