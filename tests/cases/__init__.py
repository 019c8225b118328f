"""Named input cases per op family, one module per op (tests/cases/<op>.py), used by the generated backend tests
(tests/test_op_contract.py) and by any test that wants the op's standard inputs.

A module registers its cases with ``register(op_name, OpCase(...), ...)``; ``make()`` returns the family's
input record (the NamedTuple its backends see), built from fresh random tensors (never zeros), with
``requires_grad`` set on the inputs whose gradients the test compares.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class OpCase:
    name: str
    make: Callable[[], tuple]  # -> the family's input record
    # dtypes this case is built in; make(dtype=...) is called once per entry
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return self.name


CASES: dict[str, list[OpCase]] = {}


def register(op: str, *cases: OpCase) -> None:
    CASES.setdefault(op, []).extend(cases)


def load_all() -> dict[str, list[OpCase]]:
    """Import every case module in this package (each registers itself)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return CASES


def rand(*shape, dtype=torch.float32, scale=1.0, grad=False, device="cpu") -> torch.Tensor:
    t = (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)
    return t.requires_grad_(grad)
