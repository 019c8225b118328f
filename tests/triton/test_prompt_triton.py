"""The soft-prompt Triton kernels (peft_kernels/triton/prompt.py) against the reference: ids at the vocabulary's
edges, P = 1 and 32, B = 1 and odd, shared and per-example prompts, template positions, block tails, NaN-poisoned
outputs; and the public op with the triton backend forced (autograd, bad ids)."""

import pytest
import torch

from tests.helpers import assert_close, triton_device

pytestmark = pytest.mark.triton
DEV = triton_device()

import peft_kernels  # noqa: E402
from peft_kernels import _config  # noqa: E402
from peft_kernels.ops.prompt import prompt_maps, soft_prompt_embed, soft_prompt_embed_reference  # noqa: E402
from peft_kernels.triton import prompt as tk  # noqa: E402
from tests.cases.soft_prompt_embed import make_ids  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
SHAPES = [  # B, S, V, H, P
    (1, 1, 5, 3, 1),
    (3, 13, 97, 40, 32),
    (5, 7, 64, 33, 1),
    (1, 20, 11, 70, 5),
]


def _inputs(B, S, V, H, P, dtype, batched, prompt_dtype=None):
    ids = make_ids(B, S, V).to(DEV)
    weight = torch.randn(V, H, device=DEV).to(dtype)
    prompt = torch.randn(*((B,) if batched else ()), P, H, device=DEV).to(prompt_dtype or dtype)
    return ids, weight, prompt


def _positions(B, S, P, kind):
    if kind is None:
        return None
    if kind == "shared":
        return torch.linspace(0, S, P).long().to(DEV)
    g = torch.Generator().manual_seed(B * 100 + S)
    return torch.randint(0, S + 1, (B, P), generator=g).sort(dim=1).values.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("kind", [None, "shared", "per_example"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}_S{s[1]}_V{s[2]}_H{s[3]}_P{s[4]}" for s in SHAPES])
def test_forward_kernel_is_exact(shape, kind, batched, dtype):
    B, S, V, H, P = shape
    ids, weight, prompt = _inputs(B, S, V, H, P, dtype, batched)
    positions = _positions(B, S, P, kind)
    slots = None if positions is None else prompt_maps(positions, S, P)[0]
    with _config.poison():
        out = tk.soft_prompt_forward(ids, weight, prompt, slots)
    # A gather and a copy: bit-exact against the float64 reference rounded to the dtype.
    assert torch.equal(out, soft_prompt_embed_reference(ids, weight, prompt, positions, upcast=True))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("kind", [None, "shared", "per_example"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}_S{s[1]}_V{s[2]}_H{s[3]}_P{s[4]}" for s in SHAPES])
def test_backward_kernel_matches_fp64(shape, kind, batched):
    B, S, V, H, P = shape
    dout = torch.randn(B, P + S, H, device=DEV, dtype=torch.float16)
    positions = _positions(B, S, P, kind)
    vpos = None if positions is None else prompt_maps(positions, S, P)[1]
    with _config.poison():
        dp = tk.soft_prompt_backward_prompt(dout, vpos, P, batched, torch.float32)
    rows = torch.arange(P, device=DEV).expand(B, P) if vpos is None else vpos.long().expand(B, P)
    picked = torch.gather(dout.double(), 1, rows[..., None].expand(B, P, H))
    expected = picked if batched else picked.sum(0)
    assert dp.dtype == torch.float32
    assert_close(dp, expected, name="dprompt")  # fp32 accumulation of fp16 values: fp32-exact


def test_block_tails():
    """Blocks smaller than the shapes (several T blocks, an H loop with a ragged tail)."""
    B, S, V, H, P = 3, 10, 17, 37, 6
    ids, weight, prompt = _inputs(B, S, V, H, P, torch.float32, batched=False)
    positions = torch.tensor([0, 1, 5, 5, 9, 10], device=DEV)
    slots, vpos = prompt_maps(positions, S, P)
    with _config.override_interpret_blocks(prompt_fwd=(4, 16), prompt_bwd=(4, 16)), _config.poison():
        out = tk.soft_prompt_forward(ids, weight, prompt, slots)
        dout = torch.randn_like(out)
        dp = tk.soft_prompt_backward_prompt(dout, vpos, P, False, torch.float32)
    assert torch.equal(out, soft_prompt_embed_reference(ids, weight, prompt, positions))
    assert_close(dp, torch.gather(dout.double(), 1, vpos.long().expand(B, P)[..., None].expand(B, P, H)).sum(0))


def test_fp32_master_prompt_with_half_embeddings():
    B, S, V, H, P = 3, 6, 20, 24, 4
    ids, weight, prompt = _inputs(B, S, V, H, P, torch.float16, batched=False, prompt_dtype=torch.float32)
    out = tk.soft_prompt_forward(ids, weight, prompt, None)
    assert out.dtype == torch.float16
    assert torch.equal(out, soft_prompt_embed_reference(ids, weight, prompt))


def test_kernel_masks_out_of_range_ids():
    """The public op refuses them; the kernel itself never reads out of bounds (rows of zeros)."""
    ids, weight, prompt = _inputs(2, 5, 10, 8, 2, torch.float32, batched=False)
    ids[0, 1], ids[1, 4] = -3, 10
    out = tk.soft_prompt_forward(ids, weight, prompt, None)
    assert torch.equal(out[0, 3], torch.zeros(8, device=DEV)) and torch.equal(out[1, 6], torch.zeros(8, device=DEV))
    assert torch.equal(out[0, 2], weight[ids[0, 0]])


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("positions", [None, [0, 3, 3, 8]])
def test_public_op_triton_autograd(batched, positions):
    B, S, V, H, P = 3, 8, 30, 20, 4
    ids, weight, prompt = _inputs(B, S, V, H, P, torch.float32, batched)
    weight.requires_grad_(True)
    prompt.requires_grad_(True)
    with peft_kernels.use_backend("triton", strict=True):
        out = soft_prompt_embed(ids, weight, prompt, positions)
    ref = soft_prompt_embed_reference(ids, weight, prompt, positions)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    ours = torch.autograd.grad(out, (prompt, weight), dout)
    theirs = torch.autograd.grad(ref, (prompt, weight), dout)
    for g, r, name in zip(ours, theirs, ("dprompt", "dweight")):
        assert_close(g, r, name=name)


def test_public_op_triton_bad_ids_raise():
    ids, weight, prompt = _inputs(2, 5, 10, 8, 2, torch.float32, batched=False)
    ids[1, 2] = 10
    with peft_kernels.use_backend("triton", strict=True):
        with pytest.raises(ValueError, match=r"input_ids must be in \[0, 10\)"):
            soft_prompt_embed(ids, weight, prompt)
