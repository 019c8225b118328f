"""Prefix encoders: the trainable per-layer key/value prefixes of Prefix-Tuning and P-Tuning v2.

Both modules take no input and return one ``(prefix_k, prefix_v)`` pair per layer, each ``[Hkv, P, D]`` (shared by
the batch), ready for :func:`peft_kernels.ops.prefix_attention.prefix_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _check_positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


class PrefixEncoder(nn.Module):
    """P virtual tokens whose keys and values are trained for every attention layer.

    ``projection=True`` (Prefix-Tuning, Li & Liang 2021): an embedding of P tokens of width ``hidden_size`` is
    reparameterized by an MLP (Linear -> tanh -> Linear) into ``num_layers * 2 * Hkv * D`` values per token; the
    MLP only stabilizes training and can be dropped once trained (:meth:`to_static`).
    ``projection=False`` (P-Tuning v2 deep prompts): the embedding holds those values directly.

    The parameter layout and initialization (``nn.Embedding`` / ``nn.Linear`` defaults) are HF peft's
    ``PrefixEncoder``, with ``token_dim = Hkv * D`` as peft sets it, so a peft prefix state dict loads as is.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_virtual_tokens: int,
        projection: bool = True,
        hidden_size: int | None = None,
        projection_hidden: int = 512,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__()
        self.num_layers = _check_positive_int("PrefixEncoder", "num_layers", num_layers)
        self.num_kv_heads = _check_positive_int("PrefixEncoder", "num_kv_heads", num_kv_heads)
        self.head_dim = _check_positive_int("PrefixEncoder", "head_dim", head_dim)
        self.num_virtual_tokens = _check_positive_int("PrefixEncoder", "num_virtual_tokens", num_virtual_tokens)
        if not isinstance(projection, bool):
            raise TypeError(f"PrefixEncoder: projection must be a bool, got {projection!r}")
        self.projection = projection
        token_dim = num_kv_heads * head_dim
        out_dim = num_layers * 2 * token_dim
        kw = {"dtype": dtype, "device": device}
        if self.projection:
            self.hidden_size = _check_positive_int("PrefixEncoder", "hidden_size",
                                                   token_dim if hidden_size is None else hidden_size)
            self.projection_hidden = _check_positive_int("PrefixEncoder", "projection_hidden", projection_hidden)
            self.embedding = nn.Embedding(num_virtual_tokens, self.hidden_size, **kw)
            self.transform = nn.Sequential(
                nn.Linear(self.hidden_size, self.projection_hidden, **kw),
                nn.Tanh(),
                nn.Linear(self.projection_hidden, out_dim, **kw),
            )
        else:
            if hidden_size is not None and hidden_size != out_dim:
                raise ValueError(
                    f"PrefixEncoder: hidden_size={hidden_size} only applies with projection=True (without it each "
                    f"virtual token holds num_layers * 2 * num_kv_heads * head_dim = {out_dim} values)"
                )
            self.hidden_size, self.projection_hidden = out_dim, None
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim, **kw)

    def forward(self) -> list[tuple[Tensor, Tensor]]:
        x = self.embedding.weight
        if self.projection:
            x = self.transform(x)
        L, H, P, D = self.num_layers, self.num_kv_heads, self.num_virtual_tokens, self.head_dim
        # peft's order per token: [layer0 K, layer0 V, layer1 K, ...] x heads x head_dim.
        x = x.view(P, 2 * L, H, D).permute(1, 2, 0, 3)  # [2L, Hkv, P, D]; slices keep a unit last stride
        return [(x[2 * i], x[2 * i + 1]) for i in range(L)]

    @torch.no_grad()
    def to_static(self) -> PrefixParameters:
        """The current prefixes as plain parameters (the MLP folded away), e.g. for inference."""
        return PrefixParameters([(k.detach(), v.detach()) for k, v in self()], dtype=self.embedding.weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"num_virtual_tokens={self.num_virtual_tokens}, projection={self.projection}"
        )


class PrefixParameters(nn.Module):
    """User-given per-layer prefixes ``[(prefix_k, prefix_v), ...]``, each ``[Hkv, P, D]``, as trainable parameters.

    Every layer must have the same Hkv, P and D (one prefix length for the whole model).
    """

    def __init__(self, prefixes: Sequence[tuple[Tensor, Tensor]], dtype: torch.dtype | None = torch.float32) -> None:
        super().__init__()
        if isinstance(prefixes, Tensor) or not isinstance(prefixes, Sequence) or len(prefixes) == 0:
            raise ValueError("PrefixParameters: prefixes must be a non-empty list of (prefix_k, prefix_v) pairs")
        keys, values, first = [], [], None
        for i, pair in enumerate(prefixes):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"PrefixParameters: layer {i}: expected a (prefix_k, prefix_v) pair, got {pair!r:.80}")
            k, v = pair
            for name, t in (("prefix_k", k), ("prefix_v", v)):
                if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"PrefixParameters: layer {i}: {name} must be a float [Hkv, P, D] tensor, got {got}"
                    )
            if k.shape != v.shape:
                raise ValueError(
                    f"PrefixParameters: layer {i}: prefix_k {tuple(k.shape)} and prefix_v {tuple(v.shape)} must match"
                )
            if k.shape[1] < 1:
                raise ValueError(f"PrefixParameters: layer {i} has no virtual tokens (P = 0)")
            if first is None:
                first = tuple(k.shape)
            elif tuple(k.shape) != first:
                what = ["KV heads Hkv", "virtual tokens P", "head dim D"]
                dim = next(d for d in range(3) if k.shape[d] != first[d])
                raise ValueError(
                    f"PrefixParameters: layer {i} has {what[dim]} = {k.shape[dim]} but layer 0 has {first[dim]} "
                    f"(shapes {tuple(k.shape)} vs {first}); every layer's prefix must have the same [Hkv, P, D]"
                )
            keys.append(nn.Parameter(k.detach().to(dtype or k.dtype).clone()))
            values.append(nn.Parameter(v.detach().to(dtype or v.dtype).clone()))
        self.keys, self.values = nn.ParameterList(keys), nn.ParameterList(values)
        self.num_layers = len(keys)
        self.num_kv_heads, self.num_virtual_tokens, self.head_dim = first

    def forward(self) -> list[tuple[Tensor, Tensor]]:
        return list(zip(self.keys, self.values))

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"num_virtual_tokens={self.num_virtual_tokens}"
        )
