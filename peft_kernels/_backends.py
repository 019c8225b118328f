"""Loads the native extension and Triton, and decides which backend serves each op.

Four backends: ``reference`` (plain PyTorch, any device), ``cpu`` (C++ in csrc/cpu), ``cuda`` (csrc/cuda),
``triton`` (peft_kernels/triton; on the GPU, or on CPU tensors under TRITON_INTERPRET=1). Each op family
registers, per backend, a function that says why it cannot serve given inputs (or None when it can).
Selection is automatic (the first backend in the op's preference order for the device that can serve), or
forced with ``PEFT_KERNELS_BACKEND=name`` or ``with peft_kernels.use_backend(name):``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")


# --------------------------------------------------------------------------------------------------
# The native extension and Triton, loaded without ever failing the import of peft_kernels.
# --------------------------------------------------------------------------------------------------
def _load_native() -> tuple[bool, str]:
    try:
        from peft_kernels import _C  # noqa: F401  (importing registers torch.ops.peft_kernels.*)

        return True, torch.ops.peft_kernels.build_info()
    except (ImportError, OSError, AttributeError, RuntimeError) as exc:  # missing, or built for another torch
        return False, (
            f"native extension peft_kernels._C not usable ({exc}); build it with "
            "`pip install -e . --no-build-isolation` (needs a C++ compiler; nvcc for the CUDA kernels)"
        )


def _probe_triton() -> tuple[bool, str]:
    # Found without importing it: TRITON_INTERPRET must be set before triton's first import, which may
    # come later than ours.
    if importlib.util.find_spec("triton") is None:
        return False, "triton not installed; `pip install triton`"
    try:
        return True, importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return True, "unknown version"


# Probed once at import, so backend selection is plain Python over constants (torch.compile traces it).
_NATIVE_STATUS = _load_native()
_TRITON_STATUS = _probe_triton()


def native_status() -> tuple[bool, str]:
    """(loaded, detail): detail is the build info ("cpu" or "cpu,cuda") or why loading failed."""
    return _NATIVE_STATUS


def triton_status() -> tuple[bool, str]:
    return _TRITON_STATUS


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_status(backend: str, device_type: str) -> str | None:
    """Why `backend` cannot run on `device_type` at all, or None when it can."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if backend != device_type:
            return f"the {backend} backend runs on {backend} tensors only, got {device_type} tensors"
        ok, detail = native_status()
        if not ok:
            return detail
        if backend == "cuda" and "cuda" not in detail.split(","):
            return "peft_kernels._C was built without CUDA (nvcc not found or PEFT_KERNELS_CUDA=0 at build time)"
        return None
    if backend == "triton":
        ok, detail = triton_status()
        if not ok:
            return detail
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreting():
            return None
        return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device_type} tensors"
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


# --------------------------------------------------------------------------------------------------
# Per-op registry
# --------------------------------------------------------------------------------------------------
Supports = Callable[..., "str | None"]


def _always(*args, **kwargs) -> str | None:
    return None


@dataclass
class OpEntry:
    name: str
    preference: dict[str, tuple[str, ...]]
    supports: dict[str, Supports] = field(default_factory=dict)


_REGISTRY: dict[str, OpEntry] = {}


def register_op(
    name: str,
    supports: dict[str, Supports],
    preference: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Declare an op family: which backends implement it and, for each, which inputs they accept."""
    pref = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
    if preference:
        pref.update(preference)
    entry = OpEntry(name, pref, {"reference": _always})
    entry.supports.update(supports)
    _REGISTRY[name] = entry


def registered_ops() -> dict[str, OpEntry]:
    return dict(_REGISTRY)


# --------------------------------------------------------------------------------------------------
# Forcing a backend
# --------------------------------------------------------------------------------------------------
_forced: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar("peft_kernels_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str | None, strict: bool = False) -> Iterator[None]:
    """Force a backend for the ops called inside the block.

    ``strict=False``: where the forced backend cannot serve an input, the op falls back to the next backend
    in its preference order (with a warning once). ``strict=True``: it raises NotImplementedError instead.
    ``None`` restores automatic selection.
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; choose one of {BACKENDS}")
    token = _forced.set(None if name is None else (name, strict))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> tuple[str, bool] | None:
    forced = _forced.get()
    if forced is not None:
        return forced
    env = os.environ.get("PEFT_KERNELS_BACKEND", "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"PEFT_KERNELS_BACKEND={env!r} is not one of {BACKENDS} (or 'auto')")
        return env, os.environ.get("PEFT_KERNELS_STRICT", "0") == "1"
    return None


_warned: set[tuple[str, str]] = set()


def why_not(op: str, backend: str, device_type: str, *args, **kwargs) -> str | None:
    entry = _REGISTRY[op]
    if backend not in entry.supports:
        return f"{op} has no {backend} implementation"
    reason = backend_status(backend, device_type)
    if reason is None:
        reason = entry.supports[backend](*args, **kwargs)
    return reason


def tuning_enabled(device_type: str) -> bool:
    """Measured dispatch: on by default for CUDA tensors, off for CPU; PEFT_KERNELS_TUNE_DISPATCH=0/1 overrides."""
    env = os.environ.get("PEFT_KERNELS_TUNE_DISPATCH", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return device_type == "cuda"


# (op, tune key) -> the backend that measured fastest for inputs of that key.
_TUNED: dict[tuple, str] = {}


def _time_once(run: Callable[[str], object], backend: str, device_type: str, reps: int = 3) -> float:
    run(backend)  # warm-up: Triton compiles and autotunes here, cuBLAS picks its algorithms
    if device_type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run(backend)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    import time

    t0 = time.perf_counter()
    for _ in range(reps):
        run(backend)
    return (time.perf_counter() - t0) * 1e3 / reps


def on_device(device: torch.device):
    """Makes `device` current while Triton launches: Triton takes the current device and stream, not the
    tensors' (a model spread over several GPUs would otherwise launch on the wrong one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fastest(op: str, candidates: list[str], device_type: str, tune_key, tune_run) -> str:
    """Times each candidate once per (op, key) and remembers the winner; under torch.compile (no timing
    possible while tracing) a remembered winner is used, else the first candidate."""
    key = (op, device_type, tune_key)
    if key in _TUNED:
        return _TUNED[key]
    if torch.compiler.is_compiling():
        return candidates[0]
    times = {}
    for name in candidates:
        try:
            with torch.no_grad():
                times[name] = _time_once(tune_run, name, device_type)
        except Exception as exc:  # a backend that fails here (compile error, out of resources) is not chosen
            warnings.warn(f"peft_kernels.{op}: backend {name!r} failed while being timed ({exc!r})", stacklevel=4)
    if not times:
        return candidates[0]
    _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def clear_tuning_cache() -> None:
    _TUNED.clear()


def tuned_choices() -> dict[tuple, str]:
    return dict(_TUNED)


def select(op: str, device_type: str, *args, tune_key=None, tune_run=None, **kwargs) -> str:
    """The backend that will run `op` on these inputs (the arguments are passed to each `supports`).

    Forced backends win. Otherwise, where the op passes ``tune_key``/``tune_run`` (a callable running the
    op's forward and backward with a given backend) and tuning is enabled, the fastest of the backends that
    can serve is measured once per key; else the first in the op's preference order that can serve.
    """
    entry = _REGISTRY[op]
    order = entry.preference.get(device_type, ("reference",))
    forced = forced_backend()
    if forced is not None:
        name, strict = forced
        reason = why_not(op, name, device_type, *args, **kwargs)
        if reason is None:
            return name
        if strict:
            raise NotImplementedError(f"peft_kernels.{op}: backend {name!r} cannot serve these inputs: {reason}")
        if (op, name) not in _warned:
            _warned.add((op, name))
            warnings.warn(
                f"peft_kernels.{op}: backend {name!r} cannot serve these inputs ({reason}); falling back",
                stacklevel=3,
            )
    # The reference is the fallback, not a contender: it is never faster than the kernels on purpose.
    candidates = [name for name in order if why_not(op, name, device_type, *args, **kwargs) is None]
    if not candidates:
        return "reference"
    fast = [name for name in candidates if name != "reference"]
    if len(fast) > 1 and tune_run is not None and tuning_enabled(device_type):
        return _fastest(op, fast, device_type, tune_key, tune_run)
    return candidates[0]


def table(device_type: str | None = None) -> list[dict[str, str]]:
    """One row per (op, backend): whether it can run on the device type at all, and why not."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for op, entry in sorted(_REGISTRY.items()):
        order = entry.preference.get(device_type, ())
        for backend in BACKENDS:
            if backend not in entry.supports:
                status = "not implemented"
            else:
                reason = backend_status(backend, device_type)
                status = "ok" if reason is None else f"unavailable: {reason}"
            rank = str(order.index(backend) + 1) if backend in order and backend in entry.supports else "-"
            rows.append({"op": op, "backend": backend, "device": device_type, "preference": rank, "status": status})
    return rows
