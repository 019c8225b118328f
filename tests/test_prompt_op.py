"""soft_prompt_embed: reference backend vs torch.cat([prompt, nn.Embedding(ids)]), autograd, gradcheck,
opcheck, torch.compile, input validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_kernels.ops import soft_prompt_embed, soft_prompt_embed_reference
from peft_kernels.ops.prompt import _soft_prompt_embed_backward_op, _soft_prompt_embed_op
from tests.helpers import assert_close, assert_within_eager_error

OP = "soft_prompt_embed"


def make_inputs(B=3, S=11, V=50, H=16, P=4, batched=False, dtype=torch.float32, pdtype=None,
                id_dtype=torch.int64, train_weight=False):
    ids = torch.randint(0, V, (B, S), dtype=id_dtype)
    weight = torch.randn(V, H, dtype=dtype).requires_grad_(train_weight)
    prompt = torch.randn(*((B,) if batched else ()), P, H, dtype=pdtype or dtype).requires_grad_(True)
    return ids, weight, prompt


def cat_reference(ids, weight, prompt):
    """What users write: an embedding lookup (nn.Embedding's forward), the prompt expanded, torch.cat."""
    tokens = F.embedding(ids.long(), weight)
    p = prompt.to(weight.dtype)
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(ids.shape[0], -1, -1)
    return torch.cat([p, tokens], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_forward_is_exact_cat(dtype, batched, id_dtype):
    ids, weight, prompt = make_inputs(dtype=dtype, batched=batched, id_dtype=id_dtype)
    out = soft_prompt_embed(ids, weight, prompt)
    assert out.dtype == dtype and out.shape == (3, 4 + 11, 16)
    # A gather and a copy: bit-exact against torch.cat and against the float64 reference.
    assert torch.equal(out, cat_reference(ids, weight, prompt))
    assert torch.equal(out, soft_prompt_embed_reference(ids, weight, prompt, upcast=True))


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_prompt_dtype_differs_from_embedding(pdtype):
    """fp32 prompt (master weights) with a bf16 embedding: output bf16, prompt gradient in fp32."""
    ids, weight, prompt = make_inputs(dtype=torch.bfloat16, pdtype=pdtype)
    out = soft_prompt_embed(ids, weight, prompt)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, cat_reference(ids, weight, prompt))
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, prompt, dout)
    assert g.dtype == pdtype
    assert_close(g, dout[:, :4].double().sum(0))  # summed in fp32: exact up to the prompt dtype's rounding


def test_matches_nn_embedding_module():
    emb = nn.Embedding(30, 12)
    prompt = nn.Parameter(torch.randn(5, 12))
    ids = torch.randint(0, 30, (4, 9))
    out = soft_prompt_embed(ids, emb.weight, prompt)
    ref = torch.cat([prompt.unsqueeze(0).expand(4, -1, -1), emb(ids)], dim=1)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    ours = torch.autograd.grad(out, (emb.weight, prompt), dout)
    theirs = torch.autograd.grad(ref, (emb.weight, prompt), dout)
    for g, r in zip(ours, theirs):
        assert_close(g, r)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("train_weight", [False, True])
def test_grads_match_autograd_of_cat(batched, train_weight):
    ids, weight, prompt = make_inputs(batched=batched, train_weight=train_weight, dtype=torch.float64)
    ids[0, :3] = 7  # repeated tokens: the embedding gradient must accumulate them
    out = soft_prompt_embed(ids, weight, prompt)
    ref = cat_reference(ids, weight, prompt)
    dout = torch.randn_like(out)
    out.backward(dout)
    ours = (prompt.grad, weight.grad)
    prompt.grad = weight.grad = None
    ref.backward(dout)
    assert_close(ours[0], prompt.grad, name="dprompt")
    if train_weight:
        assert_close(ours[1], weight.grad, name="dweight")
    else:
        assert ours[1] is None and weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batched", [False, True])
def test_grads_per_dtype(dtype, batched):
    """fp32 close to the float64 math; half types within ~2x eager PyTorch's error (FlashAttention rule)."""
    ids, weight, prompt = make_inputs(B=8, S=123, V=40, H=40, P=5, batched=batched, dtype=dtype,
                                      train_weight=True)
    ids[:, ::3] = 3  # a frequent token: its embedding gradient sums ~330 rows
    out = soft_prompt_embed(ids, weight, prompt)
    dout = torch.randn_like(out)
    g_prompt, g_weight = torch.autograd.grad(out, (prompt, weight), dout)
    e_prompt, e_weight = torch.autograd.grad(cat_reference(ids, weight, prompt), (prompt, weight), dout)
    w64, p64 = weight.detach().double().requires_grad_(True), prompt.detach().double().requires_grad_(True)
    o_prompt, o_weight = torch.autograd.grad(cat_reference(ids, w64, p64), (p64, w64), dout.double())
    assert g_prompt.dtype == dtype and g_weight.dtype == dtype
    if dtype == torch.float32:
        assert_close(g_prompt, o_prompt, name="dprompt")
        assert_close(g_weight, o_weight, name="dweight")
    else:
        assert_within_eager_error(g_prompt, e_prompt, o_prompt, name="dprompt")
        assert_within_eager_error(g_weight, e_weight, o_weight, name="dweight")


def test_p_tuning_encoder_output_gets_gradient():
    """A per-example prompt produced by an encoder (non-leaf): the gradient flows back into the encoder."""
    B, P, H = 2, 3, 8
    encoder = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, H))
    virtual = torch.randn(B, P, H)
    ids, weight, _ = make_inputs(B=B, H=H)
    out = soft_prompt_embed(ids, weight, encoder(virtual))
    out.square().sum().backward()
    ours = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    cat_reference(ids, weight, encoder(virtual)).square().sum().backward()
    for g, p in zip(ours, encoder.parameters()):
        assert_close(g, p.grad)


def test_odd_shapes_and_single_example():
    for B, S, V, H, P in [(1, 1, 3, 1, 1), (5, 123, 97, 40, 7), (2, 0, 5, 4, 3)]:
        ids, weight, prompt = make_inputs(B=B, S=S, V=V, H=H, P=P, dtype=torch.float64, train_weight=True)
        out = soft_prompt_embed(ids, weight, prompt)
        assert torch.equal(out, cat_reference(ids, weight, prompt))
        out.sum().backward()
        assert_close(prompt.grad, torch.full((P, H), float(B), dtype=torch.float64))


def test_non_contiguous_inputs():
    ids = torch.randint(0, 20, (9, 4)).t()  # [4, 9], strided
    weight = torch.randn(6, 20).t()  # [20, 6], strided
    prompt = torch.randn(6, 3).t().requires_grad_(True)  # [3, 6], strided
    assert torch.equal(soft_prompt_embed(ids, weight, prompt), cat_reference(ids, weight, prompt))


# --------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_gradcheck(batched, id_dtype):
    ids, weight, prompt = make_inputs(B=2, S=5, V=4, H=3, P=2, batched=batched, dtype=torch.float64,
                                      id_dtype=id_dtype, train_weight=True)
    assert torch.autograd.gradcheck(lambda w, p: soft_prompt_embed(ids, w, p), (weight, prompt))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("train_weight", [False, True])
def test_opcheck_forward(batched, train_weight):
    ids, weight, prompt = make_inputs(B=2, S=5, V=9, H=4, P=3, batched=batched, train_weight=train_weight)
    torch.library.opcheck(_soft_prompt_embed_op, (ids, weight, prompt, "reference"))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("needs", [[True, True], [False, True], [True, False]])
def test_opcheck_backward(batched, needs):
    B, S, V, H, P = 2, 5, 9, 4, 3
    ids = torch.randint(0, V, (B, S))
    dout = torch.randn(B, P + S, H)
    torch.library.opcheck(_soft_prompt_embed_backward_op,
                          (dout, ids, V, P, batched, torch.float64, "reference", needs))


@pytest.mark.parametrize("batched", [False, True])
def test_torch_compile_fullgraph(batched):
    ids, weight, prompt = make_inputs(batched=batched, train_weight=True)

    def f(ids, weight, prompt):
        return soft_prompt_embed(ids, weight, prompt) * 3.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, out_c = f(ids, weight, prompt), compiled(ids, weight, prompt)
    assert torch.equal(out, out_c)
    dout = torch.randn_like(out)
    for g, gc in zip(torch.autograd.grad(out, (weight, prompt), dout),
                     torch.autograd.grad(out_c, (weight, prompt), dout)):
        assert torch.equal(g, gc)
    # The id range check lives in the op's body, so it holds inside the compiled graph too.
    bad = ids.clone()
    bad[1, 2] = 50
    with pytest.raises(ValueError, match=f"{OP}: input_ids must be in"):
        compiled(bad, weight, prompt)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def _good(**over):
    ids, weight, prompt = make_inputs(B=2, S=5, V=10, H=4, P=3)
    args = dict(input_ids=ids, embedding_weight=weight, prompt_embeds=prompt)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(input_ids=torch.randint(0, 10, (5,))), ValueError, "input_ids must be 2-D"),
    (dict(input_ids=torch.randint(0, 10, (2, 5, 1))), ValueError, "input_ids must be 2-D"),
    (dict(embedding_weight=torch.randn(10)), ValueError, "embedding_weight must be 2-D"),
    (dict(prompt_embeds=torch.randn(4)), ValueError, "prompt_embeds must be 2-D or 3-D"),
    (dict(prompt_embeds=torch.randn(1, 2, 3, 4)), ValueError, "prompt_embeds must be 2-D or 3-D"),
    (dict(prompt_embeds=torch.randn(3, 5)), ValueError, r"prompt_embeds .* expected 4 \(hidden size"),
    (dict(prompt_embeds=torch.randn(3, 3, 4)), ValueError, r"prompt_embeds .* expected 2 \(batch size"),
    (dict(prompt_embeds=torch.randn(0, 4)), ValueError, "prompt_embeds has 0 virtual tokens"),
    (dict(input_ids=torch.randint(0, 10, (2, 5)).float()), TypeError, "input_ids must have dtype in"),
    (dict(input_ids=torch.randint(0, 10, (2, 5), dtype=torch.int16)), TypeError, "input_ids must have dtype"),
    (dict(embedding_weight=torch.randint(0, 3, (10, 4))), TypeError, "embedding_weight must have dtype"),
    (dict(prompt_embeds=torch.ones(3, 4, dtype=torch.bool)), TypeError, "prompt_embeds must have dtype"),
    (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
    (dict(prompt_embeds=None), TypeError, "prompt_embeds must be a torch.Tensor"),
])
def test_validation(over, exc, match):
    with pytest.raises(exc, match=f"{OP}: {match}"):
        soft_prompt_embed(**_good(**over))


@pytest.mark.parametrize("value", [-1, 10, 1000])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_validation_ids_out_of_range(value, id_dtype):
    ids = torch.randint(0, 10, (2, 5), dtype=id_dtype)
    ids[1, 4] = value
    with pytest.raises(ValueError, match=rf"{OP}: input_ids must be in \[0, 10\).*{value}"):
        soft_prompt_embed(**_good(input_ids=ids))
