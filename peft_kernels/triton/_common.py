"""Host and device helpers shared by the Triton GEMM kernels (LoRA, BitFit): the L2-grouped tile order of the
persistent loops, the SM count, what a TMA descriptor can address, and the descriptor scratch allocator."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _config

_INTERPRET = _config.SETTINGS.triton_interpret
HAS_TMA_API = hasattr(tl, "make_tensor_descriptor")


@triton.jit
def tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # GROUP_M row-tiles share the same column tiles consecutively, so W/B tiles stay in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda" and not _INTERPRET:
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few persistent programs so each walks several tiles


def tma_layout(t: torch.Tensor) -> tuple[bool, int] | None:
    """(stored transposed, leading stride) of a 2-D operand as a TMA descriptor sees it, or None if TMA
    cannot address it: unit inner stride, 16-byte aligned leading stride and base pointer."""
    if t.dim() != 2 or t.data_ptr() % 16:
        return None
    es = t.element_size()
    if t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0 and t.stride(0) >= max(1, t.size(1)):
        return False, t.stride(0)
    if t.stride(0) == 1 and (t.stride(1) * es) % 16 == 0 and t.stride(1) >= max(1, t.size(0)):
        return True, t.stride(1)
    return None


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether the TMA path can take every given 2-D operand (as a row-major or transposed view):
    a Hopper+ GPU (or the interpreter) and 16-byte aligned strides and bases."""
    if not HAS_TMA_API:
        return False
    dev = tensors[0].device
    if not _INTERPRET:
        if dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 9:
            return False
    return all(tma_layout(t) is not None for t in tensors)


class _TmaScratch:
    """Scratch allocator for device-side tensor descriptors (triton.set_allocator)."""

    def __init__(self) -> None:
        self.device: torch.device | str = "cpu"

    def __call__(self, size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=self.device)


_tma_allocator = _TmaScratch()


def ensure_allocator(device: torch.device) -> None:
    # Device-side descriptors need a scratch allocator. triton keeps it in a ContextVar, which autograd's
    # backward threads do not inherit, so check on every launch.
    _tma_allocator.device = "cpu" if _INTERPRET else device
    try:  # keep an allocator the user set; the module is private, so tolerate its changes
        from triton.runtime._allocation import NullAllocator, _allocator

        current = _allocator.get() if hasattr(_allocator, "get") else _allocator
        if not isinstance(current, NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_tma_allocator)


def use_tma(op: str, *tensors: torch.Tensor) -> bool:
    """Whether a GEMM takes the TMA path for these operands (``_config.force_gemm_path`` can force either)."""
    forced = _config.forced_gemm_path()
    if forced == "pointer":
        return False
    ok = tma_compatible(*tensors)
    if forced == "tma" and not ok:
        shapes = ", ".join(f"{tuple(t.shape)}/{t.stride()}/{t.dtype}" for t in tensors)
        raise ValueError(f"peft_kernels {op} (triton): TMA path forced but operands are not TMA-compatible: {shapes}")
    return ok


def alloc(shape, dtype, device) -> torch.Tensor:
    """An output buffer; NaN-filled under ``_config.poison`` so an element a kernel fails to write shows."""
    if _config.poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
