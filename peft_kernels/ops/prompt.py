"""Soft prompt embedding (prompt tuning, P-tuning): the model's ``inputs_embeds`` with virtual tokens in them.

One op gathers the token embeddings and writes the P virtual-token vectors into their positions, instead of an
embedding lookup, an expand and a cat (or a scatter, for virtual tokens among the tokens):

* ``positions=None``: ``out = [prompt_embeds ; embedding_weight[input_ids]]`` (prompt tuning, peft's P-tuning);
* ``positions``: P insertion indices into the S tokens (non-decreasing, each in [0, S]): virtual token p goes
  right before token ``positions[p]`` (S: after the last), so it lands at output position ``positions[p] + p``
  (P-tuning templates). ``[P]`` for the whole batch, or ``[B, P]`` per example.

prompt_embeds is [P, H] (shared by the batch) or [B, P, H] (per example). The output is in embedding_weight's
dtype; the prompt may be fp32 master weights and gets its gradient in its own dtype (summed over the batch in
fp32 in a fixed order when shared: deterministic). The frozen vocabulary gets no gradient buffer; when it does
require grad, its gradient (an index_add of the token rows, fp32 accumulation) is computed too.

Ids outside [0, V) raise ValueError: checked inside the backends (so also inside graphs compiled with
``torch.compile(fullgraph=True)``, where the op body runs eagerly), one host sync per new ids tensor.
Saved for backward: the ids and the two position maps (int32, tiny); nothing of the size of the output.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_kernels import _backends
from peft_kernels._op import OpFamily, signature, steady
from peft_kernels.ops import _validate as v

OP = "soft_prompt_embed"

ID_DTYPES = (torch.int64, torch.int32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# Reference math (the oracle): plain PyTorch, differentiable by autograd.
# --------------------------------------------------------------------------------------------------
def soft_prompt_embed_reference(input_ids, embedding_weight, prompt_embeds, positions=None, upcast=False):
    """Autograd-differentiable reference; ``upcast=True`` computes in float64, returns the weight's dtype."""
    dtype = torch.float64 if upcast else embedding_weight.dtype
    tokens = F.embedding(input_ids.long(), embedding_weight.to(dtype))
    B, S, H = tokens.shape
    prompt = prompt_embeds.to(dtype)
    P = prompt.shape[-2]
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(B, -1, -1)
    if positions is None:
        return torch.cat([prompt, tokens], dim=1).to(embedding_weight.dtype)
    ins = torch.as_tensor(positions, device=tokens.device).long()
    ins = ins.expand(B, P) if ins.dim() == 1 else ins
    rows = []
    for b in range(B):  # literally: insert each virtual token before its token index
        pieces, start = [], 0
        for p in range(P):
            i = int(ins[b, p])
            pieces += [tokens[b, start:i], prompt[b, p : p + 1]]
            start = i
        pieces.append(tokens[b, start:])
        rows.append(torch.cat(pieces))
    return torch.stack(rows).to(embedding_weight.dtype)


def prompt_maps(positions: Tensor, seq_len: int, num_prompt: int) -> tuple[Tensor, Tensor]:
    """(slots [Bp, T], vpos [Bp, P]) int32 for insertion indices ``positions`` [P] or [Bp, P], T = P + S.

    ``slots[b, t]`` is s >= 0 (token s) or ``-(p + 1)`` (virtual token p); ``vpos[b, p]`` is virtual token p's
    output position. Any integer input yields a valid map (clamped to [0, S], made non-decreasing): the kernels
    index with it, so no value can make them read or write out of bounds. No host sync.
    """
    S, P = seq_len, num_prompt
    ins = positions.long().clamp(0, S)
    ins = ins.unsqueeze(0) if ins.dim() == 1 else ins
    if ins.shape[1] > 1:
        ins = ins.cummax(1).values
    vpos = ins + torch.arange(P, device=ins.device)
    virt = torch.zeros(ins.shape[0], P + S, dtype=torch.bool, device=ins.device).scatter_(1, vpos, True)
    count_virt = virt.cumsum(1)
    slots = torch.where(virt, -count_virt, torch.arange(P + S, device=ins.device) - count_virt)
    return slots.to(torch.int32), vpos.to(torch.int32)


# One host sync per *new* ids tensor: a step that embeds the same ids twice (gradient checkpointing's recompute,
# a benchmark loop) checks them once. Keyed on the tensor object (weakly) and its version counter.
_checked = {"ref": None, "version": -1, "vocab": -1}


def check_ids_in_range(input_ids: Tensor, num_embeddings: int) -> None:
    """Out-of-range ids raise ValueError (not an IndexError on the CPU or a device-side assert on CUDA)."""
    if input_ids.numel() == 0:
        return
    ref = _checked["ref"]
    if ref is not None and ref() is input_ids and _checked["version"] == input_ids._version \
            and _checked["vocab"] == num_embeddings:
        return
    lo, hi = (int(x) for x in torch.aminmax(input_ids))
    if lo < 0 or hi >= num_embeddings:
        raise ValueError(
            f"{OP}: input_ids must be in [0, {num_embeddings}) (embedding_weight.shape[0]), "
            f"got values in [{lo}, {hi}]"
        )
    try:
        _checked.update(ref=weakref.ref(input_ids), version=input_ids._version, vocab=num_embeddings)
    except TypeError:  # tensors that take no weak reference (fakes): no memo
        pass


# --------------------------------------------------------------------------------------------------
# The family. Saved for backward: the ids (only read when the vocabulary needs its gradient) and the maps.
# --------------------------------------------------------------------------------------------------
class PromptInputs(NamedTuple):
    input_ids: Tensor  # [B, S] int64/int32, contiguous
    embedding_weight: Tensor  # [V, H]
    prompt_embeds: Tensor  # [P, H] or [B, P, H], unit last stride
    slots: Tensor | None  # int32 [1 or B, P + S] from prompt_maps, None for a plain prefix
    vpos: Tensor | None  # int32 [1 or B, P], None for a plain prefix


def _save(inp: PromptInputs, outs):
    P = inp.prompt_embeds
    return (inp.input_ids, inp.slots, inp.vpos, inp.embedding_weight.shape[0], P.shape[-2], P.dim() == 3, P.dtype)


def _fake(inp: PromptInputs):
    B, S = inp.input_ids.shape
    return inp.embedding_weight.new_empty(B, inp.prompt_embeds.shape[-2] + S, inp.embedding_weight.shape[1])


def _backward_fake(dout, input_ids, slots, vpos, num_embeddings, num_prompt, batched, prompt_dtype, needs):
    B, _, H = dout.shape
    dweight = dout.new_empty(num_embeddings, H) if needs[0] else None
    dprompt = dout.new_empty((B, num_prompt, H) if batched else (num_prompt, H), dtype=prompt_dtype) if needs[1] \
        else None
    return dweight, dprompt


FAMILY = OpFamily(
    OP,
    Inputs=PromptInputs,
    schema="(Tensor input_ids, Tensor embedding_weight, Tensor prompt_embeds, Tensor? slots, Tensor? vpos) -> Tensor",
    backward_schema="(Tensor dout, Tensor input_ids, Tensor? slots, Tensor? vpos, int num_embeddings, int num_prompt, "
    "bool prompt_batched, ScalarType prompt_dtype)",
    differentiable=("embedding_weight", "prompt_embeds"),
    save=_save,
    fake=_fake,
    backward_fake=_backward_fake,
    primary="embedding_weight",
    # CPU tensors: the C++ row copy (one call, one autograd node) has the least host time and one pass over the
    # output (benchmarks/NOTES.md, "soft_prompt_embed on CPU").
    preference={"cuda": ("triton", "cuda"), "cpu": ("cpp", "reference")},
    doc="inputs_embeds with P virtual-token vectors at the front or at template positions",
)


def _token_rows(dout: Tensor, slots: Tensor | None, P: int, S: int) -> Tensor:
    """dout's rows of the real tokens, [B, S, H], in token order."""
    if slots is None:
        return dout[:, P:]
    B, T, H = dout.shape
    # Output position of every token: scatter t into its token index (virtual slots go to a dump column S).
    dst = torch.where(slots >= 0, slots.clamp(max=S), S).long()
    tpos = torch.zeros(slots.shape[0], S + 1, dtype=torch.long, device=dout.device)
    tpos.scatter_(1, dst, torch.arange(T, device=dout.device).expand_as(dst))
    return torch.gather(dout, 1, tpos[:, :S, None].expand(B, S, H))


def _embedding_grad(dout, input_ids, slots, num_embeddings, P):
    """The vocabulary's gradient (rare: it is usually frozen): index_add of the token rows, fp32 accumulation."""
    B, S = input_ids.shape
    H = dout.shape[2]
    acc = torch.float64 if dout.dtype == torch.float64 else torch.float32
    dweight = dout.new_zeros(num_embeddings, H, dtype=acc)
    rows = _token_rows(dout, slots, P, S).reshape(-1, H).to(acc)
    dweight.index_add_(0, input_ids.reshape(-1).long(), rows)
    return dweight.to(dout.dtype)


@FAMILY.forward("reference", devices=("cpu", "cuda"), autograd=True)
def _reference_forward(input_ids, embedding_weight, prompt_embeds, slots, vpos):
    """lookup + cat (or gathers) in PyTorch, differentiated by autograd in eager (the oracle and the fallback)"""
    check_ids_in_range(input_ids, embedding_weight.shape[0])
    B, S = input_ids.shape
    P, H = prompt_embeds.shape[-2], embedding_weight.shape[1]
    # torch.embedding is what F.embedding calls (no padding_idx, no max_norm here): one Python layer less.
    tokens = torch.embedding(embedding_weight, input_ids)
    # Expanded before the cast: autograd then sums a shared prompt's gradient over the batch in its own dtype.
    prompt = prompt_embeds.expand(B, P, H) if prompt_embeds.dim() == 2 else prompt_embeds
    if prompt.dtype != embedding_weight.dtype:  # a no-op cast is still a dispatcher call
        prompt = prompt.to(embedding_weight.dtype)
    if slots is None:
        return torch.cat((prompt, tokens), dim=1)
    T = P + S
    s = slots.long().clamp(0, max(S - 1, 0)).expand(B, T)  # clamped like the kernels: any map is memory-safe
    p = (-slots.long() - 1).clamp(0, P - 1).expand(B, T)
    from_tokens = torch.gather(tokens, 1, s[..., None].expand(B, T, H))
    from_prompt = torch.gather(prompt, 1, p[..., None].expand(B, T, H))
    return torch.where((slots < 0)[..., None], from_prompt, from_tokens)


@FAMILY.backward("reference", devices=("cpu", "cuda"))
def _reference_backward(dout, input_ids, slots, vpos, num_embeddings, num_prompt, prompt_batched, prompt_dtype, needs):
    P = num_prompt
    dweight = _embedding_grad(dout, input_ids, slots, num_embeddings, P) if needs[0] else None
    dprompt = None
    if needs[1]:
        B, _, H = dout.shape
        if vpos is None:
            dp = dout[:, :P]
        else:
            rows = vpos.long().clamp(0, dout.shape[1] - 1).expand(B, P)
            dp = torch.gather(dout, 1, rows[..., None].expand(B, P, H))
        if prompt_batched:
            dprompt = dp.to(prompt_dtype, copy=True)  # a copy: never a view of dout
        else:
            acc = torch.float64 if dout.dtype == torch.float64 or prompt_dtype == torch.float64 else torch.float32
            dprompt = dp.sum(0, dtype=acc).to(prompt_dtype)
    return dweight, dprompt


# --------------------------------------------------------------------------------------------------
# C++ on CPU tensors (csrc/prompt.cpp): each output row copied once; its eager path one C++ autograd node.
# --------------------------------------------------------------------------------------------------
_CPP_FORWARD = _backends.native_function("soft_prompt_embed_forward_cpu")
_CPP_NODE = _backends.native_function("soft_prompt_embed_autograd")


@FAMILY.forward("cpp", dtypes=v.FLOAT_DTYPES, eager=_CPP_NODE)
def _cpp_forward(input_ids, embedding_weight, prompt_embeds, slots, vpos):
    """a row copy per output row (the id range checked in the same call), rows in parallel"""
    return _CPP_FORWARD(input_ids, embedding_weight, prompt_embeds, slots, vpos)


# The custom-op (torch.compile) path's backward: the reference's math (the C++ node's backward is the same, in C++).
FAMILY.backward("cpp", dtypes=v.FLOAT_DTYPES)(_reference_backward)


@FAMILY.why_not("cpp", both=True)
def _cpp_why_not(inp: PromptInputs) -> str | None:
    if _CPP_FORWARD is None:
        return "the loaded peft_kernels._C was built before csrc/prompt.cpp (rebuild: make install)"
    return None


# --------------------------------------------------------------------------------------------------
# Triton (peft_kernels/triton/prompt.py): one pass forward, prompt-only backward.
# --------------------------------------------------------------------------------------------------
@FAMILY.forward("triton", devices=("cuda", "cpu-interpret"), dtypes=KERNEL_DTYPES)
def _triton_forward(input_ids, embedding_weight, prompt_embeds, slots, vpos):
    """one pass: each output row read from the vocabulary or the prompt and written once"""
    from peft_kernels.triton import prompt as tk

    check_ids_in_range(input_ids, embedding_weight.shape[0])
    with _backends.on_device(embedding_weight.device):
        return tk.soft_prompt_forward(input_ids, embedding_weight, prompt_embeds, slots)


@FAMILY.backward("triton", devices=("cuda", "cpu-interpret"), dtypes=KERNEL_DTYPES)
def _triton_backward(dout, input_ids, slots, vpos, num_embeddings, num_prompt, prompt_batched, prompt_dtype, needs):
    """prompt rows gathered (and summed over the batch in fp32, in order) by one kernel"""
    from peft_kernels.triton import prompt as tk

    dweight = _embedding_grad(dout, input_ids, slots, num_embeddings, num_prompt) if needs[0] else None
    dprompt = None
    if needs[1]:
        with _backends.on_device(dout.device):
            dprompt = tk.soft_prompt_backward_prompt(dout, vpos, num_prompt, prompt_batched, prompt_dtype)
    return dweight, dprompt


@FAMILY.why_not("triton", both=True)
def _prompt_dtype_reason(inp: PromptInputs) -> str | None:
    if inp.prompt_embeds.dtype not in KERNEL_DTYPES:
        return f"prompt_embeds has dtype {inp.prompt_embeds.dtype}; the kernels take float16, bfloat16, float32"
    return None


# --------------------------------------------------------------------------------------------------
# CUDA C++ (csrc/cuda/prompt.cu): the same two kernels, 16-byte vector copies where rows are aligned.
# --------------------------------------------------------------------------------------------------
_CUDA_KERNEL_STATUS = _backends.cuda_kernel_status("soft_prompt_embed_fwd_cuda")  # probed once, at import


@FAMILY.forward("cuda", dtypes=KERNEL_DTYPES)
def _cuda_forward(input_ids, embedding_weight, prompt_embeds, slots, vpos):
    """one pass, a warp per output row, 16-byte vector copies"""
    check_ids_in_range(input_ids, embedding_weight.shape[0])
    return torch.ops.peft_kernels.soft_prompt_embed_fwd_cuda(input_ids, embedding_weight, prompt_embeds, slots)


@FAMILY.backward("cuda", dtypes=KERNEL_DTYPES)
def _cuda_backward(dout, input_ids, slots, vpos, num_embeddings, num_prompt, prompt_batched, prompt_dtype, needs):
    """prompt rows gathered (and summed over the batch in fp32, in order)"""
    dweight = _embedding_grad(dout, input_ids, slots, num_embeddings, num_prompt) if needs[0] else None
    dprompt = None
    if needs[1]:
        dprompt = torch.ops.peft_kernels.soft_prompt_embed_bwd_cuda(
            dout, vpos, num_prompt, prompt_batched, prompt_dtype
        )
    return dweight, dprompt


@FAMILY.why_not("cuda", both=True)
def _cuda_why_not(inp) -> str | None:
    if _CUDA_KERNEL_STATUS is not None:
        return _CUDA_KERNEL_STATUS
    return _prompt_dtype_reason(inp)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def _as_positions(positions, B: int, S: int, P: int, device) -> Tensor:
    if isinstance(positions, (list, tuple)):
        flat = [i for row in positions for i in row] if positions and isinstance(positions[0], (list, tuple)) \
            else positions
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in flat):
            raise TypeError(f"{OP}: positions must be ints, got {positions!r:.80}")
        try:
            positions = torch.tensor(positions, dtype=torch.int64)
        except ValueError as exc:  # ragged rows
            raise ValueError(f"{OP}: positions must be [P] or [B, P] insertion indices, got {positions!r:.80}") from exc
    v.check_tensor(OP, "positions", positions, ndim=(1, 2), dtypes=ID_DTYPES)
    if positions.shape[-1] != P or (positions.dim() == 2 and positions.shape[0] != B):
        want = f"[{P}] or [{B}, {P}]"
        raise ValueError(f"{OP}: positions has shape {tuple(positions.shape)}, expected {want} (one insertion index "
                         "per virtual token, for the batch or per example)")
    if positions.device.type == "cpu" and positions.numel():
        # Values are checked where that costs no device sync (host positions); device positions are clamped.
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi > S:
            raise ValueError(f"{OP}: positions must be insertion indices in [0, S] = [0, {S}], got [{lo}, {hi}]")
        if positions.shape[-1] > 1 and bool((positions.diff(dim=-1) < 0).any()):
            raise ValueError(f"{OP}: positions must be non-decreasing along the virtual tokens, got "
                             f"{positions.tolist()}")
    return positions.to(device)


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


_VALIDATED = v.Validated()


def soft_prompt_embed(input_ids: Tensor, embedding_weight: Tensor, prompt_embeds: Tensor, positions=None, *,
                      maps: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Input embeddings with P virtual tokens: [B, P + S, H].

    Args:
        input_ids: [B, S] token ids (int64 or int32), each in [0, V); out-of-range ids raise ValueError.
        embedding_weight: [V, H] the model's input embedding matrix (usually frozen: it then gets no gradient).
        prompt_embeds: [P, H] virtual-token embeddings shared by the batch, or [B, P, H] per example (e.g. a
            P-tuning prompt encoder's output); cast to embedding_weight's dtype, gradients in their own dtype.
        positions: None (the prompt goes in front), or P insertion indices into the tokens, non-decreasing, each in
            [0, S] (a list, or an int tensor [P] / [B, P]): virtual token p lands at output position
            ``positions[p] + p``. Host positions are checked; device positions are clamped (no sync).
        maps: ``prompt_maps(positions, S, P)`` computed once by the caller (instead of ``positions``).

    Returns:
        [B, P + S, H] in embedding_weight's dtype. Extend the attention mask (and labels, with -100) to match.
    """
    # The steady state (eager, the prompt in front, a signature seen before) is this block: a cached lookup and the
    # backend's call. The ids' range is checked inside the backends (memoized per ids tensor).
    if positions is None and maps is None:
        hit = FAMILY.steady_hit(None, input_ids, embedding_weight, prompt_embeds)
        if hit is not None:
            fwd, bwd, node = hit
            ids = input_ids if input_ids.is_contiguous() else input_ids.contiguous()
            prompt = prompt_embeds if prompt_embeds.stride(-1) == 1 else prompt_embeds.contiguous()
            if node is not None:
                return node(ids, embedding_weight, prompt, None, None)
            return FAMILY.run_eager(PromptInputs(ids, embedding_weight, prompt, None, None), fwd, bwd)
    return _soft_prompt_embed_checked(input_ids, embedding_weight, prompt_embeds, positions, maps)


def _soft_prompt_embed_checked(input_ids, embedding_weight, prompt_embeds, positions, maps) -> Tensor:
    """Every other call: the tensor checks once per signature, the positions or maps, dispatch (then cached)."""
    key = None if torch.compiler.is_compiling() else signature(input_ids, embedding_weight, prompt_embeds)
    if key not in _VALIDATED:  # the tensor checks run once per signature
        validate(input_ids, embedding_weight, prompt_embeds)
        _VALIDATED.add(key)
    B, S = input_ids.shape
    P = prompt_embeds.shape[-2]
    slots = vpos = None
    if maps is not None:
        if positions is not None:
            raise ValueError(f"{OP}: pass positions or maps, not both")
        if not isinstance(maps, (tuple, list)) or len(maps) != 2:
            raise TypeError(f"{OP}: maps must be the (slots, vpos) pair from prompt_maps")
        slots, vpos = maps
        for name, t in (("slots", slots), ("vpos", vpos)):
            v.check_tensor(OP, f"maps[{name}]", t, ndim=2, dtypes=(torch.int32,))
        v.check_same_device(OP, input_ids=input_ids, slots=slots, vpos=vpos)
        if slots.shape[-1] != P + S or vpos.shape[-1] != P or slots.shape[0] not in (1, B) \
                or vpos.shape[0] != slots.shape[0]:
            raise ValueError(f"{OP}: maps of shapes {tuple(slots.shape)}, {tuple(vpos.shape)} do not fit B={B}, "
                             f"S={S}, P={P}; build them with prompt_maps(positions, S, P)")
    elif positions is not None:
        slots, vpos = prompt_maps(_as_positions(positions, B, S, P, input_ids.device), S, P)
    ids = input_ids if input_ids.is_contiguous() else input_ids.contiguous()
    prompt = prompt_embeds if prompt_embeds.stride(-1) == 1 else prompt_embeds.contiguous()
    inputs = PromptInputs(ids, embedding_weight, prompt, slots, vpos)
    if slots is None and key is not None and steady():
        # Validated, no map: kept for the steady state above (the same signature as its lookup).
        return FAMILY.call_checked(inputs, (None, signature(input_ids, embedding_weight, prompt_embeds)))
    # The tensor signature (plus "is there a map") is all dispatch depends on: no second signature to compute.
    dispatch_key = None if key is None else (key, slots is None)
    return FAMILY(inputs, dispatch_key)
