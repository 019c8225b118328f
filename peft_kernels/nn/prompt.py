"""The virtual tokens of Prompt Tuning and P-Tuning: modules that take no input and return them, [P, H].

:class:`SoftPrompt` (Lester et al. 2021) holds the P vectors directly; :class:`PromptEncoder` (Liu et al. 2021)
produces them from P trained input embeddings through a bidirectional LSTM and an MLP head, or an MLP only, and
can be frozen into a :class:`SoftPrompt` for inference (the encoder is a training-time reparameterization).
Both use HF peft's parameter names and shapes (``embedding.weight``; ``lstm_head.*``, ``mlp_head.*``), so a
peft ``prompt_encoder`` state dict loads as is. Their output goes to
:func:`peft_kernels.ops.prompt.soft_prompt_embed` as the shared prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INITS = ("random", "sample_vocab", "text")
ENCODERS = ("mlp", "lstm")


def _check_positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def repeat_to_length(token_ids: Sequence[int], length: int) -> list[int]:
    """Trim, or repeat then trim, a text's token ids to ``length`` (peft's TEXT init)."""
    ids = [int(i) for i in token_ids]
    if not ids:
        raise ValueError("SoftPrompt: the init text has no tokens")
    return (ids * math.ceil(length / len(ids)))[:length]


class SoftPrompt(nn.Module):
    """P trainable virtual-token vectors of width H (the model's embedding width).

    ``init``: ``"random"`` (``nn.Embedding``'s N(0, 1), as peft's RANDOM), ``"sample_vocab"`` (rows of
    ``embedding_weight`` at random token ids) or ``"text"`` (rows at ``init_token_ids``, trimmed or repeated to P).
    The vectors are kept in ``dtype`` (fp32 master weights by default; the op casts them to the model's dtype).
    """

    def __init__(self, num_virtual_tokens: int, hidden_size: int, init: str = "random", *,
                 embedding_weight: Tensor | None = None, init_token_ids: Sequence[int] | Tensor | None = None,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.num_virtual_tokens = _check_positive_int("SoftPrompt", "num_virtual_tokens", num_virtual_tokens)
        self.hidden_size = _check_positive_int("SoftPrompt", "hidden_size", hidden_size)
        if init not in INITS:
            raise ValueError(f"SoftPrompt: init must be one of {INITS}, got {init!r}")
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size, dtype=dtype, device=device)
        if init == "random":
            return
        if embedding_weight is None:
            raise ValueError(f"SoftPrompt: init={init!r} needs embedding_weight (the model's [V, H] input embeddings)")
        if embedding_weight.dim() != 2 or embedding_weight.shape[1] != hidden_size:
            raise ValueError(f"SoftPrompt: embedding_weight of shape {tuple(embedding_weight.shape)} does not have "
                             f"hidden size {hidden_size}")
        V = embedding_weight.shape[0]
        if init == "sample_vocab":
            ids = torch.randint(0, V, (num_virtual_tokens,), device=embedding_weight.device)
        else:
            if init_token_ids is None:
                raise ValueError("SoftPrompt: init='text' needs init_token_ids (the init text's token ids)")
            raw = init_token_ids.tolist() if isinstance(init_token_ids, Tensor) else list(init_token_ids)
            ids = torch.tensor(repeat_to_length(raw, num_virtual_tokens), device=embedding_weight.device)
            if int(ids.min()) < 0 or int(ids.max()) >= V:
                raise ValueError(f"SoftPrompt: init_token_ids must be in [0, {V}), got [{int(ids.min())}, "
                                 f"{int(ids.max())}]")
        with torch.no_grad():
            self.embedding.weight.copy_(embedding_weight.detach()[ids].to(dtype))

    @classmethod
    def from_table(cls, table: Tensor, dtype: torch.dtype | None = None) -> SoftPrompt:
        """A SoftPrompt holding ``table`` [P, H] (copied)."""
        if not isinstance(table, Tensor) or table.dim() != 2 or not table.is_floating_point():
            raise ValueError(f"SoftPrompt.from_table: expected a float [P, H] tensor, got "
                             f"{tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__}")
        module = cls(table.shape[0], table.shape[1], dtype=dtype or table.dtype, device=table.device)
        with torch.no_grad():
            module.embedding.weight.copy_(table)
        return module

    def forward(self) -> Tensor:
        return self.embedding.weight

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, hidden_size={self.hidden_size}"


class LSTMHead(nn.Module):
    """A bidirectional, batch-first ``nn.LSTM`` (same parameter names, shapes and init, so peft's ``lstm_head``
    weights load) that is not an ``nn.LSTM``: dynamo refuses to trace those, so under torch.compile this one runs
    the same math unrolled over the P steps (eager runs ATen's fused ``torch.lstm``)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout
        kw = {"dtype": dtype, "device": device}
        bound = hidden_size**-0.5
        for layer in range(num_layers):
            width = input_size if layer == 0 else 2 * hidden_size
            for sfx in ("", "_reverse"):
                for name, shape in ((f"weight_ih_l{layer}{sfx}", (4 * hidden_size, width)),
                                    (f"weight_hh_l{layer}{sfx}", (4 * hidden_size, hidden_size)),
                                    (f"bias_ih_l{layer}{sfx}", (4 * hidden_size,)),
                                    (f"bias_hh_l{layer}{sfx}", (4 * hidden_size,))):
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **kw).uniform_(-bound, bound)))

    def _flat(self) -> list[Tensor]:
        return [getattr(self, f"{kind}_l{layer}{sfx}") for layer in range(self.num_layers)
                for sfx in ("", "_reverse") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def forward(self, x: Tensor) -> Tensor:
        """x [N, P, input_size] -> [N, P, 2 * hidden_size] (the LSTM's output sequence)."""
        if torch.compiler.is_compiling():
            return self._unrolled(x)
        h0 = x.new_zeros(2 * self.num_layers, x.shape[0], self.hidden_size)
        out, _, _ = torch.lstm(x, (h0, h0), self._flat(), True, self.num_layers, self.dropout, self.training,
                               True, True)
        return out

    def _unrolled(self, x: Tensor) -> Tensor:
        h_all = x
        for layer in range(self.num_layers):
            outs = []
            for sfx in ("", "_reverse"):
                w_hh = getattr(self, f"weight_hh_l{layer}{sfx}")
                bias = getattr(self, f"bias_ih_l{layer}{sfx}") + getattr(self, f"bias_hh_l{layer}{sfx}")
                gates_x = F.linear(h_all, getattr(self, f"weight_ih_l{layer}{sfx}"), bias)  # [N, P, 4h]
                N, P = gates_x.shape[:2]
                h = c = gates_x.new_zeros(N, self.hidden_size)
                seq = [None] * P
                for t in (range(P - 1, -1, -1) if sfx else range(P)):
                    i, f, g, o = (gates_x[:, t] + F.linear(h, w_hh)).chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    seq[t] = h
                outs.append(torch.stack(seq, dim=1))
            h_all = torch.cat(outs, dim=-1)
            if layer < self.num_layers - 1 and self.dropout > 0:
                h_all = F.dropout(h_all, self.dropout, self.training)
        return h_all

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}, "
                "bidirectional=True, batch_first=True")


class PromptEncoder(nn.Module):
    """P-Tuning's prompt encoder: P input embeddings -> (bidirectional LSTM ->) MLP -> P virtual tokens [P, H].

    ``encoder="lstm"``: a bidirectional LSTM (:class:`LSTMHead`: ``nn.LSTM``'s parameters) of width
    ``encoder_hidden_size`` and ``num_layers`` layers, then
    Linear(2h, 2h) -> ReLU -> Linear(2h, H). ``encoder="mlp"``: Linear(H, h) -> ReLU -> Linear(h, h) -> ReLU ->
    Linear(h, H). These are peft's ``PromptEncoder`` layers (names, shapes, default init), so its weights map.
    """

    def __init__(self, num_virtual_tokens: int, hidden_size: int, encoder: str = "mlp",
                 encoder_hidden_size: int | None = None, num_layers: int = 2, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.num_virtual_tokens = _check_positive_int("PromptEncoder", "num_virtual_tokens", num_virtual_tokens)
        self.hidden_size = _check_positive_int("PromptEncoder", "hidden_size", hidden_size)
        encoder = str(getattr(encoder, "value", encoder)).lower()
        if encoder not in ENCODERS:
            raise ValueError(f"PromptEncoder: encoder must be one of {ENCODERS}, got {encoder!r}")
        self.encoder = encoder
        h = self.encoder_hidden_size = _check_positive_int("PromptEncoder", "encoder_hidden_size",
                                                           hidden_size if encoder_hidden_size is None
                                                           else encoder_hidden_size)
        self.num_layers = _check_positive_int("PromptEncoder", "num_layers", num_layers)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"PromptEncoder: dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        kw = {"dtype": dtype, "device": device}
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size, **kw)
        if encoder == "lstm":
            self.lstm_head = LSTMHead(hidden_size, h, num_layers, self.dropout, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, hidden_size, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(hidden_size, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, hidden_size, **kw))

    def forward(self) -> Tensor:
        x = self.embedding.weight
        if self.encoder == "lstm":
            x = self.lstm_head(x.unsqueeze(0)).squeeze(0)
        return self.mlp_head(x)

    @torch.no_grad()
    def to_static(self) -> SoftPrompt:
        """The current virtual tokens as a plain table (peft's inference-mode ``prompt_embeddings``)."""
        was_training = self.training
        self.eval()
        try:
            table = self().detach()
        finally:
            self.train(was_training)
        return SoftPrompt.from_table(table, dtype=self.embedding.weight.dtype)

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, hidden_size={self.hidden_size}, "
                f"encoder={self.encoder!r}, encoder_hidden_size={self.encoder_hidden_size}")
