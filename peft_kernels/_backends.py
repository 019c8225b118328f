"""Loads the native extension and probes Triton (never failing the import of peft_kernels), and says what a
backend kind needs to run: ``availability(requires, device_type)``. Forcing a backend: ``use_backend``.

The backends themselves are declared per op family (peft_kernels/_op.py); this module knows only the kinds:
``native`` (peft_kernels._C loaded), ``native_cuda`` (built with its CUDA sources), ``triton`` (installed; CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util

import torch

from peft_kernels import _config


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
    return _config.SETTINGS.triton_interpret


def availability(requires: str | None, device_type: str) -> str | None:
    """Why a backend needing `requires` cannot run on `device_type` tensors (None: it can, as far as loading goes)."""
    if requires is None:
        return None
    if requires in ("native", "native_cuda"):
        ok, detail = native_status()
        if not ok:
            return detail
        if requires == "native_cuda":
            if "cuda" not in detail.split(","):
                return "peft_kernels._C was built without CUDA (nvcc not found or PEFT_KERNELS_CUDA=0 at build time)"
            if device_type != "cuda":
                return f"CUDA C++ kernels run on CUDA tensors, got {device_type} tensors"
        return None
    if requires == "triton":
        ok, detail = triton_status()
        if not ok:
            return detail
        if device_type == "cuda" or (device_type == "cpu" and triton_interpreting()):
            return None
        return f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device_type} tensors"
    raise ValueError(f"unknown backend requirement {requires!r}")


def check_backend_name(name: str) -> None:
    from peft_kernels._op import known_backends

    known = known_backends()
    if name not in known:
        raise ValueError(f"unknown backend {name!r}; the op families declare: {', '.join(sorted(known))} (or 'auto')")


def use_backend(name: str | None, strict: bool = False):
    """Force a backend for the ops called inside the block (inside or outside ``torch.compile``).

    ``strict=False``: where the forced backend cannot serve an input, the op falls back to the next backend
    in its preference order (with a warning once). ``strict=True``: it raises NotImplementedError instead.
    ``None`` (or ``"auto"``) restores automatic selection.
    """
    if name == "auto":
        name = None
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"use_backend: name must be a str or None, got {type(name).__name__}")
        check_backend_name(name)
    if not isinstance(strict, bool):
        raise TypeError(f"use_backend: strict must be a bool, got {type(strict).__name__}")
    return _config.force_backend(name, strict)


def on_device(device: torch.device):
    """Makes `device` current while Triton launches: Triton takes the current device and stream, not the
    tensors' (a model spread over several GPUs would otherwise launch on the wrong one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# LEGACY (removed when the last op family is ported to peft_kernels/_op.py): the old per-op registry.
# --------------------------------------------------------------------------------------------------
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

BACKENDS = ("reference", "cpu", "cuda", "triton")
_TUNED = _config.TUNED


def forced_backend():
    return _config.forced_backend()


def tuning_enabled(device_type: str) -> bool:
    return _config.tune_dispatch(device_type)


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


_warned: set[tuple[str, str]] = set()


def why_not(op: str, backend: str, device_type: str, *args, **kwargs) -> str | None:
    entry = _REGISTRY[op]
    if backend not in entry.supports:
        return f"{op} has no {backend} implementation"
    reason = backend_status(backend, device_type)
    if reason is None:
        reason = entry.supports[backend](*args, **kwargs)
    return reason


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


def _unused_on_device(device):
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


