"""apply_prefix_tuning / apply_p_tuning_v2 on tiny transformers models.

Oracles: the same patched model on its explicit path (SDPA over the concatenated [prefix; keys] with transformers' own
mask), the unpatched model fed the prefix as a KV cache (HF peft's mechanism, written out), and HF peft itself.
"""

import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import peft_kernels  # noqa: E402
from peft_kernels.nn import PrefixEncoder  # noqa: E402
from peft_kernels.patch import prefix as prefix_patch  # noqa: E402
from peft_kernels.patch.prefix import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    apply_p_tuning_v2,
    apply_prefix_tuning,
    get_prefix_state,
    load_prefix,
    remove_prefix,
    save_prefix,
)
from tests.helpers import assert_close, assert_within_eager_error  # noqa: E402

# the KV-cache oracle passes `past_key_values`, which newer transformers renamed to `cache`
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

VOCAB, P, B, L = 96, 4, 3, 7
DECODERS = ["llama", "mistral", "qwen2", "gpt2"]
ENCODERS = ["bert", "roberta"]
KINDS = DECODERS + ENCODERS
TOL = {"rtol": 1e-4, "atol": 2e-5}


def make(kind, seed=0, **overrides):
    torch.manual_seed(seed)
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    if kind in ("llama", "mistral", "qwen2"):
        cls = {"llama": (t.LlamaConfig, t.LlamaForCausalLM), "mistral": (t.MistralConfig, t.MistralForCausalLM),
               "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM)}[kind]
        extra = {"sliding_window": None} if kind == "mistral" else {}
        config = cls[0](**common, num_key_value_heads=2, **{**extra, **overrides})
        model = cls[1](config)
    elif kind == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
                  embd_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
        config = t.GPT2Config(**{**kw, **overrides})
        model = t.GPT2LMHeadModel(config)
    else:
        cls = {"bert": (t.BertConfig, t.BertForSequenceClassification),
               "roberta": (t.RobertaConfig, t.RobertaForSequenceClassification)}[kind]
        common.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
                      max_position_embeddings=72)
        if kind == "roberta":
            common["pad_token_id"] = 1
        common.update(overrides)
        model = cls[1](cls[0](**common))
    return model.eval()


def inputs(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if kind in DECODERS:
        mask[1, :2] = 0  # left padding (generation) and right padding (training batches)
        mask[2, -3:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[1, 2] = -100  # predicted from a padding position, whose output is not the model's business
    else:
        mask[1, -2:] = 0
        mask[2, -4:] = 0
        labels = torch.tensor([0, 2, 1])
    pad = 1 if kind == "roberta" else 0
    ids = ids.masked_fill(mask == 0, pad)
    return ids, mask, labels


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def apply(model, method, **kw):
    if method == "prefix_tuning":
        return apply_prefix_tuning(model, num_virtual_tokens=P, projection_hidden=24, **kw)
    return apply_p_tuning_v2(model, num_virtual_tokens=P, **kw)


def run(model, ids, mask, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}


def test_public_exports():
    from peft_kernels import nn as pk_nn
    from peft_kernels import patch

    assert patch.apply_prefix_tuning is apply_prefix_tuning and patch.apply_p_tuning_v2 is apply_p_tuning_v2
    assert patch.save_prefix is save_prefix and patch.load_prefix is load_prefix
    assert patch.remove_prefix is remove_prefix
    assert pk_nn.PrefixEncoder is PrefixEncoder


# --------------------------------------------------------------------------------------------------
# Numerics: fused op vs the explicit path, the KV-cache oracle, HF peft
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_loss_grads_match_explicit_path(kind, method):
    model = apply(make(kind), method)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    ids, mask, labels = inputs(kind)
    fused = run(model, ids, mask, labels)
    with peft_kernels.use_backend("reference"):
        reference = run(model, ids, mask, labels)
    get_prefix_state(model).mode = "explicit"
    explicit = run(model, ids, mask, labels)
    assert fused[2].keys() == explicit[2].keys() and len(fused[2]) > 0
    real = mask.bool() if kind in DECODERS else slice(None)  # a left-pad query's output is never used
    for other in (reference, explicit):
        assert_close(fused[0][real], other[0][real], name="logits", **TOL)
        assert_close(fused[1], other[1], name="loss", **TOL)
        for n, g in fused[2].items():
            assert g.abs().sum() > 0, n
            assert_close(g, other[2][n], name=f"grad {n}", **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "roberta"])
def test_fused_op_gets_causal_flag_and_key_padding(kind, monkeypatch):
    calls = []

    def spy(q, k, v, pk, pv, causal=False, key_padding_mask=None, scale=None):
        calls.append((q.shape[2], k.shape[2], causal, key_padding_mask))
        return real_op(q, k, v, pk, pv, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    real_op = prefix_patch.prefix_attention
    monkeypatch.setattr(prefix_patch, "prefix_attention", spy)
    model = apply(make(kind), "prefix_tuning")
    ids, mask, _ = inputs(kind)
    causal = kind in DECODERS
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(input_ids=ids, attention_mask=mask)
        assert len(calls) == 2 and all(c[2] == causal and torch.equal(c[3], mask.bool()) for c in calls)
        calls.clear()
        model(input_ids=ids, attention_mask=torch.ones_like(mask))  # no padding: no mask at all
        assert len(calls) == 2 and all(c[2] == causal and c[3] is None for c in calls)
        if causal:  # decoding steps: one query over the cached real keys plus the new one
            calls.clear()
            model.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=3, min_new_tokens=3,
                           do_sample=False)
            assert [c[:2] for c in calls[2:]] == [(1, L + 1)] * 2 + [(1, L + 2)] * 2
            assert torch.equal(calls[-1][3], torch.cat([mask[:2].bool(), torch.ones(2, 2, dtype=torch.bool)], 1))


def _position_ids(kind):
    start = 2 if kind == "roberta" else 0  # RoBERTa positions start after its padding index
    return torch.arange(start, start + L)[None].expand(B, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_unpatched_model_with_prefix_in_kv_cache(kind):
    """HF peft's mechanism written out: the prefix as a DynamicCache, the 2-D mask extended by P ones. The cache puts
    the real tokens at positions P.., so the patched model gets those position ids explicitly."""
    base = make(kind)
    model = apply(copy.deepcopy(base), "prefix_tuning")
    ids, mask, _ = inputs(kind)
    pos = _position_ids(kind) + P
    ours = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    cache = transformers.DynamicCache(config=base.config)
    with torch.no_grad():
        for i, (k, v) in enumerate(model.peft_kernels_prefix()):
            cache.update(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous(), i)
        full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
        theirs = base(input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache).logits
    assert_close(ours.detach(), theirs, name="logits", **TOL)


@pytest.mark.parametrize("kind, projection", [("llama", True), ("mistral", False), ("qwen2", True), ("gpt2", False),
                                              ("bert", True), ("roberta", False)])
def test_matches_hf_peft_prefix_tuning(kind, projection):
    peft = pytest.importorskip("peft")
    base = make(kind)
    model = apply_prefix_tuning(copy.deepcopy(base), num_virtual_tokens=P, projection=projection,
                                projection_hidden=24, train_modules=[])
    task = "CAUSAL_LM" if kind in DECODERS else "SEQ_CLS"
    config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=24)
    theirs = peft.get_peft_model(base, config).eval()
    theirs.prompt_encoder["default"].load_state_dict(model.peft_kernels_prefix.state_dict())
    ids, mask, labels = inputs(kind)
    pos = _position_ids(kind)
    try:  # peft offsets the given position ids by P itself
        ref = theirs(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    except ValueError as exc:
        if "does not support past key values" in str(exc):
            pytest.skip(f"HF peft {peft.__version__} cannot prefix-tune {kind} under transformers "
                        f"{transformers.__version__}: {exc}")
        raise
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos + P, labels=labels)
    assert_close(out.logits.detach(), ref.logits.detach(), name="logits", **TOL)
    out.loss.backward()
    ref.loss.backward()
    ours_g = dict(model.peft_kernels_prefix.named_parameters())
    for n, p in theirs.prompt_encoder["default"].named_parameters():
        assert_close(ours_g[n].grad, p.grad, name=f"grad {n}", **TOL)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------
def _greedy(model, ids, mask, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1), out


@pytest.mark.parametrize("kind", DECODERS)
def test_generate_greedy_matches_reference_paths(kind):
    model = apply(make(kind), "prefix_tuning")
    ids, mask, _ = inputs(kind)
    ids, mask = ids[:2], mask[:2]  # row 1 is left-padded, as generation pads
    tokens, scores, out = _greedy(model, ids, mask)
    cache = out.past_key_values
    assert cache.get_seq_length() == ids.shape[1] + 5  # the cache holds real tokens only; the prefix is not cached
    assert len(set(tokens.flatten().tolist())) > 2  # a non-degenerate continuation
    no_cache = _greedy(model, ids, mask, use_cache=False)
    solo = _greedy(model, ids[1:, 2:], mask[1:, 2:])  # the padded row on its own
    others = [no_cache]
    if kind == "llama":  # a static cache: empty slots past the filled ones, masked
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # still served by the fused op
            others.append(_greedy(model, ids, mask, cache_implementation="static"))
    get_prefix_state(model).mode = "explicit"
    others.append(_greedy(model, ids, mask))
    if kind == "llama":
        others.append(_greedy(model, ids, mask, cache_implementation="static"))
    for other in others:
        assert torch.equal(tokens, other[0])
        assert_close(scores, other[1], name="scores", rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens[1:], solo[0])
    assert_close(scores[1:], solo[1], name="scores (unpadded)", rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# What trains
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, method, train_modules, heads",
    [
        ("llama", "prefix_tuning", None, []),
        ("gpt2", "p_tuning_v2", None, []),
        ("bert", "p_tuning_v2", None, ["classifier."]),
        ("roberta", "p_tuning_v2", None, ["classifier."]),
        ("bert", "prefix_tuning", [], []),
        ("llama", "p_tuning_v2", ["norm"], ["model.norm."]),
    ],
)
def test_only_prefix_and_head_train(kind, method, train_modules, heads):
    model = apply(make(kind), method, train_modules=train_modules)
    names = set(trainable(model))
    expected_prefix = {"peft_kernels_prefix.embedding.weight"}
    if method == "prefix_tuning":
        expected_prefix |= {f"peft_kernels_prefix.transform.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    head = {n for n in names if any(n.startswith(h) for h in heads)}
    assert names == expected_prefix | head
    assert bool(head) == bool(heads)
    ids, mask, labels = inputs(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n
        assert torch.equal(p.detach(), before[n]) != (n in names), n


def test_train_modules_unknown_name():
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        apply_prefix_tuning(make("llama"), num_virtual_tokens=P, train_modules=["nope"])


def test_prefix_computed_once_per_forward_and_cached_without_grad():
    model = apply(make("llama"), "prefix_tuning")
    calls = []
    model.peft_kernels_prefix.register_forward_hook(lambda *a: calls.append(1))
    ids, mask, _ = inputs("llama")
    model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 1  # one encoder call for both layers
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
        assert len(calls) == 2  # unchanged parameters: reused
        before = model(input_ids=ids, attention_mask=mask).logits
        model.peft_kernels_prefix.embedding.weight.add_(0.5)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 3 and not torch.allclose(before, after)


def test_gradient_checkpointing_same_grads():
    model = apply(make("llama"), "prefix_tuning")
    ids, mask, labels = inputs("llama")
    model.train()
    plain = run(model, ids, mask, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = run(model, ids, mask, labels)
    assert_close(plain[1], ckpt[1], name="loss", **TOL)
    for n, g in plain[2].items():
        assert_close(ckpt[2][n], g, name=f"grad {n}", **TOL)


# --------------------------------------------------------------------------------------------------
# Masks the op cannot express, attention dropout
# --------------------------------------------------------------------------------------------------
def test_sliding_window_exact_when_it_cannot_cut_refused_when_it_can():
    """P + keys <= window: the window never masks anything (peft, which counts the prefix inside the window, sees
    the same keys): served, equal to the model without a window. P + keys > window: refused, naming the layer."""
    ids, mask, labels = inputs("mistral")
    wide = apply(make("mistral", sliding_window=P + L), "p_tuning_v2")
    plain = apply(make("mistral"), "p_tuning_v2")
    plain.peft_kernels_prefix.load_state_dict(wide.peft_kernels_prefix.state_dict())
    assert_close(run(wide, ids, mask, labels)[0], run(plain, ids, mask, labels)[0], name="logits", **TOL)
    narrow = apply(make("mistral", sliding_window=4), "p_tuning_v2")
    with pytest.raises(ValueError, match=r"layer 0, MistralAttention.*sliding window of 4 tokens is shorter than "
                                         r"the 4 prefix tokens plus 7 keys.*HF peft hides its prefix"):
        narrow(input_ids=ids, attention_mask=mask)


def test_attention_dropout_in_training():
    ids, mask, labels = inputs("gpt2")
    model = apply(make("gpt2", attn_pdrop=0.5), "prefix_tuning").train()
    with pytest.warns(UserWarning, match="attention dropout"):
        a = model(input_ids=ids, attention_mask=mask).logits
    b = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(a, b)  # dropout applied
    model = apply(make("gpt2", attn_pdrop=0.5), "prefix_tuning", ignore_attention_dropout=True).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        a = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, model(input_ids=ids, attention_mask=mask).logits)


# --------------------------------------------------------------------------------------------------
# Save / load / remove
# --------------------------------------------------------------------------------------------------
def _train_step(model, kind):
    ids, mask, labels = inputs(kind)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind, method", [("llama", "prefix_tuning"), ("bert", "p_tuning_v2")])
def test_save_load_round_trip(kind, method, tmp_path):
    model = apply(make(kind), method)
    _train_step(model, kind)  # the prefix and the head now differ from a fresh model's
    ids, mask, _ = inputs(kind)
    expected = model(input_ids=ids, attention_mask=mask).logits.detach()
    save_prefix(model, tmp_path)
    cfg = json.loads((tmp_path / "prefix_config.json").read_text())
    assert cfg["method"] == method and cfg["num_virtual_tokens"] == P and cfg["num_layers"] == 2
    assert (tmp_path / "prefix_model.safetensors").exists()

    fresh = make(kind)  # same base weights (same seed), untrained prefix/head
    assert not torch.allclose(apply(make(kind), method)(input_ids=ids, attention_mask=mask).logits, expected)
    load_prefix(fresh, tmp_path)  # applies the saved method, then loads
    assert get_prefix_state(fresh).method == method
    assert set(trainable(fresh)) == set(trainable(model))
    assert_close(fresh(input_ids=ids, attention_mask=mask).logits.detach(), expected, name="logits", **TOL)

    patched = apply(make(kind), method)  # an already patched model loads too
    load_prefix(patched, tmp_path)
    assert_close(patched(input_ids=ids, attention_mask=mask).logits.detach(), expected, name="logits", **TOL)

    other = apply_p_tuning_v2(make(kind), num_virtual_tokens=P + 1)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        load_prefix(other, tmp_path)
    with pytest.raises(ValueError, match="saved from a"):
        load_prefix(make("gpt2" if kind != "gpt2" else "llama"), tmp_path)


def test_save_load_user_prefix_list(tmp_path):
    model = make("qwen2")
    given = [(torch.randn(2, 3, 8), torch.randn(2, 3, 8)) for _ in range(2)]
    apply_p_tuning_v2(model, prefix=given)
    assert get_prefix_state(model).num_virtual_tokens == 3
    ids, mask, _ = inputs("qwen2")
    expected = model(input_ids=ids, attention_mask=mask).logits.detach()
    save_prefix(model, tmp_path)
    fresh = load_prefix(make("qwen2"), tmp_path)
    assert_close(fresh(input_ids=ids, attention_mask=mask).logits.detach(), expected, name="logits", **TOL)


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_remove_prefix_restores_the_model(kind):
    model = make(kind)
    ids, mask, _ = inputs(kind)
    original = model(input_ids=ids, attention_mask=mask).logits.detach()
    impl = model.config._attn_implementation
    apply(model, "prefix_tuning")
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, original)
    assert remove_prefix(model) is model
    assert model.config._attn_implementation == impl
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "peft_kernels_prefix") and get_prefix_state(model) is None
    assert not any(hasattr(m, prefix_patch._LAYER_ATTR) for m in model.modules())
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits.detach(), original)
    apply(model, "p_tuning_v2")  # can be applied again
    with pytest.raises(ValueError, match="has no prefix"):
        remove_prefix(make(kind))


def test_deepcopy_gets_its_own_prefix():
    model = apply(make("llama"), "prefix_tuning")
    ids, mask, _ = inputs("llama")
    original = model(input_ids=ids, attention_mask=mask).logits.detach()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.peft_kernels_prefix.embedding.weight.add_(1.0)
    assert not torch.allclose(clone(input_ids=ids, attention_mask=mask).logits, original)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits.detach(), original)
    remove_prefix(clone)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits.detach(), original)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_bad_num_virtual_tokens():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
            apply_prefix_tuning(make("llama"), num_virtual_tokens=bad)


def test_unsupported_models():
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4)
    with pytest.raises(ValueError, match=r"does not support model type 'gpt_neox'.*supported: bert, gemma2, "
                                         r"gemma3_text, gpt2, llama"):
        apply_prefix_tuning(transformers.GPTNeoXForCausalLM(config))
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        apply_prefix_tuning(nn.Linear(4, 4))
    model = apply(make("llama"), "prefix_tuning")
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_p_tuning_v2(model)


def test_user_prefix_with_mismatched_layers():
    ok = (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="layer 1 has virtual tokens P = 5 but layer 0 has 3"):
        apply_p_tuning_v2(make("llama"), prefix=[ok, (torch.randn(2, 5, 8), torch.randn(2, 5, 8))])
    with pytest.raises(ValueError, match="has head dim 16, the model's attention has head dim 8"):
        apply_p_tuning_v2(make("llama"), prefix=[(torch.randn(2, 3, 16), torch.randn(2, 3, 16))] * 2)
    with pytest.raises(ValueError, match="has 4 KV heads, the model's attention has 2"):
        apply_p_tuning_v2(make("llama"), prefix=[(torch.randn(4, 3, 8), torch.randn(4, 3, 8))] * 2)
    with pytest.raises(ValueError, match="expected 2 .* pairs, one per attention layer, got 1"):
        apply_p_tuning_v2(make("llama"), prefix=[ok])


class _Drifting(nn.Module):
    """A custom encoder whose later outputs break the layout (P differs between layers)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2, 6, 8))
        self.broken = False

    def forward(self):
        second = self.w[1, :, :3] if self.broken else self.w[1]
        return [(self.w[0], self.w[0]), (second, second)]


def test_custom_encoder_checked_every_forward():
    enc = _Drifting()
    model = apply_prefix_tuning(make("llama"), prefix=enc)
    assert get_prefix_state(model).num_virtual_tokens == 6
    ids, mask, _ = inputs("llama")
    model(input_ids=ids, attention_mask=mask)
    enc.broken = True
    with pytest.raises(ValueError, match="layer 1: prefix_k has 3 virtual tokens but layer 0 has 6"):
        model(input_ids=ids, attention_mask=mask)


def test_wrong_mask_shape():
    model = apply(make("llama"), "prefix_tuning")
    ids = inputs("llama")[0]
    with_prefix = torch.ones(B, 1, L, P + L, dtype=torch.bool)  # a 4-D mask that wrongly includes the prefix
    with pytest.raises(ValueError, match=r"mask of shape \(3, 1, 7, 11\) does not fit batch 3, 7 queries and 7 keys"):
        model(input_ids=ids, attention_mask=with_prefix)
    with pytest.raises(ValueError, match="does not fit batch 3"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, L, L, dtype=torch.bool))


def test_custom_4d_masks():
    model = apply(make("qwen2"), "prefix_tuning")
    ids, mask, _ = inputs("qwen2")
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    bool_mask = (causal & mask.bool()[:, None, :])[:, None]
    expected = model(input_ids=ids, attention_mask=mask).logits.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # decodable: the fused op serves it
        assert_close(model(input_ids=ids, attention_mask=bool_mask).logits.detach(), expected, **TOL)
    additive = torch.zeros(B, 1, L, L).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert_close(model(input_ids=ids, attention_mask=additive).logits.detach(), expected, **TOL)
    biased = additive + 0.3 * torch.randn(B, 1, L, L)  # a bias the op cannot carry: explicit path
    with pytest.warns(UserWarning, match="not causal/bidirectional"):
        fused = model(input_ids=ids, attention_mask=biased).logits.detach()
    get_prefix_state(model).mode = "explicit"
    assert_close(fused, model(input_ids=ids, attention_mask=biased).logits.detach(), **TOL)
    assert not torch.allclose(fused, expected, atol=1e-4)


def test_op_errors_reach_the_user_with_the_layer():
    model = apply(make("llama"), "prefix_tuning")
    attn = model.model.layers[1].self_attn
    model(input_ids=inputs("llama")[0])
    q, kv = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    kpm_shape = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    out, _ = prefix_patch.prefix_attention_forward(attn, q, kv, kv, kpm_shape)
    assert out.shape == (1, 5, 4, 8)
    with pytest.raises(ValueError, match=r"layer 1, LlamaAttention\): prefix_attention: .*head dim"):
        prefix_patch.prefix_attention_forward(attn, torch.randn(1, 4, 5, 6), torch.randn(1, 2, 5, 6),
                                              torch.randn(1, 2, 5, 6), None)


def test_attention_impl_switched_away_is_detected():
    model = apply(make("llama"), "prefix_tuning")
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="did not call the registered attention function"):
        model(input_ids=inputs("llama")[0])


# --------------------------------------------------------------------------------------------------
# The fused Triton kernel inside a model: under TRITON_INTERPRET=1 on the CPU, natively on a GPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("kind", ["qwen2", "roberta"])
def test_triton_kernel_in_model_matches_reference(kind):
    if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = apply(make(kind), "prefix_tuning").to(dev)
    ids, mask, labels = (t.to(dev) for t in inputs(kind))
    with peft_kernels.use_backend("triton", strict=True):
        fused = run(model, ids, mask, labels)
        tokens = _greedy(model, ids[:2], mask[:2])[0] if kind in DECODERS else None
    with peft_kernels.use_backend("reference"):
        reference = run(model, ids, mask, labels)
        if tokens is not None:
            assert torch.equal(tokens, _greedy(model, ids[:2], mask[:2])[0])
    real = mask.bool() if kind in DECODERS else slice(None)
    assert_close(fused[0][real], reference[0][real], name="logits", rtol=1e-3, atol=1e-4)
    for n, g in fused[2].items():
        assert_close(g, reference[2][n], name=f"grad {n}", rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# GPU: the fused Triton kernel inside a model
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_gpu_triton_backend_in_model(kind):
    model = apply(make(kind), "prefix_tuning").cuda()
    ids, mask, labels = (t.cuda() for t in inputs(kind))
    fused = run(model, ids, mask, labels)
    with peft_kernels.use_backend("reference"):
        reference = run(model, ids, mask, labels)
    assert_close(fused[0], reference[0], name="logits", rtol=1e-3, atol=1e-3)
    for n, g in fused[2].items():
        assert_close(g, reference[2][n], name=f"grad {n}", rtol=1e-3, atol=1e-3)
    if kind in DECODERS:
        tokens = _greedy(model, ids[:2], mask[:2])[0]
        with peft_kernels.use_backend("reference"):
            assert torch.equal(tokens, _greedy(model, ids[:2], mask[:2])[0])
    bf16 = apply(make(kind), "prefix_tuning").cuda().to(torch.bfloat16)
    bf16.peft_kernels_prefix.float()
    bf16.peft_kernels_prefix.load_state_dict(model.peft_kernels_prefix.state_dict())
    with torch.no_grad():
        logits = bf16(input_ids=ids, attention_mask=mask).logits.float()
        get_prefix_state(bf16).mode = "explicit"  # eager bf16 math: SDPA over the concatenation
        eager = bf16(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool() if kind in DECODERS else slice(None)
    assert_within_eager_error(logits[real], eager[real], fused[0][real], name="bf16 logits")


# --------------------------------------------------------------------------------------------------
# Drop-in parity with HF peft: patch_peft_prefix_model, peft checkpoints, failed loads, architectures
# --------------------------------------------------------------------------------------------------
PEFT_KINDS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2"]


def make_arch(kind, seed=0, **overrides):
    """Tiny decoders of every architecture peft and the patch both prefix-tune (GQA where the family has it)."""
    t = transformers
    if kind in ("llama", "mistral", "qwen2", "gpt2"):
        return make(kind, seed, **overrides)
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.1)
    config_cls, model_cls, extra = {
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, {"head_dim": 8}),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {}),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, {"head_dim": 8}),  # soft-capped logits, sliding layers
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, {"head_dim": 8}),  # sliding layers
    }[kind]
    return model_cls(config_cls(**common, **{**extra, **overrides})).eval()


def peft_prefix_model(kind, projection, seed=0):
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=24)
    model = peft.get_peft_model(make_arch(kind, seed), config).eval()
    with torch.no_grad():  # a trained-looking prefix (peft's init is small)
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return model


def _peft_step(model, ids, mask, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def _greedy_by_forward(model, ids, mask, steps):
    """Greedy decoding by full forwards (positions as generate() assigns them: from the attention mask). peft's own
    generate() is not the oracle: with transformers 5 its prefill builds the causal mask without the cached prefix
    (a [L, L] mask over P + L keys, top-left), so it disagrees with peft's forward on the same tokens."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("projection", [True, False], ids=["prefix_tuning", "p_tuning_v2"])
@pytest.mark.parametrize("kind", PEFT_KINDS)
def test_patch_peft_prefix_model_matches_peft(kind, projection):
    """Same logits, loss and prompt-encoder gradients as peft's own forward (positions as peft assigns them), same
    greedy tokens as decoding with peft's forward; unpatching gives peft's own path back."""
    from peft_kernels.patch.prefix import patch_peft_prefix_model, unpatch_peft_prefix_model

    model = peft_prefix_model(kind, projection)
    ids, mask, labels = inputs("llama")
    theirs = _peft_step(model, ids, mask, labels)
    want_tokens = _greedy_by_forward(model, ids[:2], mask[:2], 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert patch_peft_prefix_model(model) is model
    ours = _peft_step(model, ids, mask, labels)
    real = mask.bool()
    assert_close(ours[0][real], theirs[0][real], name="logits", **TOL)
    assert_close(ours[1], theirs[1], name="loss", **TOL)
    assert ours[2].keys() == theirs[2].keys() and all(n.startswith("prompt_encoder.") for n in ours[2])
    for n, g in theirs[2].items():
        assert_close(ours[2][n], g, name=f"grad {n}", **TOL)
    got = model.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=4, min_new_tokens=4,
                         do_sample=False)
    assert torch.equal(got, want_tokens)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing of peft's was replaced
    unpatch_peft_prefix_model(model)
    assert_close(_peft_step(model, ids, mask, labels)[0], theirs[0], name="logits after unpatch", rtol=0, atol=0)


def test_patch_peft_prefix_model_position_option_and_errors():
    from peft_kernels.patch.prefix import patch_peft_prefix_model

    model = peft_prefix_model("llama", False)
    ids, mask, labels = inputs("llama")
    theirs = _peft_step(model, ids, mask, labels)
    patch_peft_prefix_model(model, positions="model")  # the model's own positions: not peft's outputs
    ours = _peft_step(model, ids, mask, labels)
    assert not torch.allclose(ours[0], theirs[0], atol=1e-3)
    # ... but exactly peft's outputs once the caller shifts the positions by P itself
    pos = torch.arange(L)[None].expand(B, -1)
    shifted = model(input_ids=ids, attention_mask=mask, position_ids=pos + P).logits.detach()
    assert_close(shifted[mask.bool()], theirs[0][mask.bool()], name="logits", **TOL)
    with pytest.raises(ValueError, match="patched already"):
        patch_peft_prefix_model(model)
    with pytest.raises(ValueError, match="positions must be one of"):
        apply_prefix_tuning(make("llama"), num_virtual_tokens=P, positions="shifted")
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(make("llama"), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="LORA, not PREFIX_TUNING"):
        patch_peft_prefix_model(lora)


def test_apply_with_peft_positions_matches_peft():
    """apply_prefix_tuning(positions="peft") with peft's prefix is peft's forward, position ids given or not."""
    model = peft_prefix_model("qwen3", True)
    ids, mask, labels = inputs("llama")
    theirs = _peft_step(model, ids, mask, labels)[0]
    ours = apply_p_tuning_v2(make_arch("qwen3"), prefix=_peft_pairs(model),
                             positions="peft")
    real = mask.bool()
    assert_close(ours(input_ids=ids, attention_mask=mask).logits.detach()[real], theirs[real], name="logits", **TOL)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert_close(ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits.detach()[real], want[real],
                 name="logits with position_ids", **TOL)


def _peft_pairs(peft_model):
    from peft_kernels.patch.prefix import _PeftPromptSource

    with torch.no_grad():
        return [(k.clone(), v.clone()) for k, v in _PeftPromptSource(peft_model, "default")()]


def test_gradient_checkpointing_on_a_patched_peft_model():
    from peft_kernels.patch.prefix import patch_peft_prefix_model

    model = patch_peft_prefix_model(peft_prefix_model("llama", True))
    ids, mask, labels = inputs("llama")
    model.train()
    plain = _peft_step(model, ids, mask, labels)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = _peft_step(model, ids, mask, labels)
    assert_close(ckpt[1], plain[1], name="loss", **TOL)
    for n, g in plain[2].items():
        assert_close(ckpt[2][n], g, name=f"grad {n}", **TOL)


@pytest.mark.parametrize("projection", [True, False])
def test_peft_checkpoint_round_trips(projection, tmp_path):
    """peft save_pretrained -> load_prefix gives peft's outputs (peft's positions); save_prefix(format="peft") ->
    PeftModel.from_pretrained gives ours."""
    peft = pytest.importorskip("peft")
    model = peft_prefix_model("llama", projection)
    ids, mask, _ = inputs("llama")
    real = mask.bool()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "from_peft")
    ours = load_prefix(make("llama"), tmp_path / "from_peft")
    state = get_prefix_state(ours)
    assert state.positions == "peft" and state.method == "p_tuning_v2" and state.train_modules == []
    assert_close(ours(input_ids=ids, attention_mask=mask).logits.detach()[real], theirs[real], name="logits", **TOL)
    mine = load_prefix(make("llama"), tmp_path / "from_peft", positions="model")  # the option overrides
    assert get_prefix_state(mine).positions == "model"

    trained = apply_prefix_tuning(make("llama"), num_virtual_tokens=P, projection=projection, projection_hidden=24,
                                  positions="peft")
    _train_step(trained, "llama")
    with torch.no_grad():
        expected = trained(input_ids=ids, attention_mask=mask).logits
    save_prefix(trained, tmp_path / "to_peft", format="peft")
    cfg = json.loads((tmp_path / "to_peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_virtual_tokens"] == P
    loaded = peft.PeftModel.from_pretrained(make("llama"), tmp_path / "to_peft").eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert_close(got[real], expected[real], name="logits", **TOL)
    again = load_prefix(make("llama"), tmp_path / "to_peft")  # and back
    assert_close(again(input_ids=ids, attention_mask=mask).logits.detach()[real], expected[real], name="logits", **TOL)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.config._attn_implementation,
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, snap):
    sd, impl, flags = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert model.config._attn_implementation == impl
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_failed_load_leaves_the_model_exactly_as_it_was(tmp_path):
    pytest.importorskip("peft")
    src = peft_prefix_model("llama", False)
    src.save_pretrained(tmp_path / "peft_ckpt")
    # a model of another size: the checkpoint's prompt_embeddings do not fit it
    other = make("llama", head_dim=16)
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"adapter_config.json has head_dim=8, the model LlamaForCausalLM has "
                                         r"head_dim=16"):
        load_prefix(other, tmp_path / "peft_ckpt")
    _assert_unchanged(other, snap)
    assert get_prefix_state(other) is None
    # a damaged tensor in our own format: named, nothing applied
    model = apply(make("llama"), "p_tuning_v2")
    save_prefix(model, tmp_path / "ours")
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "ours" / "prefix_model.safetensors"
    tensors = load_file(weights)
    tensors["prefix.embedding.weight"] = tensors["prefix.embedding.weight"][:, :-1].contiguous()
    save_file(tensors, weights)
    fresh = make("llama")
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"prefix_model.safetensors: prefix.embedding.weight has shape"):
        load_prefix(fresh, tmp_path / "ours")
    _assert_unchanged(fresh, snap)
    # into a model that has a prefix: its prefix and flags stay
    patched = apply(make("llama"), "p_tuning_v2")
    snap = _snapshot(patched)
    with pytest.raises(ValueError, match="prefix_model.safetensors"):
        load_prefix(patched, tmp_path / "ours")
    _assert_unchanged(patched, snap)


def test_checkpoint_writes_only_what_its_config_trains(tmp_path):
    """A modules.* entry outside the config's train_modules (here the embedding, with train_modules=[]) is refused,
    not written (it used to overwrite the embedding)."""
    model = apply(make("llama"), "p_tuning_v2", train_modules=[])
    save_prefix(model, tmp_path)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "prefix_model.safetensors"
    tensors = load_file(weights)
    tensors["modules.model.embed_tokens.weight"] = torch.zeros(VOCAB, 32)
    save_file(tensors, weights)
    fresh = make("llama")
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"prefix_model.safetensors: entry 'model.embed_tokens.weight' is not under "
                                         r"the checkpoint's train_modules \[\]"):
        load_prefix(fresh, tmp_path)
    _assert_unchanged(fresh, snap)


def test_config_missing_a_key_gives_a_message(tmp_path):
    model = apply(make("llama"), "p_tuning_v2")
    save_prefix(model, tmp_path)
    cfg_path = tmp_path / "prefix_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["num_virtual_tokens"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"prefix_config.json has no 'num_virtual_tokens' entry"):
        load_prefix(make("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match="has neither prefix_config.json"):
        load_prefix(make("llama"), tmp_path / "nothing")


def test_gemma2_softcap_runs_the_explicit_path_exactly():
    model = peft_prefix_model("gemma2", False)
    ids, mask, labels = inputs("llama")
    theirs = _peft_step(model, ids, mask, labels)
    from peft_kernels.patch.prefix import patch_peft_prefix_model

    patch_peft_prefix_model(model)
    with pytest.warns(UserWarning, match="soft-caps its attention logits"):
        ours = _peft_step(model, ids, mask, labels)
    assert_close(ours[0][mask.bool()], theirs[0][mask.bool()], name="logits", **TOL)


def test_peft_format_refuses_what_peft_would_run_differently(tmp_path):
    """positions='model' (the default) is not what peft runs, and peft cannot prefix-tune an encoder: saving either
    in peft's format would give other outputs (or none) when peft loads it, so it is refused by name."""
    model = apply_prefix_tuning(make("llama"), num_virtual_tokens=P)
    with pytest.raises(ValueError, match=r"save_prefix: format='peft' .* positions='model'"):
        save_prefix(model, tmp_path / "a", format="peft")
    assert not (tmp_path / "a").exists()
    save_prefix(model, tmp_path / "b")  # the own format keeps the convention
    bert = apply_p_tuning_v2(make("bert"), num_virtual_tokens=P)
    with pytest.raises(ValueError, match=r"save_prefix: format='peft' cannot hold a 'bert' prefix"):
        save_prefix(bert, tmp_path / "c", format="peft")


@pytest.mark.parametrize("kw, exc, match", [
    ({"projection_hidden": 0}, ValueError, r"PrefixEncoder: projection_hidden must be a positive int, got 0"),
    ({"hidden_size": 0}, ValueError, r"PrefixEncoder: hidden_size must be a positive int, got 0"),
    ({"projection": "yes"}, TypeError, r"PrefixEncoder: projection must be a bool"),
])
def test_explicit_encoder_sizes_are_never_replaced_by_defaults(kw, exc, match):
    with pytest.raises(exc, match=match):
        apply_prefix_tuning(make("llama"), num_virtual_tokens=P, **{"projection": True, **kw})


def test_patch_peft_prefix_sequence_classifier():
    """A peft SEQ_CLS prefix model of a decoder (peft's own forward refuses it: no past key values there) runs
    patched: the native P-Tuning v2 path with peft's prefix and positions, padding-invariant per row, gradients to
    peft's prompt encoder and score head; patching again is a no-op, unpatching gives peft's forward back."""
    peft = pytest.importorskip("peft")

    torch.manual_seed(0)
    model = make("llama")
    base = transformers.LlamaForSequenceClassification(model.config)
    base.model.load_state_dict(model.model.state_dict())
    reference_base = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    ids, _, _ = inputs("llama")
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding, the pad token id where padded (the classifier pools the last real token)
    ids = ids.masked_fill(mask == 0, model.config.pad_token_id)
    with pytest.raises(ValueError, match="past key values"):
        pm(input_ids=ids, attention_mask=mask)
    peft_kernels.patch_peft_model(pm)
    peft_kernels.patch_peft_model(pm)  # idempotent
    out = pm(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0]))
    reference_base.score.load_state_dict(pm.base_model.score.modules_to_save["default"].state_dict())
    ref = apply_p_tuning_v2(reference_base, prefix=_peft_pairs(pm), positions="peft")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        alone = pm(input_ids=ids[1:2, :-3]).logits
    assert_close(out.logits.detach(), want, name="logits", **TOL)
    assert_close(out.logits.detach()[1:2], alone, name="padded row", **TOL)
    out.loss.backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert any("prompt_encoder" in n for n in grads) and any("score" in n for n in grads)
    peft_kernels.unpatch_peft_model(pm)
    with pytest.raises(ValueError, match="past key values"):
        pm(input_ids=ids, attention_mask=mask)
