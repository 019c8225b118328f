"""soft_prompt_embed: reference backend vs torch.cat([prompt, nn.Embedding(ids)]) and vs a literal insertion
(template positions), autograd, gradcheck, opcheck, torch.compile, input validation. The kernels: the generated
backend tests (tests/cases/soft_prompt_embed.py) and tests/triton/test_prompt_triton.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_kernels
from peft_kernels.ops import soft_prompt_embed, soft_prompt_embed_reference
from peft_kernels.ops.prompt import FAMILY, PromptInputs, prompt_maps
from tests.helpers import INTERPRET, assert_close, assert_within_eager_error

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
@pytest.mark.parametrize("template", [False, True])
def test_opcheck_forward(batched, train_weight, template):
    ids, weight, prompt = make_inputs(B=2, S=5, V=9, H=4, P=3, batched=batched, train_weight=train_weight)
    maps = prompt_maps(torch.tensor([0, 2, 5]), 5, 3) if template else (None, None)
    fwd, _ = FAMILY.custom_ops
    torch.library.opcheck(fwd, (ids, weight, prompt, *maps, "reference", "reference"))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("needs", [[True, True], [False, True], [True, False]])
@pytest.mark.parametrize("template", [False, True])
def test_opcheck_backward(batched, needs, template):
    B, S, V, H, P = 2, 5, 9, 4, 3
    ids = torch.randint(0, V, (B, S))
    dout = torch.randn(B, P + S, H)
    maps = prompt_maps(torch.tensor([[1, 1, 4], [0, 5, 5]]), S, P) if template else (None, None)
    _, bwd = FAMILY.custom_ops
    torch.library.opcheck(bwd, (dout, ids, *maps, V, P, batched, torch.float64, needs, "reference"))


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


# --------------------------------------------------------------------------------------------------
# Template positions (P-tuning): virtual tokens among the tokens
# --------------------------------------------------------------------------------------------------
def insert_literally(ids, weight, prompt, positions):
    """The definition, one example at a time: token rows with prompt rows spliced in before positions[p]."""
    B = ids.shape[0]
    pos = torch.as_tensor(positions)
    pos = pos.expand(B, -1) if pos.dim() == 1 else pos
    rows = []
    for b in range(B):
        seq = [weight[i] for i in ids[b].tolist()]
        pr = prompt[b] if prompt.dim() == 3 else prompt
        for p in reversed(range(pr.shape[0])):  # back to front: earlier indices stay valid
            seq.insert(int(pos[b, p]), pr[p].to(weight.dtype))
        rows.append(torch.stack(seq))
    return torch.stack(rows)


@pytest.mark.parametrize("positions", [[0, 0, 0], [0, 4, 9], [9, 9, 9], [2, 2, 7],
                                       [[0, 1, 2], [9, 9, 9], [3, 3, 3], [1, 5, 6]]])
@pytest.mark.parametrize("batched", [False, True])
def test_template_positions_forward_and_grad(positions, batched):
    ids, weight, prompt = make_inputs(B=4, S=9, V=30, H=6, P=3, batched=batched, dtype=torch.float64,
                                      train_weight=True)
    out = soft_prompt_embed(ids, weight, prompt, positions)
    ref = insert_literally(ids, weight, prompt, positions)
    assert torch.equal(out, ref)
    assert torch.equal(out, soft_prompt_embed_reference(ids, weight, prompt, positions))
    dout = torch.randn_like(out)
    ours = torch.autograd.grad(out, (prompt, weight), dout)
    theirs = torch.autograd.grad(ref, (prompt, weight), dout)
    for g, r, name in zip(ours, theirs, ("dprompt", "dweight")):
        assert_close(g, r, name=name)


def test_prefix_positions_equal_no_positions():
    ids, weight, prompt = make_inputs(B=3, S=6, V=20, H=5, P=4)
    assert torch.equal(soft_prompt_embed(ids, weight, prompt, [0, 0, 0, 0]), soft_prompt_embed(ids, weight, prompt))
    tail = soft_prompt_embed(ids, weight, prompt, torch.tensor([6, 6, 6, 6]))
    assert torch.equal(tail, torch.cat([F.embedding(ids, weight), prompt.expand(3, -1, -1)], dim=1))


def test_maps_argument_matches_positions():
    ids, weight, prompt = make_inputs(B=2, S=7, V=20, H=5, P=3)
    maps = prompt_maps(torch.tensor([1, 4, 4]), 7, 3)
    expected = soft_prompt_embed(ids, weight, prompt, [1, 4, 4])
    assert torch.equal(soft_prompt_embed(ids, weight, prompt, maps=maps), expected)


def test_device_positions_are_clamped_never_out_of_bounds():
    """Device-side positions are not checked (no sync): any value maps to a valid layout (clamped, monotone)."""
    S, P = 5, 3
    slots, vpos = prompt_maps(torch.tensor([[-4, 99, 2], [3, 1, 0]]), S, P)
    for b in range(2):
        virt = slots[b] < 0
        assert int(virt.sum()) == P and sorted(slots[b][~virt].tolist()) == list(range(S))
        assert sorted((-slots[b][virt] - 1).tolist()) == list(range(P))
        assert torch.equal(vpos[b], virt.nonzero().flatten().int())


def test_frozen_vocabulary_gets_no_gradient_buffer():
    ids, weight, prompt = make_inputs(B=3, S=8, V=40, H=16, P=4)
    out = soft_prompt_embed(ids, weight, prompt, [0, 2, 5, 8])
    out.sum().backward()
    assert weight.grad is None and prompt.grad is not None
    # The backward, called directly with needs = (vocab, prompt) = (False, True), returns no vocabulary gradient.
    slots, vpos = prompt_maps(torch.tensor([0, 2, 5, 8]), 8, 4)
    dw, dp = FAMILY.backward_backends["reference"].run(torch.randn(3, 12, 16), ids, slots, vpos, 40, 4, False,
                                                        torch.float32, [False, True])
    assert dw is None and dp.shape == (4, 16)


def test_prompt_grad_is_deterministic():
    ids, weight, prompt = make_inputs(B=7, S=20, V=30, H=24, P=5, dtype=torch.float16, pdtype=torch.float32)
    out = soft_prompt_embed(ids, weight, prompt)
    dout = torch.randn_like(out)
    g1, g2 = (torch.autograd.grad(out, prompt, dout, retain_graph=True)[0] for _ in range(2))
    assert torch.equal(g1, g2)
    assert_close(g1, dout[:, :5].double().sum(0), dtype=torch.float32)


def test_ids_memo_rechecks_a_changed_tensor():
    ids, weight, prompt = make_inputs(B=2, S=5, V=10, H=4, P=3)
    soft_prompt_embed(ids, weight, prompt)
    ids[0, 0] = 10  # same tensor object, new version: checked again
    with pytest.raises(ValueError, match=f"{OP}: input_ids must be in"):
        soft_prompt_embed(ids, weight, prompt)


@pytest.mark.parametrize("positions, exc, match", [
    ([0, 1], ValueError, r"positions has shape \(2,\), expected \[3\] or \[2, 3\]"),
    ([[0, 1, 2]] * 3, ValueError, r"positions has shape \(3, 3\)"),
    ([0, 6, 6], ValueError, r"positions must be insertion indices in \[0, S\] = \[0, 5\]"),
    ([-1, 0, 0], ValueError, r"positions must be insertion indices in \[0, S\]"),
    ([3, 1, 4], ValueError, "positions must be non-decreasing"),
    ([0.5, 1, 2], TypeError, "positions must be ints"),
    (torch.zeros(3), TypeError, "positions must have dtype"),
])
def test_validation_positions(positions, exc, match):
    with pytest.raises(exc, match=f"{OP}: {match}"):
        soft_prompt_embed(**_good(), positions=positions)


def test_public_function_is_the_family():
    ids, weight, prompt = make_inputs(B=2, S=5, V=10, H=4, P=3)
    direct = FAMILY(PromptInputs(ids, weight, prompt.detach(), None, None))
    assert torch.equal(direct, soft_prompt_embed(ids, weight, prompt))


# --------------------------------------------------------------------------------------------------
# The CUDA C++ kernels (csrc/cuda/prompt.cu): GPU only
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, pdtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("H", [64, 33])  # 16-byte vector rows, and the element-by-element path
@pytest.mark.parametrize("positions", [None, [0, 3, 3, 11], "per_example"])
@pytest.mark.parametrize("batched", [False, True])
def test_cuda_kernels_match_reference(dtype, pdtype, H, positions, batched):
    from peft_kernels.ops.prompt import FAMILY as F_

    if F_.why_not_reason("cuda", F_.Inputs(torch.zeros(1, 1, dtype=torch.long, device="cuda"),
                                           torch.empty(2, 2, device="cuda"), torch.empty(1, 2, device="cuda"),
                                           None, None)) is not None:
        pytest.skip("the cuda backend is not built")
    B, S, V, P = 3, 11, 97, 4
    ids = torch.randint(0, V, (B, S), device="cuda")
    ids[0, 0], ids[-1, -1] = 0, V - 1
    weight = torch.randn(V, H, device="cuda").to(dtype)
    prompt = torch.randn(*((B,) if batched else ()), P, H, device="cuda").to(pdtype).requires_grad_(True)
    if positions == "per_example":
        positions = torch.tensor([[0, 0, 1, 11], [2, 5, 5, 9], [11, 11, 11, 11]], device="cuda")
    with peft_kernels.use_backend("cuda", strict=True):
        out = soft_prompt_embed(ids, weight, prompt, positions)
    ref = soft_prompt_embed_reference(ids, weight, prompt, positions, upcast=True)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    with peft_kernels.use_backend("cuda", strict=True):
        (g,) = torch.autograd.grad(soft_prompt_embed(ids, weight, prompt, positions), prompt, dout)
    rows = (torch.arange(P, device="cuda") if positions is None
            else prompt_maps(torch.as_tensor(positions, device="cuda"), S, P)[1].long()).expand(B, P)
    picked = torch.gather(dout.double(), 1, rows[..., None].expand(B, P, H))
    assert g.dtype == pdtype
    assert_close(g, picked if batched else picked.sum(0), dtype=pdtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_maps_are_memory_safe(backend):
    """Maps are trusted (built by prompt_maps) but never read or write out of bounds, whatever they hold."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    ids, weight, prompt = make_inputs(B=2, S=5, V=10, H=4, P=3)
    slots = torch.tensor([[-9, 7, 0, 1, -1, 2, 3, 100]], dtype=torch.int32)
    vpos = torch.tensor([[-5, 3, 99]], dtype=torch.int32)
    with peft_kernels.use_backend(backend, strict=True):
        out = soft_prompt_embed(ids, weight, prompt, maps=(slots, vpos))
        (g,) = torch.autograd.grad(out, prompt, torch.ones_like(out))
    assert out.shape == (2, 8, 4) and torch.isfinite(out).all() and torch.isfinite(g).all()


def test_maps_validation():
    ids, weight, prompt = make_inputs(B=2, S=5, V=10, H=4, P=3)
    slots, vpos = prompt_maps(torch.tensor([0, 1, 5]), 5, 3)
    with pytest.raises(TypeError, match=r"maps\[slots\] must have dtype in \(int32\)"):
        soft_prompt_embed(ids, weight, prompt, maps=(slots.long(), vpos))
    with pytest.raises(ValueError, match="do not fit B=2, S=5, P=3"):
        soft_prompt_embed(ids, weight, prompt, maps=(slots[:, :-1], vpos))
    with pytest.raises(ValueError, match="pass positions or maps, not both"):
        soft_prompt_embed(ids, weight, prompt, [0, 1, 5], maps=(slots, vpos))
