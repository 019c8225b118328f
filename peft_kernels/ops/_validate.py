"""Input checks at the Python boundary: every message names the op and the argument."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Validated:
    """The tensor signatures (``_op.signature``) a public function has validated: a steady-state call checks only
    its scalars.
    Bounded (cleared when full): shapes that vary per batch would otherwise grow it without end."""

    def __init__(self, limit: int = 4096) -> None:
        self._seen: set = set()
        self._limit = limit

    def __contains__(self, key) -> bool:
        return key is not None and key in self._seen

    def add(self, key) -> None:
        if key is None:
            return
        if len(self._seen) >= self._limit:
            self._seen.clear()
        self._seen.add(key)


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: int | tuple[int, ...] | None = None,
    min_ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {t.dtype}")


def check_size(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{op}: {name} of shape {tuple(t.shape)} has size {t.shape[dim]} in dim {dim}, "
            f"expected {expected} ({what})"
        )


def check_same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}; all must share a device")
    return device


def check_nonzero(op: str, name: str, t: torch.Tensor, dim: int, what: str) -> None:
    if t.shape[dim] == 0:
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} has {what} = 0; it must be >= 1")


def _number(op: str, name: str, value, what: str = "a number") -> bool:
    """Type-checks a scalar argument; True when its value can be checked now. While torch.compile traces, a
    float argument that changes between calls is symbolic (its value is known only when the graph runs), and
    value checks on it would break the graph: they are skipped there (the first, eager-or-specialized call
    checked the kind of value it is)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{op}: {name} must be {what}, got {type(value).__name__}")  # numpy scalars are Real
    return not (torch.compiler.is_compiling() or isinstance(value, (torch.SymInt, torch.SymFloat)))


def check_probability(op: str, name: str, p) -> float:
    if type(p) is float and not torch.compiler.is_compiling() and 0.0 <= p < 1.0:  # the steady-state call
        return p
    if not _number(op, name, p, "a float"):
        return p
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1), got {p}")
    return float(p)


def check_finite(op: str, name: str, value) -> float:
    if type(value) is float and not torch.compiler.is_compiling() and math.isfinite(value):  # steady state
        return value
    if not _number(op, name, value):
        return value
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return float(value)


def check_positive(op: str, name: str, value) -> float:
    value = check_finite(op, name, value)
    if not _number(op, name, value):
        return value
    if value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    return value


def check_int(op: str, name: str, value, minimum: int = 0) -> int:
    """An integer argument (a Python or numpy int, not a bool or a float) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)
