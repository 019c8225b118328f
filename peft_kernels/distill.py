"""The DistilBERT recipe (Sanh et al., 2019) around the fused distillation losses.

- :func:`student_from_teacher`: a student of the teacher's architecture with every other layer of the teacher
  (DistilBERT's initialisation: layers 0, 2, 4, ... with their weights; embeddings and heads copied).
- :func:`distillation_triple_loss`: DistilBERT's loss in one call, ``5·L_soft + 2·L_hard + 1·L_cos``: the
  soft-target KL at temperature T (T²-scaled) over every non-padding token, the hard-label MLM (or causal LM)
  cross-entropy over the labelled tokens -- both from one pass of the fused ``distillation_loss`` -- and the
  cosine loss between the last hidden states.
- :func:`compute_distillation_loss`: runs the teacher (no grad) and the student on a batch and returns the
  triple loss. With ``fused=True`` the output heads run inside ``fused_linear_distillation_loss`` (chunked over
  tokens: neither model's full logits are ever held; a LoRA-adapted student head gets its adapter gradients).
- :class:`DistillationTrainer`: a ``transformers.Trainer`` whose ``compute_loss`` is the above.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from peft_kernels.ops.distill import distillation_loss
from peft_kernels.ops.distill_linear import fused_linear_distillation_loss

__all__ = [
    "DISTILBERT_WEIGHTS",
    "DistillationLoss",
    "DistillationTrainer",  # noqa: F822  (created on first access: module __getattr__)
    "compute_distillation_loss",
    "distillation_triple_loss",
    "find_layers",
    "hidden_cosine_loss",
    "student_from_teacher",
]

DISTILBERT_WEIGHTS = (5.0, 2.0, 1.0)  # soft targets, hard labels, hidden-state cosine (DistilBERT's train.py)
_TASKS = ("mlm", "causal")


# --------------------------------------------------------------------------------------------------
# Student initialisation
# --------------------------------------------------------------------------------------------------
def find_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, layers): the model's stack of transformer layers, the ModuleList whose length is
    ``config.num_hidden_layers`` (BERT's encoder.layer, Llama's model.layers, GPT-2's transformer.h, ...)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) > 0 and (n is None or len(child) == n):
                found.append((module, attr, child, f"{name}.{attr}" if name else attr))
    if not found:
        raise ValueError(f"student_from_teacher: found no ModuleList of {n} layers in {type(model).__name__}")
    found.sort(key=lambda f: -sum(p.numel() for p in f[2].parameters()))  # the stack holds the most weights
    if len(found) > 1 and n is None:
        raise ValueError(f"student_from_teacher: several layer stacks in {type(model).__name__} "
                         f"({', '.join(f[3] for f in found)}) and no config.num_hidden_layers to choose")
    return found[0][0], found[0][1], found[0][2]


def student_from_teacher(teacher: nn.Module, layers: Sequence[int] | None = None) -> nn.Module:
    """A copy of ``teacher`` that keeps only the given layers (default: every other one, 0, 2, 4, ...), with
    their weights, and the teacher's embeddings, final norm and heads. ``config.num_hidden_layers`` (and a
    per-layer ``config.layer_types`` list) follow; attention modules get their new ``layer_idx`` so a KV cache
    indexes them right. Every parameter of the student trains (a frozen teacher, e.g. one a DistillationTrainer
    froze, gives a trainable student). The teacher is not modified."""
    parent, attr, stack = find_layers(teacher)
    L = len(stack)
    keep = list(range(0, L, 2)) if layers is None else list(layers)
    if not keep or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < L for i in keep):
        raise ValueError(f"student_from_teacher: layers must be a non-empty list of indices in [0, {L}), got {layers}")
    if len(set(keep)) != len(keep):
        raise ValueError(f"student_from_teacher: layers must not repeat, got {layers}")
    # Copy the model with only the kept layers in place (the dropped half is never copied).
    setattr(parent, attr, nn.ModuleList([stack[i] for i in keep]))
    try:
        student = copy.deepcopy(teacher)
    finally:
        setattr(parent, attr, stack)
    config = getattr(student, "config", None)
    if config is not None:
        config.num_hidden_layers = len(keep)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == L:
            config.layer_types = [layer_types[i] for i in keep]
    _, _, new_stack = find_layers(student)
    for new_idx, layer in enumerate(new_stack):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    student.requires_grad_(True)
    return student


# --------------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------------
def hidden_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """DistilBERT's L_cos: mean over the (mask-selected) tokens of 1 - cos(h_s, h_t), i.e.
    ``F.cosine_embedding_loss(h_s[mask], h_t[mask], ones)``. fp32 math; the teacher gets no gradient."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden_cosine_loss: student_hidden has shape {tuple(student_hidden.shape)} but "
                         f"teacher_hidden has {tuple(teacher_hidden.shape)}; the cosine loss needs equal hidden sizes")
    H = student_hidden.shape[-1]
    s = student_hidden.reshape(-1, H).float()
    t = teacher_hidden.detach().reshape(-1, H).float()
    # F.cosine_embedding_loss's own formula (eps 1e-12 inside the square roots).
    cos = (s * t).sum(-1) / ((s.pow(2).sum(-1) + 1e-12) * (t.pow(2).sum(-1) + 1e-12)).sqrt()
    per_token = 1.0 - cos
    if mask is None:
        return per_token.mean()
    m = mask.reshape(-1).to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


class DistillationLoss(NamedTuple):
    loss: Tensor  # weighted total: the one to backpropagate
    distill: Tensor  # w_soft·L_soft + w_hard·L_hard (one fused pass over the logits; detached)
    cosine: Tensor  # L_cos (unweighted; detached), 0 without hidden states


def _weights(weights) -> tuple[float, float, float]:
    if len(weights) != 3 or any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in weights):
        raise ValueError(f"distillation_triple_loss: weights must be three numbers >= 0 (soft, hard, cosine), got "
                         f"{weights}")
    if weights[0] + weights[1] <= 0:
        raise ValueError("distillation_triple_loss: the soft and hard weights must not both be 0")
    return float(weights[0]), float(weights[1]), float(weights[2])


def _rows(labels: Tensor | None, attention_mask: Tensor | None, task: str, ignore_index: int, shape):
    """(hard labels aligned with the logits' positions, kd_mask): causal LM labels are shifted left by one
    (position i predicts token i+1) instead of slicing the logits (which would copy them)."""
    if task not in _TASKS:
        raise ValueError(f"distillation_triple_loss: task must be one of {_TASKS}, got {task!r}")
    if labels is not None and task == "causal":
        labels = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), ignore_index)], dim=-1)
    kd_mask = attention_mask.bool() if attention_mask is not None else None
    if kd_mask is None and labels is not None:
        kd_mask = torch.ones(shape, dtype=torch.bool, device=labels.device)  # every token, not only the labelled
    return labels, kd_mask


def distillation_triple_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
    student_hidden: Tensor | None = None, teacher_hidden: Tensor | None = None,
    attention_mask: Tensor | None = None, *, temperature: float = 2.0,
    weights: Sequence[float] = DISTILBERT_WEIGHTS, task: str = "mlm", ignore_index: int = -100,
    divergence: str = "forward_kl",
) -> DistillationLoss:
    """DistilBERT's loss ``w_soft·T²·KL + w_hard·CE + w_cos·L_cos`` in one call (weights 5 / 2 / 1 by default).

    The soft term is taken over every token of ``attention_mask`` (all tokens without one), the hard term over
    the tokens whose label is not ``ignore_index`` (MLM: the masked ones; ``task="causal"``: labels as
    ``input_ids``, shifted here), each averaged over its own tokens; the cosine term over the attention mask.
    """
    w_soft, w_hard, w_cos = _weights(weights)
    lead = student_logits.shape[:-1]
    hard, kd_mask = _rows(labels, attention_mask, task, ignore_index, lead)
    if w_hard == 0:
        hard = None
    total_w = w_soft + w_hard if hard is not None else w_soft
    alpha = w_soft / total_w if hard is not None else 0.5
    kd = distillation_loss(student_logits, teacher_logits, hard, temperature, alpha, ignore_index,
                           divergence=divergence, kd_mask=kd_mask) * total_w
    loss, cos = kd, kd.new_zeros(())
    if student_hidden is not None and teacher_hidden is not None and w_cos > 0:
        cos = hidden_cosine_loss(student_hidden, teacher_hidden, attention_mask)
        loss = loss + w_cos * cos
    return DistillationLoss(loss, kd.detach(), cos.detach())


# --------------------------------------------------------------------------------------------------
# Running the models
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _head_input(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model's output head returns its input: ``model(...).logits`` are then the hidden
    states the head would have multiplied (after BERT's head transform, Llama's final norm), and no logits
    are computed. Yields the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"compute_distillation_loss: {type(model).__name__} has no output embeddings "
                         "(get_output_embeddings() is None); use fused=False")
    original = head.forward
    head.forward = lambda x, *args, **kwargs: x
    try:
        yield head
    finally:
        head.forward = original


def _head_params(head: nn.Module):
    """(weight, bias, lora_A, lora_B, scaling) of a plain Linear or a peft_kernels LoRALinear (one adapter, no
    dropout); None when the head is something else (the caller then computes the logits)."""
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    A, B = getattr(head, "lora_A", None), getattr(head, "lora_B", None)
    if A is None and B is None:
        return (weight, bias, None, None, 1.0) if type(head) is nn.Linear else None
    if isinstance(A, Tensor) and isinstance(B, Tensor):  # peft_kernels LoRALinear
        if getattr(head, "merged", False) or not getattr(head, "adapter_enabled", True):
            return weight, bias, None, None, 1.0  # merged: the weight holds the update; disabled: the base alone
        if float(getattr(head, "lora_dropout", 0.0) or 0.0) > 0:
            return None
        return weight, bias, A, B, float(head.scaling)
    return None


def compute_distillation_loss(
    student: nn.Module, teacher: nn.Module, inputs: dict, *, temperature: float = 2.0,
    weights: Sequence[float] = DISTILBERT_WEIGHTS, task: str = "mlm", fused: bool = True, ignore_index: int = -100,
    divergence: str = "forward_kl",
) -> DistillationLoss:
    """Teacher (no grad) and student forward on ``inputs`` (input_ids, attention_mask, labels, ...: the labels are
    not passed to the models) and DistilBERT's triple loss. ``fused=True``: the output heads run inside the
    chunked loss; heads that are neither a Linear nor a LoRA Linear without dropout fall back to full logits."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    attention_mask = inputs.get("attention_mask")
    w_soft, w_hard, w_cos = _weights(weights)
    want_hidden = w_cos > 0
    if fused:
        s_params = _head_params(student.get_output_embeddings()) if hasattr(student, "get_output_embeddings") else None
        t_params = _head_params(teacher.get_output_embeddings()) if hasattr(teacher, "get_output_embeddings") else None
        fused = s_params is not None and t_params is not None and t_params[2] is None
    with torch.no_grad():
        with _head_input(teacher) if fused else contextlib.nullcontext():
            t_out = teacher(**inputs, output_hidden_states=want_hidden)
    with _head_input(student) if fused else contextlib.nullcontext():
        s_out = student(**inputs, output_hidden_states=want_hidden)
    s_hidden = s_out.hidden_states[-1] if want_hidden else None
    t_hidden = t_out.hidden_states[-1] if want_hidden else None
    if not fused:
        return distillation_triple_loss(s_out.logits, t_out.logits, labels, s_hidden, t_hidden, attention_mask,
                                        temperature=temperature, weights=weights, task=task,
                                        ignore_index=ignore_index, divergence=divergence)
    W, b, A, B, scaling = s_params
    tW, tb = t_params[0], t_params[1]
    lead = s_out.logits.shape[:-1]
    hard, kd_mask = _rows(labels, attention_mask, task, ignore_index, lead)
    if w_hard == 0:
        hard = None
    total_w = w_soft + w_hard if hard is not None else w_soft
    alpha = w_soft / total_w if hard is not None else 0.5
    kd = fused_linear_distillation_loss(
        s_out.logits, W, t_out.logits.to(tW.dtype), tW, hard, student_bias=b, teacher_bias=tb, lora_A=A, lora_B=B,
        lora_scaling=scaling, temperature=temperature, alpha=alpha, ignore_index=ignore_index,
        divergence=divergence, kd_mask=kd_mask) * total_w
    loss, cos = kd, kd.new_zeros(())
    if want_hidden:
        cos = hidden_cosine_loss(s_hidden, t_hidden, attention_mask)
        loss = loss + w_cos * cos
    return DistillationLoss(loss, kd.detach(), cos.detach())


def _make_trainer_class():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """``transformers.Trainer`` that trains ``model`` (the student) by distilling ``teacher_model``.

        ``DistillationTrainer(model=student, teacher_model=teacher, args=..., train_dataset=..., data_collator=...,
        temperature=2.0, weights=(5, 2, 1), task="mlm", fused=True)``. The teacher is frozen in place
        (``requires_grad_(False)``), kept in eval mode and moved to the student's device. Each batch's loss is
        averaged over that batch's tokens, and with gradient accumulation over the accumulated batches (the
        Trainer divides by the steps: the loss is not normalised by ``num_items_in_batch``); the last batch's
        terms are in ``last_losses``.
        """

        def __init__(self, *args, teacher_model: nn.Module, temperature: float = 2.0,
                     weights: Sequence[float] = DISTILBERT_WEIGHTS, task: str = "mlm", fused: bool = True,
                     divergence: str = "forward_kl", **kwargs):
            super().__init__(*args, **kwargs)
            # The loss is a per-batch mean, not a sum over num_items_in_batch: the Trainer must divide it by the
            # accumulation steps (it skips that for models that take loss kwargs, e.g. BERT's **kwargs forward:
            # the update grew with gradient_accumulation_steps).
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False
            _weights(weights)
            self.teacher = teacher_model.eval().requires_grad_(False)
            self.distill_kwargs = dict(temperature=temperature, weights=tuple(weights), task=task, fused=fused,
                                       divergence=divergence)
            self.last_losses: DistillationLoss | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            device = next(model.parameters()).device
            if next(self.teacher.parameters()).device != device:
                self.teacher.to(device)
            losses = compute_distillation_loss(model, self.teacher, inputs, **self.distill_kwargs)
            self.last_losses = losses
            return (losses.loss, {"loss": losses.loss}) if return_outputs else losses.loss

    DistillationTrainer.__module__ = __name__
    return DistillationTrainer


_LAZY: dict[str, type] = {}


def __getattr__(name: str):
    # transformers is imported only when the Trainer subclass is asked for (it is optional, and slow to import).
    if name == "DistillationTrainer":
        if name not in _LAZY:
            _LAZY[name] = _make_trainer_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
