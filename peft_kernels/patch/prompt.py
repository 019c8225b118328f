"""Prompt Tuning and P-Tuning for ``transformers`` models, through the fused ``soft_prompt_embed`` op.

``apply_prompt_tuning(model, P)`` / ``apply_p_tuning(model, P)`` attach a :class:`~peft_kernels.nn.SoftPrompt` /
:class:`~peft_kernels.nn.PromptEncoder` as ``model.peft_kernels_prompt``, freeze everything else (a sequence
classifier's head keeps training, as in HF peft), and register one forward pre-hook on the model. On a call that
starts a sequence (no KV cache yet) the hook turns ``input_ids`` into ``inputs_embeds`` with the P virtual tokens in
them (one fused gather, no ``cat``), and extends what has the sequence's length to match: the attention mask (ones),
``labels`` (-100), ``token_type_ids`` (zeros) and ``position_ids`` (virtual tokens numbered like the tokens they sit
among). On later ``generate()`` steps (the virtual tokens are in the KV cache) it only extends the attention mask and
shifts ``position_ids`` by P. The model's code is untouched.

Placement: in front of the tokens (Prompt Tuning, HF peft's P-Tuning), or for P-Tuning at template positions:
``positions`` = P insertion indices into the input tokens (virtual token p goes before token ``positions[p]``;
counted from the first real token, so left padding shifts them; indices past the end are clamped to it).

Positions: with no ``position_ids`` the model numbers the P + S embeddings 0..P+S-1 (what HF peft does, which
also drops any ``position_ids`` it is given); given ``position_ids`` are kept for the tokens and extended for the
virtual tokens (so left-padded generation keeps its positions), and shifted by P during generation.

``patch_peft_prompt_model(peft_model)`` runs an HF peft ``PromptTuningConfig`` / ``PromptEncoderConfig`` model's
forward (peft's own prompt encoder and semantics) and ``generate()`` (the hook above, holding peft's prompt)
through the fused op; ``save_prompt`` writes peft's format and
``load_prompt`` reads checkpoints peft saved.
"""

from __future__ import annotations

import inspect
import os
import threading
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from peft_kernels.nn.prompt import PromptEncoder, SoftPrompt
from peft_kernels.ops.prompt import prompt_maps, soft_prompt_embed
from peft_kernels.patch import _io, _methods, _save_pretrained

ENCODER_ATTR = "peft_kernels_prompt"
_STATE_ATTR = "_peft_kernels_prompt_state"
_POOL_ATTR = "_peft_kernels_prompt_pooling"  # on a decoder classifier's score head: the model's _PromptState
# id(state) -> the rows the head pools in the forward running on this thread (DataParallel replicas share the state
# and run in threads of their own)
_POOL_ROWS = threading.local()
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
ENCODER_WEIGHTS_NAME = "peft_kernels_prompt_encoder.safetensors"  # P-Tuning's encoder (peft keeps only its output)
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "p_tuning": "P_TUNING"}
# Models whose learned absolute position table bounds P + S (rotary models are not bounded by a table).
_ABSOLUTE_POSITIONS = {"gpt2": "n_positions", "bert": "max_position_embeddings", "roberta": "max_position_embeddings",
                       "distilbert": "max_position_embeddings", "opt": "max_position_embeddings"}
_OWNERS = {"prompt": ("apply_prompt_tuning", "remove_prompt_tuning"), "p_tuning": ("apply_p_tuning", "remove_p_tuning")}


# --------------------------------------------------------------------------------------------------
# Per-model state and the forward pre-hook
# --------------------------------------------------------------------------------------------------
@dataclass
class _PromptState:
    encoder: nn.Module
    method: str
    num_virtual_tokens: int
    hidden_size: int
    positions: tuple[int, ...] | None
    max_positions: int | None
    arg_names: tuple[str, ...]
    train_modules: list[str]
    requires_grad: dict[str, bool]
    task_type: str
    encoder_config: dict
    _positions_on: dict = field(default_factory=dict)
    # A decoder sequence classifier: its head pools the last non-pad token of input_ids, which it cannot find in
    # the inputs_embeds it gets here (the rows for the head are per forward: _POOL_ROWS).
    pools_last_token: bool = False

    def __getstate__(self):  # copy.deepcopy / pickle: no cached device tensors
        return {**self.__dict__, "_positions_on": {}}

    def positions_tensor(self, device) -> Tensor:
        t = self._positions_on.get(device)
        if t is None:
            t = self._positions_on[device] = torch.tensor(self.positions, dtype=torch.int64, device=device)
        return t


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if get is not None:
        return int(get())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])  # legacy tuple cache
    return 0


def _insert(x: Tensor, fill, maps, P: int) -> Tensor:
    """A [B, S] tensor with ``fill`` at the P virtual positions: [B, P + S]."""
    B = x.shape[0]
    if maps is None:
        return torch.cat([x.new_full((B, P), fill), x], dim=1)
    slots = maps[0]
    picked = torch.gather(x, 1, slots.clamp_min(0).long().expand(B, -1))
    return torch.where(slots < 0, torch.full_like(picked, fill), picked)


def _insert_positions(pos: Tensor, maps, P: int) -> Tensor:
    """Given position ids [B, S] of the tokens -> [B, P + S]: a virtual token takes the position of the token after
    it minus the virtual tokens between them, so the whole row counts up by one where the tokens did."""
    if pos.dim() != 2:
        raise NotImplementedError(
            f"peft_kernels prompt tuning: position_ids of shape {tuple(pos.shape)} (e.g. multimodal RoPE) are not "
            "supported; pass 2-D [batch, seq] position_ids or none"
        )
    B, S = pos.shape
    if maps is None:
        return torch.cat([pos[:, :1] + torch.arange(P, device=pos.device), pos + P], dim=1)
    slots = maps[0].long()
    t = torch.arange(P + S, device=pos.device)
    c = torch.where(slots >= 0, slots, (t + slots + 1).clamp(max=S - 1))  # t - p for virtual token p
    return torch.gather(pos, 1, c.expand(B, -1)) + (t - c)


def _insert_rows(embeds: Tensor, prompt: Tensor, maps) -> Tensor:
    """The unfused path, for callers that pass inputs_embeds themselves."""
    B, S, H = embeds.shape
    prompt = prompt.to(embeds.dtype)
    prompt = prompt.expand(B, -1, -1) if prompt.dim() == 2 else prompt
    if maps is None:
        return torch.cat([prompt, embeds], dim=1)
    slots = maps[0].long()
    tok = torch.gather(embeds, 1, slots.clamp_min(0).expand(B, -1)[..., None].expand(-1, -1, H))
    vir = torch.gather(prompt, 1, (-slots - 1).clamp_min(0).expand(B, -1)[..., None].expand(-1, -1, H))
    return torch.where((slots < 0)[..., None], vir, tok)


def _insertion_indices(state: _PromptState, mask: Tensor | None, S: int, device, limit: int) -> Tensor:
    ins = state.positions_tensor(device)
    if mask is not None and mask.dim() == 2:
        start = (mask.cumsum(1) == 0).sum(1, keepdim=True)  # leading padding per example (no host sync)
        ins = ins[None] + start
    return ins.clamp(max=limit)


def _before_forward(module, args, kwargs):
    state: _PromptState = getattr(module, _STATE_ATTR)
    if args:
        if len(args) > len(state.arg_names):
            raise TypeError(f"{type(module).__name__}.forward takes {len(state.arg_names)} positional arguments")
        for name, value in zip(state.arg_names, args):
            if name in kwargs:
                raise TypeError(f"{type(module).__name__}.forward got multiple values for argument {name!r}")
            kwargs[name] = value
    _transform(module, state, kwargs)
    return (), kwargs


def _transform(model, state: _PromptState, kwargs: dict) -> None:
    P = state.num_virtual_tokens
    if state.pools_last_token:
        _POOL_ROWS.__dict__.pop(id(state), None)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if ids is None and embeds is None:
        return  # the model raises its own error
    B, S = (ids if ids is not None else embeds).shape[:2]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = _cache_length(cache)
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2):
        raise NotImplementedError(
            "peft_kernels prompt tuning: pass a 2-D [batch, seq] attention_mask (or none); a prebuilt 4-D mask "
            "(also what generate() builds for a static / compileable cache) cannot be extended by the virtual tokens; "
            "use the default dynamic cache"
        )
    total = P + past + S if past == 0 else past + S
    if state.max_positions is not None and total > state.max_positions:
        raise ValueError(
            f"peft_kernels prompt tuning: {P} virtual tokens + {total - P} tokens = {total} positions, but "
            f"{type(model).__name__} has only {state.max_positions} position embeddings; shorten the input or use "
            "fewer virtual tokens"
        )
    if past > 0:  # generation after the first step: the virtual tokens are already in the cache
        if mask is not None:
            maps = None
            if state.positions is not None:
                L = mask.shape[1]
                maps = prompt_maps(_insertion_indices(state, mask, L, mask.device, past - P), L, P)
            kwargs["attention_mask"] = _insert(mask, 1, maps, P)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + P
        return
    maps = None
    device = (ids if ids is not None else embeds).device
    if state.positions is not None:
        maps = prompt_maps(_insertion_indices(state, mask, S, device, S), S, P)
    prompt = state.encoder()
    if ids is not None and state.pools_last_token:
        _POOL_ROWS.__dict__[id(state)] = _last_token_rows(model, ids, maps, P)
    if ids is not None:
        weight = model.get_input_embeddings().weight
        try:
            kwargs["inputs_embeds"] = soft_prompt_embed(ids, weight, prompt.to(weight.device), maps=maps)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"peft_kernels prompt tuning ({type(model).__name__}): {exc}") from exc
        kwargs["input_ids"] = None
    else:
        kwargs["inputs_embeds"] = _insert_rows(embeds, prompt.to(embeds.device), maps)
    if mask is not None:
        kwargs["attention_mask"] = _insert(mask, 1, maps, P)
    labels = kwargs.get("labels")
    if isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape[1] == S:
        kwargs["labels"] = _insert(labels, -100, maps, P)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = _insert(kwargs["token_type_ids"], 0, maps, P)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = _insert_positions(kwargs["position_ids"], maps, P)


# --------------------------------------------------------------------------------------------------
# Model inspection
# --------------------------------------------------------------------------------------------------
def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_model(model, who: str) -> nn.Embedding:
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise TypeError(f"{who} needs a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{who}: encoder-decoder models ({type(model).__name__}) are not supported; "
                                  "decoder-only and encoder-only models are")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"{who}: {type(model).__name__}.get_input_embeddings() is {type(emb).__name__}, expected an "
                        "nn.Embedding")
    return emb


def _max_positions(model) -> int | None:
    text = _text_config(model.config)
    attr = _ABSOLUTE_POSITIONS.get(getattr(text, "model_type", None))
    return getattr(text, attr, None) if attr else None


def _task_type(model) -> str:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def _check_positions(positions, P: int, who: str) -> tuple[int, ...] | None:
    if positions is None:
        return None
    if isinstance(positions, Tensor):
        positions = positions.tolist()
    if not isinstance(positions, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in positions):
        raise TypeError(f"{who}: positions must be a list of ints (insertion indices), got {positions!r:.80}")
    if len(positions) != P:
        raise ValueError(f"{who}: positions has {len(positions)} entries, expected one per virtual token ({P})")
    if any(i < 0 for i in positions) or any(b < a for a, b in zip(positions, positions[1:])):
        raise ValueError(f"{who}: positions must be non-decreasing insertion indices >= 0, got {list(positions)}")
    return tuple(positions)


def get_prompt_state(model) -> _PromptState | None:
    return getattr(getattr(model, "_orig_mod", model), _STATE_ATTR, None)


def _state(model, who: str) -> _PromptState:
    state = get_prompt_state(model)
    if state is None:
        raise ValueError(f"{who}: {type(model).__name__} has no soft prompt; call apply_prompt_tuning or "
                         "apply_p_tuning first")
    return state


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _text_token_ids(init_text: str, tokenizer, who: str) -> list[int]:
    if tokenizer is None:
        raise ValueError(f"{who}: init='text' needs tokenizer= (a transformers tokenizer, or a callable text -> ids)")
    out = tokenizer(init_text)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    if isinstance(ids, Tensor):
        ids = ids.reshape(-1).tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple)):
        ids = list(ids[0])
    if not ids:
        raise ValueError(f"{who}: init_text {init_text!r} has no tokens")
    return [int(i) for i in ids]


def apply_prompt_tuning(model, num_virtual_tokens: int | None = None, init: str | None = None,
                        init_text: str | None = None, tokenizer=None, train_modules=None, *, prompt=None):
    """Prompt Tuning (Lester et al. 2021): P trainable virtual tokens in front of the input embeddings, everything
    else frozen. Returns ``model``, patched in place.

    ``init``: ``"random"`` (default), ``"sample_vocab"`` (rows of the model's embedding at random token ids) or
    ``"text"`` (the embedding rows of ``init_text``'s tokens from ``tokenizer``, trimmed or repeated to P; the
    default when ``init_text`` is given). ``num_virtual_tokens``: P (default 20). ``prompt``: a [P, H] tensor to
    start from instead (then P is its row count; init / init_text do not apply).
    ``train_modules``: submodules that train too (None: the head of a ``*ForSequenceClassification`` model).
    """
    who = "apply_prompt_tuning"
    emb = _check_model(model, who)
    H = emb.embedding_dim
    if prompt is not None:
        if not isinstance(prompt, Tensor) or prompt.dim() != 2 or not prompt.is_floating_point():
            raise ValueError(f"{who}: prompt must be a float [P, H] tensor")
        if prompt.shape[1] != H:
            raise ValueError(f"{who}: prompt of shape {tuple(prompt.shape)} has hidden size {prompt.shape[1]}, the "
                             f"model's embeddings have {H}")
        if num_virtual_tokens is not None and num_virtual_tokens != prompt.shape[0]:
            raise ValueError(f"{who}: num_virtual_tokens={num_virtual_tokens!r}, but prompt has {prompt.shape[0]} "
                             "rows (pass one of them, or both equal)")
        if init is not None or init_text is not None:
            raise ValueError(f"{who}: init / init_text do not apply when prompt= gives the starting values")
        encoder = SoftPrompt.from_table(prompt.detach().to(emb.weight.device), dtype=torch.float32)
    else:
        init = init or ("text" if init_text is not None else "random")
        if init == "text" and init_text is None:
            raise ValueError(f"{who}: init='text' needs init_text (and a tokenizer for it)")
        if init != "text" and init_text is not None:
            raise ValueError(f"{who}: init_text applies only with init='text', got init={init!r}")
        ids = _text_token_ids(init_text, tokenizer, who) if init == "text" else None
        encoder = SoftPrompt(_positive(20 if num_virtual_tokens is None else num_virtual_tokens, who), H, init,
                             embedding_weight=emb.weight, init_token_ids=ids, device=emb.weight.device)
    cfg = {"prompt_tuning_init": (init or "random").upper(), "prompt_tuning_init_text": init_text}
    return _apply(model, "prompt", encoder, None, train_modules, cfg, who)


def apply_p_tuning(model, num_virtual_tokens: int = 20, encoder: str = "mlp", positions=None, *,
                   encoder_hidden_size: int | None = None, num_layers: int = 2, dropout: float = 0.0,
                   train_modules=None, prompt_encoder: nn.Module | None = None):
    """P-Tuning (Liu et al. 2021): P virtual tokens produced by a :class:`PromptEncoder` (``"lstm"``: bidirectional
    LSTM + MLP head, ``"mlp"``: MLP only; peft's layers), in front of the tokens or, with ``positions``, inserted
    before the given token indices (a template). Everything else is frozen. Returns ``model``, patched in place.

    ``prompt_encoder``: a module of yours whose ``forward()`` returns the [P, H] virtual tokens, instead.
    """
    who = "apply_p_tuning"
    emb = _check_model(model, who)
    H = emb.embedding_dim
    if prompt_encoder is None:
        prompt_encoder = PromptEncoder(_positive(num_virtual_tokens, who), H, encoder, encoder_hidden_size,
                                       num_layers, dropout, device=emb.weight.device)
    cfg = {}
    if isinstance(prompt_encoder, PromptEncoder):
        cfg = {"encoder_reparameterization_type": prompt_encoder.encoder.upper(),
               "encoder_hidden_size": prompt_encoder.encoder_hidden_size,
               "encoder_num_layers": prompt_encoder.num_layers, "encoder_dropout": prompt_encoder.dropout}
    return _apply(model, "p_tuning", prompt_encoder, positions, train_modules, cfg, who)


def _pools_last_token(model) -> bool:
    """A transformers decoder sequence classifier: a ``score`` head whose logits it pools at the last token that is
    not the pad token, found in ``input_ids`` (given ``inputs_embeds``, as prompt tuning gives it, it takes the last
    position: a pad token in a right-padded batch)."""
    return (type(model).__name__.endswith("ForSequenceClassification")
            and isinstance(model._modules.get("score"), nn.Module))


def _last_token_rows(model, ids: Tensor, maps, P: int) -> Tensor:
    """Per row, where the classifier's token (the rightmost that is not the pad token, the head's own rule; the last
    token where the model has no pad token) is in [prompt; tokens]."""
    pad = getattr(_text_config(model.config), "pad_token_id", None)
    B, S = ids.shape
    if pad is None:  # (then transformers takes batches of one only)
        last = torch.full((B,), S - 1, device=ids.device)
    else:
        last = (torch.arange(S, device=ids.device) * (ids != pad).to(torch.int32)).argmax(-1)
    marker = torch.zeros(B, S, dtype=torch.int32, device=ids.device)
    marker[torch.arange(B, device=ids.device), last] = 1
    return _insert(marker, 0, maps, P).argmax(-1)


def _pool_last_token(module, args, output):
    """Forward hook on the classifier head: its logits at this forward's last real token moved to the last position,
    the one the model pools when it gets inputs_embeds."""
    state = module.__dict__.get(_POOL_ATTR)
    rows = None if state is None else _POOL_ROWS.__dict__.pop(id(state), None)
    if rows is None or not isinstance(output, Tensor) or output.dim() != 3:
        return None
    picked = output[torch.arange(output.shape[0], device=output.device), rows.to(output.device)]
    return torch.cat([output[:, :-1], picked[:, None]], 1)


def _positive(n, who: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{who}: num_virtual_tokens must be a positive int, got {n!r}")
    return n


def _apply(model, method, encoder, positions, train_modules, encoder_config, who):
    _methods.check_compatible(model, method, owner=who)
    emb = _check_model(model, who)
    H = emb.embedding_dim
    with torch.no_grad():
        out = encoder()
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError(f"{who}: the prompt module {type(encoder).__name__} must return a [P, H] tensor, got "
                         f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
    P = out.shape[0]
    if out.shape[1] != H:
        raise ValueError(f"{who}: the prompt has hidden size {out.shape[1]}, the model's input embeddings "
                         f"({type(emb).__name__} of {type(model).__name__}) have {H}")
    max_positions = _max_positions(model)
    limit = max_positions or getattr(_text_config(model.config), "max_position_embeddings", None)
    if limit is not None and P >= limit:
        raise ValueError(f"{who}: {P} virtual tokens leave no room for tokens: {type(model).__name__} has "
                         f"{limit} positions")
    positions = _check_positions(positions, P, who)
    train_names = _methods.resolve_train_modules(model, train_modules, who)
    arg_names = tuple(n for n, p in inspect.signature(model.forward).parameters.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    model.add_module(ENCODER_ATTR, encoder.to(emb.weight.device))
    encoder.requires_grad_(True)
    for name in train_names:
        model.get_submodule(name).requires_grad_(True)
    state = _PromptState(encoder, method, P, H, positions, max_positions, arg_names, train_names, requires_grad,
                         _task_type(model), encoder_config)
    setattr(model, _STATE_ATTR, state)
    # The hook finds the state through the module it runs on, so copy.deepcopy(model) gets its own.
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    if _pools_last_token(model):
        state.pools_last_token = True
        model.score.__dict__[_POOL_ATTR] = state
        model.score.register_forward_hook(_pool_last_token)
    _methods.register_method(model, method, {"num_virtual_tokens": P, "positions": positions})
    _save_pretrained.install(model, method)
    return model


def remove_prompt_tuning(model):
    """Undo apply_prompt_tuning / apply_p_tuning: drop the prompt module and the hook, restore every parameter's
    requires_grad. Returns ``model``."""
    state = _state(model, "remove_prompt_tuning")
    _methods.check_removable(model, state.method, owner="remove_prompt_tuning")
    for key in [k for k, h in model._forward_pre_hooks.items() if h is _before_forward]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    head = model._modules.get("score")
    if head is not None and head.__dict__.pop(_POOL_ATTR, None) is not None:
        for key in [k for k, h in head._forward_hooks.items() if h is _pool_last_token]:
            del head._forward_hooks[key]
    delattr(model, ENCODER_ATTR)
    delattr(model, _STATE_ATTR)
    for name, p in model.named_parameters():
        if name in state.requires_grad:
            p.requires_grad_(state.requires_grad[name])
    _methods.unregister_method(model, state.method)
    _save_pretrained.uninstall(model, state.method)
    return model


remove_p_tuning = remove_prompt_tuning


@torch.no_grad()
def freeze_prompt(model):
    """Replace a P-Tuning encoder by its output as a plain table (inference: no encoder run per forward)."""
    state = _state(model, "freeze_prompt")
    if isinstance(state.encoder, SoftPrompt):
        return model
    to_static = getattr(state.encoder, "to_static", None)
    table = to_static() if to_static is not None else SoftPrompt.from_table(state.encoder().detach())
    table.requires_grad_(False)
    delattr(model, ENCODER_ATTR)
    model.add_module(ENCODER_ATTR, table)
    state.encoder = table
    return model


# --------------------------------------------------------------------------------------------------
# Saving and loading, in HF peft's format
# --------------------------------------------------------------------------------------------------
def _peft_config(model, state: _PromptState) -> dict:
    text = _text_config(model.config)
    cfg = {
        "peft_type": PEFT_TYPES[state.method],
        "task_type": state.task_type,
        "auto_mapping": None,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": state.num_virtual_tokens,
        "token_dim": state.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "num_layers": getattr(text, "num_hidden_layers", None),
        "modules_to_save": list(state.train_modules) or None,
    }
    if state.method == "prompt":
        # RANDOM: the saved table is the trained prompt; a TEXT init would make peft load a tokenizer first.
        cfg.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                   tokenizer_kwargs=None)
    else:
        cfg.update({"encoder_reparameterization_type": "MLP", "encoder_hidden_size": state.hidden_size,
                    "encoder_num_layers": 2, "encoder_dropout": 0.0, **state.encoder_config})
    if state.positions is not None:
        cfg["peft_kernels_positions"] = list(state.positions)  # ours only: peft places prompts in front
    return cfg


def save_prompt(model, path: str | os.PathLike) -> None:
    """Write the prompt in HF peft's format to directory ``path``: ``adapter_model.safetensors`` (the [P, H]
    ``prompt_embeddings`` table, and the trained head as ``base_model.<module>.<param>``) and
    ``adapter_config.json`` (``PROMPT_TUNING`` / ``P_TUNING``), which ``PeftModel.from_pretrained`` loads; for
    P-Tuning also the encoder's own weights (``peft_kernels_prompt_encoder.safetensors``) to resume training.
    Template ``positions`` are saved as ``peft_kernels_positions`` (peft ignores the key and puts the prompt in
    front, so such a prompt gives other outputs under peft; :func:`load_prompt` restores the positions)."""
    state = _state(model, "save_prompt")
    with torch.no_grad():
        was = state.encoder.training
        state.encoder.eval()
        try:
            table = state.encoder().detach()
        finally:
            state.encoder.train(was)
    tensors = {"prompt_embeddings": table.float().contiguous().cpu()}
    for name in state.train_modules:
        for k, v in model.get_submodule(name).state_dict().items():
            tensors[f"base_model.{name}.{k}"] = v.detach().contiguous().cpu()
    with _io.atomic_files(path, owner="save_prompt") as out:
        out.save_safetensors(WEIGHTS_NAME, tensors, {"format": "pt"})
        if not isinstance(state.encoder, SoftPrompt):
            enc = {k: v.detach().contiguous().cpu() for k, v in state.encoder.state_dict().items()}
            out.save_safetensors(ENCODER_WEIGHTS_NAME, enc, {"format": "pt"})
        out.write_json(CONFIG_NAME, _peft_config(model, state))


def _read_checkpoint(path, who: str):
    path = os.fspath(path)
    cfg = _io.read_json(os.path.join(path, CONFIG_NAME), owner=who)
    peft_type = cfg.get("peft_type")
    if peft_type not in PEFT_TYPES.values():
        raise ValueError(f"{who}: {path!r} holds a {peft_type!r} adapter, not PROMPT_TUNING or P_TUNING")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{who}: {path!r} was saved for an encoder-decoder model (num_transformer_submodules=2)")
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(weights):
        tensors = _io.load_safetensors(weights, owner=who)
    else:
        tensors = _io.load_torch_state(os.path.join(path, "adapter_model.bin"), owner=who)
    table = tensors.get("prompt_embeddings")
    if table is None or table.dim() != 2:
        raise ValueError(f"{who}: {path!r} has no [P, H] 'prompt_embeddings' tensor (keys: {sorted(tensors)[:8]})")
    P = int(cfg.get("num_virtual_tokens") or table.shape[0])
    if table.shape[0] != P:
        raise ValueError(f"{who}: prompt_embeddings has {table.shape[0]} rows, the config says {P} virtual tokens")
    encoder_sd = None
    enc_path = os.path.join(path, ENCODER_WEIGHTS_NAME)
    if peft_type == "P_TUNING" and os.path.isfile(enc_path):
        encoder_sd = _io.load_safetensors(enc_path, owner=who)
    heads = {k[len("base_model."):]: v for k, v in tensors.items() if k.startswith("base_model.")}
    return cfg, table, encoder_sd, heads


def load_prompt(model, path: str | os.PathLike):
    """Load a prompt saved by :func:`save_prompt`, by the patched model's ``save_pretrained``
    (``Trainer.save_model``) or by HF peft (``PromptTuningConfig`` / ``PromptEncoderConfig``,
    ``save_pretrained``) into ``model``. A model without a prompt gets one (for a peft P-Tuning checkpoint, which
    holds the encoder's output only, as a plain table); a model with one must match it. Returns ``model``."""
    who = "load_prompt"
    nested = os.path.join(path, _save_pretrained.PROMPT_SUBDIR)
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(nested, CONFIG_NAME)):
        path = nested  # a model.save_pretrained(dir) directory: the prompt's files are one level down
    cfg, table, encoder_sd, heads = _read_checkpoint(path, who)
    emb = _check_model(model, who)
    if table.shape[1] != emb.embedding_dim:
        raise ValueError(f"{who}: the checkpoint's prompt has hidden size {table.shape[1]}, "
                         f"{type(model).__name__}'s embeddings have {emb.embedding_dim}")
    method = "prompt" if cfg["peft_type"] == "PROMPT_TUNING" else "p_tuning"
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    missing = [k for k in heads if k not in params]
    if missing:
        raise ValueError(f"{who}: {type(model).__name__} has no parameters {missing} (saved modules_to_save)")
    head_modules = sorted({k.rsplit(".", 1)[0] for k in heads})
    positions = cfg.get("peft_kernels_positions")
    state = get_prompt_state(model)
    if state is None:
        train = head_modules if heads else None
        if method == "prompt":
            apply_prompt_tuning(model, table.shape[0], prompt=table, train_modules=train)
        elif encoder_sd is not None:
            enc = PromptEncoder(table.shape[0], table.shape[1], cfg.get("encoder_reparameterization_type", "MLP"),
                                cfg.get("encoder_hidden_size"), int(cfg.get("encoder_num_layers") or 2),
                                float(cfg.get("encoder_dropout") or 0.0), device=emb.weight.device)
            _load_encoder(enc, encoder_sd, path, who)
            apply_p_tuning(model, positions=positions, train_modules=train, prompt_encoder=enc)
        else:
            apply_p_tuning(model, positions=positions, train_modules=train,
                           prompt_encoder=SoftPrompt.from_table(table.to(emb.weight.device), dtype=torch.float32))
        state = get_prompt_state(model)
    else:
        if state.method != method or state.num_virtual_tokens != table.shape[0]:
            raise ValueError(f"{who}: the model has {state.method} with {state.num_virtual_tokens} virtual tokens, "
                             f"the checkpoint {method} with {table.shape[0]}")
        if isinstance(state.encoder, SoftPrompt):
            with torch.no_grad():
                state.encoder.embedding.weight.copy_(table)
        elif encoder_sd is not None:
            _load_encoder(state.encoder, encoder_sd, path, who)
        else:
            raise ValueError(f"{who}: {path!r} holds only the prompt table (peft keeps no encoder weights); the model "
                             "has a P-Tuning encoder: call remove_p_tuning(model) and load into the plain model")
    with torch.no_grad():
        for k, v in heads.items():
            params[k].copy_(v)
    return model


def _load_encoder(encoder: nn.Module, sd: dict, path, who: str) -> None:
    try:
        encoder.load_state_dict(sd)
    except RuntimeError as exc:
        raise ValueError(f"{who}: the encoder weights in {path!r} do not fit: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# HF peft models: PromptTuningConfig / PromptEncoderConfig through the fused op
# --------------------------------------------------------------------------------------------------
_PEFT_FORWARD_ATTR = "_peft_kernels_prompt_forward"


def _peft_type(cfg) -> str:
    peft_type = getattr(cfg, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type))


def _peft_prompt(peft_model) -> Tensor:
    """peft's own virtual tokens [P, H] (its get_prompt without the batch repeat)."""
    cfg = peft_model.active_peft_config
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    if cfg.inference_mode:
        return encoder.embedding.weight
    tokens = peft_model.prompt_tokens[peft_model.active_adapter][None, : cfg.num_virtual_tokens]
    return encoder(tokens.to(encoder.embedding.weight.device))[0]


def _peft_fused_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                        output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    cfg = self.active_peft_config
    if input_ids is None or inputs_embeds is not None or _peft_type(cfg) not in PEFT_TYPES.values():
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                  labels=labels, output_attentions=output_attentions,
                                  output_hidden_states=output_hidden_states, return_dict=return_dict,
                                  task_ids=task_ids, **kwargs)
    P = cfg.num_virtual_tokens
    B = input_ids.shape[0]
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
    if kwargs.get("position_ids") is not None:
        warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.",
                      stacklevel=2)
        kwargs["position_ids"] = None
    task = str(getattr(cfg.task_type, "value", cfg.task_type))
    if kwargs.get("token_type_ids") is not None:
        if task == "CAUSAL_LM":
            warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids",
                          stacklevel=2)
            kwargs["token_type_ids"] = None
        else:
            kwargs["token_type_ids"] = _insert(kwargs["token_type_ids"].long(), 0, None, P)
    if labels is not None and task == "CAUSAL_LM":
        labels = _insert(labels, -100, None, P)
    weight = self.word_embeddings.weight
    embeds = soft_prompt_embed(input_ids, weight, _peft_prompt(self).to(weight.device))
    kwargs.update(attention_mask=attention_mask, labels=labels, output_attentions=output_attentions,
                  output_hidden_states=output_hidden_states)
    if return_dict is not None:
        kwargs["return_dict"] = return_dict
    return self.base_model(inputs_embeds=embeds, **kwargs)


def is_peft_prompt_model(model) -> bool:
    """Whether ``model`` is an HF peft model whose active adapter is Prompt Tuning or P-Tuning."""
    return _peft_type(getattr(model, "active_peft_config", None)) in PEFT_TYPES.values() \
        if hasattr(model, "peft_config") else False


class _PeftPromptView(nn.Module):
    """peft's virtual tokens as a module for our forward hook (holds the peft model without registering it)."""

    def __init__(self, peft_model) -> None:
        super().__init__()
        self.__dict__["_peft_model"] = peft_model

    def forward(self) -> Tensor:
        return _peft_prompt(self.__dict__["_peft_model"])


def _peft_fused_generate(self, *args, **kwargs):
    """generate() of the base model with our pre-hook holding peft's prompt: the virtual tokens are embedded once
    (fused) and kept in the KV cache; the mask and position ids are extended on every step."""
    cfg = self.active_peft_config
    base = self.get_base_model()
    emb = base.get_input_embeddings()
    state = _PromptState(
        _PeftPromptView(self), {"PROMPT_TUNING": "prompt", "P_TUNING": "p_tuning"}[_peft_type(cfg)],
        cfg.num_virtual_tokens, emb.embedding_dim, None, _max_positions(base),
        tuple(n for n, p in inspect.signature(base.forward).parameters.items()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)),
        [], {}, _task_type(base), {},
    )
    setattr(base, _STATE_ATTR, state)
    handle = base.register_forward_pre_hook(_before_forward, with_kwargs=True)
    try:
        return base.generate(*args, **kwargs)
    finally:
        handle.remove()
        delattr(base, _STATE_ATTR)


def patch_peft_prompt_model(peft_model):
    """Run an HF peft Prompt Tuning / P-Tuning model through the fused op: its forward (peft's prompt encoder,
    mask, label and position handling kept) and, for causal LMs, ``generate()`` (the virtual tokens embedded once
    and kept in the KV cache, as :func:`apply_prompt_tuning` does). Returns ``peft_model``."""
    who = "patch_peft_prompt_model"
    cfg = getattr(peft_model, "active_peft_config", None)
    peft_type = _peft_type(cfg)
    if peft_type not in PEFT_TYPES.values():
        raise ValueError(f"{who}: expected a peft PromptTuningConfig / PromptEncoderConfig model, got "
                         f"{type(peft_model).__name__} with peft_type {peft_type!r}")
    if int(cfg.num_transformer_submodules or 1) != 1:
        raise NotImplementedError(f"{who}: encoder-decoder peft models (num_transformer_submodules=2) are not "
                                  "supported")
    task = str(getattr(cfg.task_type, "value", cfg.task_type))
    if task not in ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION"):
        raise NotImplementedError(f"{who}: peft task_type {task!r} is not supported (CAUSAL_LM, SEQ_CLS, "
                                  "FEATURE_EXTRACTION are)")
    if _PEFT_FORWARD_ATTR not in peft_model.__dict__:
        peft_model.forward = types.MethodType(_peft_fused_forward, peft_model)
        if task == "CAUSAL_LM":
            peft_model.generate = types.MethodType(_peft_fused_generate, peft_model)
        peft_model.__dict__[_PEFT_FORWARD_ATTR] = True
    return peft_model


def unpatch_peft_prompt_model(peft_model):
    """Undo :func:`patch_peft_prompt_model`. Returns ``peft_model``."""
    if peft_model.__dict__.pop(_PEFT_FORWARD_ATTR, None):
        peft_model.__dict__.pop("forward", None)
        peft_model.__dict__.pop("generate", None)
    return peft_model


__all__ = [
    "apply_p_tuning",
    "apply_prompt_tuning",
    "freeze_prompt",
    "get_prompt_state",
    "is_peft_prompt_model",
    "load_prompt",
    "patch_peft_prompt_model",
    "remove_p_tuning",
    "remove_prompt_tuning",
    "save_prompt",
    "unpatch_peft_prompt_model",
]

