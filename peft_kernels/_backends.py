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


def native_function(name: str):
    """A function of the extension module itself (an eager-mode entry point such as a C++ autograd node), or None
    where the extension is not loaded or was built before it existed."""
    if not _NATIVE_STATUS[0]:
        return None
    from peft_kernels import _C

    return getattr(_C, name, None)


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


def cuda_kernel_status(op: str) -> str | None:
    """Why the loaded peft_kernels._C has no CUDA kernel for native op `op`, or None (probe it once, at import).
    None too when the extension is not loaded at all: ``availability`` already says why then."""
    if not native_status()[0]:
        return None
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"peft_kernels::{op}", "CUDA")
    except RuntimeError:  # the schema itself is missing: an extension built before the op existed
        has = False
    if has:
        return None
    return (f"peft_kernels._C has no CUDA kernel for {op} (built before it existed, or without nvcc); rebuild "
            "with `pip install -e . --no-build-isolation`")


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

