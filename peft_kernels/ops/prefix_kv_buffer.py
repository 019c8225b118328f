"""K/V buffers with the prefix rows reserved: what lets prefix attention's ``concat`` backend run one SDPA call over
``[prefix; k]`` without a concatenation copy.

``prefix_kv_buffer`` allocates ``[B, P + L, Hkv, D]`` (transformers' K/V layout with P more rows per sequence) and
returns its last L rows as the ``[B, Hkv, L, D]`` view a model computes keys or values into. ``prefix_attention``
recognises such a view (``reserved_rows``), writes the prefix into the P rows in front of it (B·P·Hkv·D elements,
against the 2·B·L·Hkv·D a concatenation reads and writes) and hands SDPA the whole buffer; the gradients of k and v
come back as views of SDPA's dK/dV, whose first P rows are the prefix's.

Only buffers made here are recognised (a registry of their storages, held weakly): writing in front of any other
view would overwrite memory its owner may use.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from peft_kernels.ops import _validate as val

OP = "prefix_kv_buffer"

# storage of a buffer -> (P, [B, P + L, H, D], storage offset of the buffer), held weakly. Keyed by the storage, not
# the base tensor: a detached view (what activation checkpointing saves and hands back) has no ``_base``.
_RESERVED = WeakIdKeyDictionary()


def prefix_kv_buffer(batch: int, seq_len: int, kv_heads: int, head_dim: int, num_prefix: int, *,
                     dtype: torch.dtype | None = None, device=None) -> Tensor:
    """An uninitialised ``[batch, kv_heads, seq_len, head_dim]`` tensor laid out as transformers lays out K/V
    (``[B, L, H, D]`` in memory) with ``num_prefix`` rows reserved in front of each sequence.

    Write keys (or values) into it, or compute them into it, and pass it to ``prefix_attention`` with a prefix of
    ``num_prefix`` virtual tokens: the ``concat`` backend then attends over the whole buffer without copying k/v.
    The buffer is the op's to write in front of the view; it is recognised only while it is the view returned here
    or any view of exactly these rows (``.view``/``.transpose``/``.detach()`` of it), with P equal to ``num_prefix``.
    """
    sizes = {"batch": batch, "seq_len": seq_len, "kv_heads": kv_heads, "head_dim": head_dim, "num_prefix": num_prefix}
    batch, seq_len, kv_heads, head_dim, num_prefix = (val.check_int(OP, k, n, minimum=1) for k, n in sizes.items())
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{OP}: dtype must be a floating torch.dtype (K/V's), got {dtype!r}")
    full = torch.empty(batch, num_prefix + seq_len, kv_heads, head_dim, dtype=dtype, device=device)
    _RESERVED[full.untyped_storage()] = (num_prefix, tuple(full.shape), full.storage_offset())
    return full[:, num_prefix:].transpose(1, 2)


def reserved_rows(t: Tensor, P: int) -> Tensor | None:
    """The ``[B, H, P + L, D]`` view of the buffer ``t`` [B, H, L, D] was made in by ``prefix_kv_buffer`` with P
    reserved rows (t is its last L rows), or None when t is not such a view."""
    if torch.compiler.is_compiling():  # traced code sees no buffer (and dynamo cannot trace the registry)
        return None
    try:
        entry = _RESERVED.get(t.untyped_storage())
    except (RuntimeError, NotImplementedError):  # no storage to read (a tensor subclass or wrapper)
        return None
    if entry is None or entry[0] != P:
        return None
    _, (B, rows, H, D), offset = entry
    strides = (rows * H * D, D, H * D, 1)
    if (tuple(t.shape) != (B, H, rows - P, D) or not same_strides(t, strides)
            or t.storage_offset() != offset + P * H * D):
        return None
    return t.as_strided((B, H, rows, D), strides, offset)


def same_strides(t: Tensor, strides) -> bool:
    """t has these strides in every dim of size > 1 (a size-1 dim's stride is arbitrary: views give it any)."""
    return all(n == 1 or a == b for n, a, b in zip(t.shape, t.stride(), strides))


def is_dense(t: Tensor) -> bool:
    """Whether t's elements fill its memory with no gaps, in some order of its dims (a prefix_kv_buffer view does
    not: P rows between its sequences)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def write_prefix(full: Tensor, prefix: Tensor) -> None:
    """Write ``prefix`` ([H, P, D] shared by the batch, or [B, H, P, D]) into the reserved rows of ``full``
    ([B, H, P + L, D], from ``reserved_rows``), cast to the buffer's dtype.

    Through an alias of the storage with its own version counter: the rows written are no part of any view autograd
    saved (k itself is not touched), so k's version, which its consumers' backward checks, stays as it is."""
    B, H, _, D = full.shape
    P = prefix.shape[-2]
    with torch.no_grad():
        alias = full.new_empty(0).set_(full.untyped_storage(), full.storage_offset(), full.shape, full.stride())
        alias.narrow(2, 0, P).copy_(prefix.expand(B, H, P, D) if prefix.dim() == 3 else prefix)
