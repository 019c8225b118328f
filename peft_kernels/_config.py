"""Every knob of peft_kernels in one place.

Environment variables are read here and nowhere else (the table below is the README's list). Switches that a
caller sets for a block of code (a forced backend, a forced GEMM path, NaN-poisoned outputs for tests, block
sizes under the Triton interpreter) are ContextVars: per thread and per task, restored on exit.

torch.compile: dynamo guards on the ContextVars an op reads while it is traced, so a compiled graph is traced
again when a switch changes (it never keeps the backend it first saw). Dynamo cannot trace ``ContextVar.set``:
a switch entered *inside* a compiled function pushes onto a trace-time overlay instead (plain Python state that
dynamo does trace), so ``use_backend`` means the same inside and outside ``torch.compile``.
"""

from __future__ import annotations

import contextvars
import os
from dataclasses import dataclass

# name -> what it does. Build-time variables (read by setup.py) are listed for the README, not read here.
ENVIRONMENT = {
    "PEFT_KERNELS_BACKEND": "force one backend for every op (reference, aten, cpp, triton, cuda, ...; auto: none)",
    "PEFT_KERNELS_STRICT": "1: a forced backend that cannot serve the inputs raises instead of falling back",
    "PEFT_KERNELS_TUNE_DISPATCH": "0/1: time the backends that can serve a shape once and keep the fastest "
    "(default: on for CUDA tensors, off for CPU tensors)",
    "PEFT_KERNELS_TRITON_AUTOTUNE": "0: one fixed config (plus a small fallback) per Triton kernel, no autotuning",
    "PEFT_KERNELS_TRITON_FLATTEN": "0: do not flatten the persistent tile loops of the Triton GEMMs",
    "PEFT_KERNELS_POISON": "1: kernel launchers fill their outputs with NaN before writing them (tests)",
    "PEFT_KERNELS_PREFIX_ROWS": "prefix tuning computes k/v into prefix_kv_buffers: auto (CUDA tensors), 1 (also CPU "
    "tensors: tests), 0 (never)",
    "TRITON_INTERPRET": "1: Triton kernels run on CPU tensors (Triton's own switch; read before triton is imported)",
}
BUILD_ENVIRONMENT = {
    "PEFT_KERNELS_CUDA": "0: build the extension without its CUDA sources",
    "PEFT_KERNELS_CUDA_ARCHS": 'CUDA architectures to build for (default "9.0a")',
    "PEFT_KERNELS_SKIP_EXT": "1: install the Python package without building the extension",
    "MAX_JOBS": "parallel compile jobs",
}


def _env(name: str, default: str = "") -> str:
    assert name in ENVIRONMENT, name
    return os.environ.get(name, default).strip()


def _env_flag(name: str, default: bool) -> bool:
    value = _env(name).lower()
    if value in ("", "auto"):
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: expected 0 or 1")


@dataclass(frozen=True)
class Settings:
    """The environment as read at import (a process sets these before it starts)."""

    backend: str | None
    strict: bool
    tune_dispatch: bool | None  # None: per device (on for CUDA)
    triton_autotune: bool
    triton_flatten: bool
    poison: bool
    triton_interpret: bool
    prefix_rows: bool | None = None  # None: on CUDA tensors only


def _read_settings() -> Settings:
    backend = _env("PEFT_KERNELS_BACKEND").lower()
    tune = _env("PEFT_KERNELS_TUNE_DISPATCH").lower()
    return Settings(
        backend=None if backend in ("", "auto") else backend,
        strict=_env_flag("PEFT_KERNELS_STRICT", False),
        tune_dispatch=None if tune in ("", "auto") else _env_flag("PEFT_KERNELS_TUNE_DISPATCH", True),
        triton_autotune=_env_flag("PEFT_KERNELS_TRITON_AUTOTUNE", True),
        triton_flatten=_env_flag("PEFT_KERNELS_TRITON_FLATTEN", True),
        poison=_env_flag("PEFT_KERNELS_POISON", False),
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0").strip() == "1",
        prefix_rows=None if _env("PEFT_KERNELS_PREFIX_ROWS").lower() in ("", "auto")
        else _env_flag("PEFT_KERNELS_PREFIX_ROWS", False),
    )


SETTINGS = _read_settings()


# --------------------------------------------------------------------------------------------------
# Per-context switches
# --------------------------------------------------------------------------------------------------
_forced_backend: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar(
    "peft_kernels_backend", default=None
)
_forced_path: contextvars.ContextVar[str | None] = contextvars.ContextVar("peft_kernels_gemm_path", default=None)
_poison: contextvars.ContextVar[bool | None] = contextvars.ContextVar("peft_kernels_poison", default=None)
_interpret_blocks: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "peft_kernels_interpret_blocks", default=None
)


class _TraceOverlay:
    """Switches entered while dynamo traces (ContextVar.set is not traceable); empty outside tracing."""

    def __init__(self) -> None:
        self.stack: list[tuple[contextvars.ContextVar, object]] = []

    def get(self, var: contextvars.ContextVar):
        for entry_var, value in reversed(self.stack):
            if entry_var is var:
                return True, value
        return False, None


_OVERLAY = _TraceOverlay()


def _get(var: contextvars.ContextVar):
    if _OVERLAY.stack:
        found, value = _OVERLAY.get(var)
        if found:
            return value
    return var.get()


class _switch:  # noqa: N801  (used like a function returning a context manager)
    """Sets `var` to `value` within a ``with`` block; a class, not a generator, so dynamo can trace it."""

    def __init__(self, var: contextvars.ContextVar, value) -> None:
        self.var, self.value, self.token = var, value, None

    def __enter__(self):
        import torch

        if torch.compiler.is_compiling():
            _OVERLAY.stack.append((self.var, self.value))
        else:
            self.token = self.var.set(self.value)
        return self

    def __exit__(self, *exc) -> None:
        if self.token is None:
            _OVERLAY.stack.pop()
        else:
            self.var.reset(self.token)
            self.token = None


def forced_backend() -> tuple[str, bool] | None:
    """(name, strict) forced by ``use_backend`` or ``PEFT_KERNELS_BACKEND``, or None for automatic."""
    forced = _get(_forced_backend)
    if forced is not None:
        return forced if forced[0] != "auto" else None
    if SETTINGS.backend is not None:
        return SETTINGS.backend, SETTINGS.strict
    return None


def force_backend(name: str | None, strict: bool = False):
    """Context manager behind ``peft_kernels.use_backend`` (which checks the name)."""
    return _switch(_forced_backend, ("auto", False) if name is None else (name, strict))


def forced_gemm_path() -> str | None:
    return _get(_forced_path)


def force_gemm_path(path: str | None):
    """Force the Triton GEMM path (``"tma"`` or ``"pointer"``; None: per GEMM) within the block."""
    if path not in (None, "tma", "pointer"):
        raise ValueError(f"force_gemm_path: path must be 'tma', 'pointer' or None, got {path!r}")
    return _switch(_forced_path, path)


def poison_outputs() -> bool:
    value = _get(_poison)
    return SETTINGS.poison if value is None else value


def poison(enabled: bool = True):
    """Within the block, kernel launchers allocate their outputs filled with NaN (an unwritten element shows)."""
    return _switch(_poison, bool(enabled))


def interpret_blocks(kernel: str, default):
    """Block sizes a Triton launcher uses under the interpreter (tests shrink them to reach odd tails)."""
    blocks = _get(_interpret_blocks)
    return default if blocks is None or kernel not in blocks else blocks[kernel]


def override_interpret_blocks(**blocks):
    """E.g. ``override_interpret_blocks(fwd=(16, 32))`` within a test."""
    merged = dict(_get(_interpret_blocks) or {})
    merged.update(blocks)
    return _switch(_interpret_blocks, merged)


# --------------------------------------------------------------------------------------------------
# Measured dispatch: which backend was fastest, per (op, device type, shape bucket)
# --------------------------------------------------------------------------------------------------
_tune: contextvars.ContextVar[bool | None] = contextvars.ContextVar("peft_kernels_tune", default=None)
TUNED: dict[tuple, str] = {}


def tune_dispatch(device_type: str) -> bool:
    """Measured dispatch: on by default for CUDA tensors, off for CPU tensors (``tuning()`` overrides)."""
    value = _get(_tune)
    if value is not None:
        return value
    if SETTINGS.tune_dispatch is not None:
        return SETTINGS.tune_dispatch
    return device_type == "cuda"


def tuning_override() -> bool | None:
    """The ``tuning()`` block's setting (None outside one): part of every dispatch cache key."""
    return _get(_tune)


def dispatch_switches() -> tuple:
    """What every dispatch cache key starts with: (forced backend, ``tuning()`` setting)."""
    if _OVERLAY.stack:
        return forced_backend(), _get(_tune)
    forced = _forced_backend.get()  # inlined forced_backend(): this runs on every steady-state op call
    if forced is None:
        forced = (SETTINGS.backend, SETTINGS.strict) if SETTINGS.backend is not None else None
    elif forced[0] == "auto":
        forced = None
    return forced, _tune.get()


def tuning(enabled: bool):
    """Within the block, measured dispatch is on (``True``) or off (``False``) for every device."""
    return _switch(_tune, bool(enabled))


def tuned_choices() -> dict[tuple, str]:
    """What measured dispatch chose: ``{(op, device type, key): backend}``."""
    return dict(TUNED)


# Dispatch caches that hold measured choices (each op family's): emptied with the measurements.
_DISPATCH_CACHES: list = []


def clear_tuning_cache() -> None:
    TUNED.clear()
    for cache in _DISPATCH_CACHES:
        cache.clear()
