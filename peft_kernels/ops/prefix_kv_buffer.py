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

# storage of a buffer -> (P, B, P + L, row width, storage offset of the buffer), held weakly. Keyed by the storage,
# not the base tensor: a detached view (what activation checkpointing saves and hands back) has no ``_base``.
_RESERVED = WeakIdKeyDictionary()


def reserved_buffer(batch: int, seq_len: int, width: int, num_prefix: int, *, dtype=None, device=None) -> Tensor:
    """The ``[batch, seq_len, width]`` last rows of a ``[batch, num_prefix + seq_len, width]`` buffer (a projection's
    output with P rows reserved in front of each sequence). K/V heads viewed out of any block of its columns (a
    fused q|k|v projection's k or v) are recognised by ``reserved_rows``; arguments unchecked (library-internal)."""
    full = torch.empty(batch, num_prefix + seq_len, width, dtype=dtype, device=device)
    _RESERVED[full.untyped_storage()] = (num_prefix, batch, num_prefix + seq_len, width, full.storage_offset())
    return full[:, num_prefix:]


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
    rows = reserved_buffer(batch, seq_len, kv_heads * head_dim, num_prefix, dtype=dtype, device=device)
    return rows.unflatten(2, (kv_heads, head_dim)).transpose(1, 2)


def reserved_rows(t: Tensor, P: int) -> Tensor | None:
    """The ``[B, H, P + L, D]`` view of the buffer ``t`` [B, H, L, D] was made in (by ``prefix_kv_buffer`` or
    ``reserved_buffer``) with P reserved rows (t is its last L rows, in one block of its columns), or None when t is
    not such a view."""
    if torch.compiler.is_compiling():  # traced code sees no buffer (and dynamo cannot trace the registry)
        return None
    try:
        entry = _RESERVED.get(t.untyped_storage())
    except (RuntimeError, NotImplementedError):  # no storage to read (a tensor subclass or wrapper)
        return None
    if entry is None or entry[0] != P or t.dim() != 4:
        return None
    _, B, rows, width, offset = entry
    H, D = t.shape[1], t.shape[3]
    strides = (rows * width, D, width, 1)
    column = t.storage_offset() - offset - P * width  # where t's heads start in a row
    if (tuple(t.shape) != (B, H, rows - P, D) or not same_strides(t, strides)
            or not 0 <= column <= width - H * D):
        return None
    return t.as_strided((B, H, rows, D), strides, t.storage_offset() - P * width)


def share_rows(a: Tensor, b: Tensor) -> bool:
    """Whether the views a and b [B, H, L, D] hold columns of the same rows (k and v passed as the same buffer, or as
    overlapping heads of one): the P rows in front of them can hold one prefix only."""
    if a.untyped_storage() is not b.untyped_storage():
        return False
    a0, b0 = a.storage_offset(), b.storage_offset()
    return a0 < b0 + b.shape[1] * b.shape[3] and b0 < a0 + a.shape[1] * a.shape[3]


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
