"""Soft prompt embedding (prompt tuning, P-tuning): ``[prompt_embeds ; embedding_weight[input_ids]]``.

One op gathers the token embeddings and writes them after the P virtual-token vectors, instead of an
embedding lookup, an expand and a cat. prompt_embeds is [P, H] (shared by the batch: prompt tuning) or
[B, P, H] (per example: the output of a P-tuning prompt encoder). The output is in embedding_weight's dtype;
the prompt may be fp32 master weights and gets its gradient in its own dtype (summed over the batch in fp32
when shared). The embedding matrix is usually frozen; its gradient (an index_add of the token gradients)
is computed only when it requires grad.
Saved for backward: input_ids only when the embedding matrix needs its gradient, nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels import _backends
from peft_kernels.ops import _validate as v

OP = "soft_prompt_embed"

ID_DTYPES = (torch.int64, torch.int32)


# --------------------------------------------------------------------------------------------------
# Reference math (the oracle): plain PyTorch, differentiable by autograd.
# --------------------------------------------------------------------------------------------------
def soft_prompt_embed_reference(input_ids, embedding_weight, prompt_embeds, upcast=False):
    """Autograd-differentiable reference; ``upcast=True`` computes in float64, returns the weight's dtype."""
    dtype = torch.float64 if upcast else embedding_weight.dtype
    tokens = F.embedding(input_ids.long(), embedding_weight.to(dtype))
    prompt = prompt_embeds.to(dtype)
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
    return torch.cat([prompt, tokens], dim=1).to(embedding_weight.dtype)


def check_ids_in_range(input_ids: Tensor, num_embeddings: int) -> None:
    """Out-of-range ids raise ValueError (not an IndexError on the CPU or a device-side assert on CUDA).

    Data-dependent (one host sync), so it runs inside the custom op's body: that body also runs, eagerly,
    inside graphs compiled with torch.compile(fullgraph=True), where a check in the Python wrapper could not.
    """
    if input_ids.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(input_ids))
    if lo < 0 or hi >= num_embeddings:
        raise ValueError(
            f"{OP}: input_ids must be in [0, {num_embeddings}) (embedding_weight.shape[0]), "
            f"got values in [{lo}, {hi}]"
        )


# --------------------------------------------------------------------------------------------------
# Backends: forward -> out [B, P + S, H]; backward -> (d_embedding_weight, d_prompt), None where not needed.
# --------------------------------------------------------------------------------------------------
def _reference_forward(input_ids, embedding_weight, prompt_embeds):
    B, S = input_ids.shape
    P, H = prompt_embeds.shape[-2], embedding_weight.shape[1]
    out = embedding_weight.new_empty(B, P + S, H)
    out[:, :P] = prompt_embeds  # broadcasts a shared [P, H] prompt; casts to the weight's dtype
    out[:, P:] = F.embedding(input_ids, embedding_weight)
    return out


def _reference_backward(dout, input_ids, num_embeddings, num_prompt, prompt_batched, prompt_dtype, needs):
    need_dweight, need_dprompt = needs
    P, H = num_prompt, dout.shape[2]
    dweight = dprompt = None
    if need_dweight:
        # fp32 accumulation for half types: a frequent token sums many gradients.
        acc = torch.float64 if dout.dtype == torch.float64 else torch.float32
        dweight = dout.new_zeros(num_embeddings, H, dtype=acc)
        dweight.index_add_(0, input_ids.reshape(-1), dout[:, P:].reshape(-1, H).to(acc))
        dweight = dweight.to(dout.dtype)
    if need_dprompt:
        dp = dout[:, :P]
        if prompt_batched:
            dprompt = dp.to(prompt_dtype, copy=True)  # a copy: a custom op may not return a view of dout
        else:
            acc = torch.float64 if dout.dtype == torch.float64 else torch.float32
            dprompt = dp.sum(0, dtype=acc).to(prompt_dtype)
    return dweight, dprompt


_FORWARD = {"reference": _reference_forward}
_BACKWARD = {"reference": _reference_backward}

# Only the reference backend for now; native and Triton kernels register here when they land.
_backends.register_op(OP, {})


# --------------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake kernels and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("peft_kernels::soft_prompt_embed", mutates_args=())
def _soft_prompt_embed_op(
    input_ids: Tensor, embedding_weight: Tensor, prompt_embeds: Tensor, backend: str
) -> Tensor:
    check_ids_in_range(input_ids, embedding_weight.shape[0])
    return _FORWARD[backend](input_ids, embedding_weight, prompt_embeds)


@_soft_prompt_embed_op.register_fake
def _(input_ids, embedding_weight, prompt_embeds, backend):
    B, S = input_ids.shape
    return embedding_weight.new_empty(B, prompt_embeds.shape[-2] + S, embedding_weight.shape[1])


@torch.library.custom_op("peft_kernels::soft_prompt_embed_backward", mutates_args=())
def _soft_prompt_embed_backward_op(
    dout: Tensor, input_ids: Tensor, num_embeddings: int, num_prompt: int, prompt_batched: bool,
    prompt_dtype: torch.dtype, backend: str, needs: list[bool],
) -> tuple[Tensor, Tensor]:
    grads = _BACKWARD[backend](
        dout, input_ids, num_embeddings, num_prompt, prompt_batched, prompt_dtype, needs
    )
    # custom ops cannot return None: a gradient not asked for comes back as an empty tensor.
    return tuple(g if g is not None else dout.new_empty(0) for g in grads)


@_soft_prompt_embed_backward_op.register_fake
def _(dout, input_ids, num_embeddings, num_prompt, prompt_batched, prompt_dtype, backend, needs):
    H = dout.shape[2]
    dweight = dout.new_empty(num_embeddings, H) if needs[0] else dout.new_empty(0)
    pshape = (dout.shape[0], num_prompt, H) if prompt_batched else (num_prompt, H)
    dprompt = dout.new_empty(pshape, dtype=prompt_dtype) if needs[1] else dout.new_empty(0)
    return dweight, dprompt


def _setup_context(ctx, inputs, output):
    input_ids, embedding_weight, prompt_embeds, backend = inputs
    # The ids are only needed for the embedding matrix's gradient (usually frozen: nothing saved).
    ctx.save_for_backward(input_ids if ctx.needs_input_grad[1] else None)
    ctx.num_embeddings = embedding_weight.shape[0]
    ctx.num_prompt, ctx.prompt_batched = prompt_embeds.shape[-2], prompt_embeds.dim() == 3
    ctx.prompt_dtype, ctx.backend = prompt_embeds.dtype, backend


def _backward(ctx, dout):
    (input_ids,) = ctx.saved_tensors
    needs = [ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    if not any(needs):
        return None, None, None, None
    if input_ids is None:  # the op schema wants a tensor; an empty one stands in, never read
        input_ids = dout.new_empty(0, dtype=torch.int64)
    dweight, dprompt = _soft_prompt_embed_backward_op(
        dout.contiguous(), input_ids, ctx.num_embeddings, ctx.num_prompt, ctx.prompt_batched,
        ctx.prompt_dtype, ctx.backend, needs,
    )
    return None, (dweight if needs[0] else None), (dprompt if needs[1] else None), None


_soft_prompt_embed_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def validate(input_ids, embedding_weight, prompt_embeds) -> None:
    v.check_tensor(OP, "input_ids", input_ids, ndim=2, dtypes=ID_DTYPES)
    v.check_tensor(OP, "embedding_weight", embedding_weight, ndim=2)
    v.check_tensor(OP, "prompt_embeds", prompt_embeds, ndim=(2, 3))
    v.check_same_device(
        OP, input_ids=input_ids, embedding_weight=embedding_weight, prompt_embeds=prompt_embeds
    )
    H = embedding_weight.shape[1]
    v.check_size(OP, "prompt_embeds", prompt_embeds, -1, H, "hidden size H = embedding_weight.shape[1]")
    if prompt_embeds.dim() == 3:
        B = input_ids.shape[0]
        v.check_size(OP, "prompt_embeds", prompt_embeds, 0, B, "batch size B = input_ids.shape[0]")
    if prompt_embeds.shape[-2] == 0:
        raise ValueError(f"{OP}: prompt_embeds has 0 virtual tokens (shape {tuple(prompt_embeds.shape)})")


def soft_prompt_embed(input_ids: Tensor, embedding_weight: Tensor, prompt_embeds: Tensor) -> Tensor:
    """Input embeddings with a soft prompt in front: [B, P + S, H].

    Args:
        input_ids: [B, S] token ids (int64 or int32), each in [0, V); out-of-range ids raise ValueError.
        embedding_weight: [V, H] the model's input embedding matrix (usually frozen).
        prompt_embeds: [P, H] virtual-token embeddings shared by the batch (prompt tuning), or [B, P, H]
            per example (e.g. a P-tuning prompt encoder's output); cast to embedding_weight's dtype.

    Returns:
        [B, P + S, H] in embedding_weight's dtype: the P prompt vectors, then embedding_weight[input_ids].
        Extend the attention mask by P ones in front to match.
    """
    validate(input_ids, embedding_weight, prompt_embeds)
    backend = _backends.select(OP, embedding_weight.device.type, input_ids, embedding_weight, prompt_embeds)
    ids = input_ids.contiguous()
    return _soft_prompt_embed_op(ids, embedding_weight, prompt_embeds.contiguous(), backend)
