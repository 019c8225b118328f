"""Triton kernels for the soft-prompt embedding (prompt tuning, P-tuning).

Forward, one pass: each program owns BLOCK_T output rows of one example and, for every row, reads either the
token's embedding row or the virtual token's prompt row (both loads are masked per row, so each output row is
read once and written once) and writes it into ``out[b, t]``. The row's source comes from ``slots[b, t]``
(``s >= 0``: token s of the example; ``-(p + 1)``: virtual token p) or, for a plain prefix, from ``t`` itself
(``t < P``: virtual token t, else token ``t - P``), so the prefix case reads no map at all.

Backward, prompt only: ``dprompt[p] = sum_b dout[b, vpos[b, p]]`` (shared prompt, summed in fp32 in batch
order: deterministic, no atomics) or ``dprompt[b, p] = dout[b, vpos[b, p]]`` (per-example prompt). The frozen
vocabulary gets no gradient buffer (a trainable one is the op's business, not these kernels').

Ids outside [0, V) were refused before the launch; the kernels still mask them (the row is written as zeros), and
clamp every map entry into range, so that no input can read or write out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_kernels import _config

_INTERPRET = _config.SETTINGS.triton_interpret
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _soft_prompt_fwd_kernel(
    ids_ptr, w_ptr, prompt_ptr, slots_ptr, out_ptr,
    S, T, P, H, V,
    stride_ib, stride_is, stride_wv, stride_pb, stride_pp, stride_sb, stride_ob, stride_ot,
    HAS_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = t < T
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + b * stride_sb + t, mask=t_in, other=0).to(tl.int64)
    else:
        slot = tl.where(t < P, -(t + 1), t - P).to(tl.int64)
    is_tok = slot >= 0
    s = tl.minimum(tl.maximum(slot, 0), S - 1)  # clamped: a bad map can never index out of bounds
    p = tl.minimum(tl.maximum(-slot - 1, 0), P - 1)
    tok = tl.load(ids_ptr + b * stride_ib + s * stride_is, mask=t_in & is_tok, other=0).to(tl.int64)
    tok_ok = t_in & is_tok & (tok >= 0) & (tok < V)
    virt = t_in & (slot < 0)
    w_rows = w_ptr + tok[:, None] * stride_wv
    p_rows = prompt_ptr + b * stride_pb + p[:, None] * stride_pp
    o_rows = out_ptr + b * stride_ob + t.to(tl.int64)[:, None] * stride_ot
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_in = (h < H)[None, :]
        w = tl.load(w_rows + h[None, :], mask=tok_ok[:, None] & h_in, other=0.0)
        pv = tl.load(p_rows + h[None, :], mask=virt[:, None] & h_in, other=0.0)
        val = tl.where(is_tok[:, None], w, pv.to(w.dtype))
        tl.store(o_rows + h[None, :], val.to(out_ptr.dtype.element_ty), mask=t_in[:, None] & h_in)


@triton.jit
def _soft_prompt_bwd_kernel(
    dout_ptr, vpos_ptr, dprompt_ptr,
    B, T, P, H,
    stride_ob, stride_ot, stride_vb, stride_db, stride_dp,
    HAS_VPOS: tl.constexpr, BATCHED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (p < P)[:, None] & (h < H)[None, :]
    if BATCHED:
        b = tl.program_id(2).to(tl.int64)
        if HAS_VPOS:
            t = tl.load(vpos_ptr + b * stride_vb + p, mask=p < P, other=0).to(tl.int64)
            t = tl.minimum(tl.maximum(t, 0), T - 1)
        else:
            t = p.to(tl.int64)
        g = tl.load(dout_ptr + b * stride_ob + t[:, None] * stride_ot + h[None, :], mask=mask, other=0.0)
        dst = dprompt_ptr + b * stride_db + p.to(tl.int64)[:, None] * stride_dp + h[None, :]
        tl.store(dst, g.to(dprompt_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        dout_b, vpos_b = dout_ptr, vpos_ptr  # advanced per example: pointer arithmetic is 64-bit
        for _ in range(0, B):
            if HAS_VPOS:
                t = tl.load(vpos_b + p, mask=p < P, other=0).to(tl.int64)
                t = tl.minimum(tl.maximum(t, 0), T - 1)
            else:
                t = p.to(tl.int64)
            g = tl.load(dout_b + t[:, None] * stride_ot + h[None, :], mask=mask, other=0.0)
            acc += g.to(tl.float32)
            dout_b += stride_ob
            vpos_b += stride_vb
        dst = dprompt_ptr + p.to(tl.int64)[:, None] * stride_dp + h[None, :]
        tl.store(dst, acc.to(dprompt_ptr.dtype.element_ty), mask=mask)


def _gpu_fwd_blocks(H: int) -> tuple[int, int, int]:
    # 8 rows x up to 1024 columns per loop step over 8 warps: 32 elements per thread per load (16-byte vectors for
    # 16-bit types), ~16 KiB in flight per program.
    return 8, min(triton.next_power_of_2(H), 1024), 8


def _gpu_bwd_blocks(H: int) -> tuple[int, int, int]:
    return 8, min(triton.next_power_of_2(H), 256), 4


def _fwd_blocks(H: int) -> tuple[int, int, int]:
    return _config.interpret_blocks("prompt_fwd", (4, 32)) + (1,) if _INTERPRET else _gpu_fwd_blocks(H)


def _bwd_blocks(H: int) -> tuple[int, int, int]:
    return _config.interpret_blocks("prompt_bwd", (4, 32)) + (1,) if _INTERPRET else _gpu_bwd_blocks(H)


def soft_prompt_forward(input_ids, embedding_weight, prompt_embeds, slots):
    """out [B, T, H] in embedding_weight's dtype; T = P + S. ``slots``: int32 [1 or B, T] or None (prefix)."""
    B, S = input_ids.shape
    V, H = embedding_weight.shape
    P = prompt_embeds.shape[-2]
    T = P + S
    out = embedding_weight.new_empty(B, T, H)
    if _config.poison_outputs():
        out.fill_(float("nan"))
    if out.numel() == 0:
        return out
    w = embedding_weight if embedding_weight.stride(1) == 1 else embedding_weight.contiguous()
    pr = prompt_embeds if prompt_embeds.stride(-1) == 1 else prompt_embeds.contiguous()
    stride_pb = pr.stride(0) if pr.dim() == 3 else 0
    if slots is not None:
        stride_sb = slots.stride(0) if slots.shape[0] > 1 else 0
        slots_arg = slots
    else:
        stride_sb, slots_arg = 0, input_ids
    block_t, block_h, warps = _fwd_blocks(H)
    grid = (triton.cdiv(T, block_t), B)
    _soft_prompt_fwd_kernel[grid](
        input_ids, w, pr, slots_arg, out,
        S, T, P, H, V,
        input_ids.stride(0), input_ids.stride(1), w.stride(0), stride_pb, pr.stride(-2), stride_sb,
        out.stride(0), out.stride(1),
        HAS_SLOTS=slots is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=warps,
    )
    return out


def soft_prompt_backward_prompt(dout, vpos, num_prompt: int, prompt_batched: bool, prompt_dtype):
    """dprompt [P, H] (summed over the batch in fp32) or [B, P, H]; ``vpos``: int32 [1 or B, P] or None."""
    B, T, H = dout.shape
    P = num_prompt
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    shape = (B, P, H) if prompt_batched else (P, H)
    dprompt = torch.empty(shape, device=dout.device, dtype=prompt_dtype)
    if _config.poison_outputs():
        dprompt.fill_(float("nan"))
    if dprompt.numel() == 0:
        return dprompt.zero_()
    stride_vb = 0 if vpos is None or vpos.shape[0] == 1 else vpos.stride(0)
    block_p, block_h, warps = _bwd_blocks(H)
    grid = (triton.cdiv(P, block_p), triton.cdiv(H, block_h), B if prompt_batched else 1)
    _soft_prompt_bwd_kernel[grid](
        dout, vpos if vpos is not None else dout, dprompt,
        B, T, P, H,
        dout.stride(0), dout.stride(1), stride_vb, dprompt.stride(0) if prompt_batched else 0, dprompt.stride(-2),
        HAS_VPOS=vpos is not None, BATCHED=prompt_batched, BLOCK_P=block_p, BLOCK_H=block_h, num_warps=warps,
    )
    return dprompt


def compile_variants(quick: bool = False) -> list:
    """Both kernels at the launchers' GPU blocks for the benchmark shape (H = 2048): bf16/fp16/fp32 embeddings, an
    fp32 master prompt or one in the embedding's dtype, int64/int32 ids, prefix or template slots, shared or
    per-example prompt gradients. Memory-bound copies: every variant is a "stream". quick (CI): bf16 only."""
    from ._compile_check import Variant

    H = 2048
    out = []
    for dt in ("bf16",) if quick else ("bf16", "fp16", "fp32"):
        block_t, block_h, warps = _gpu_fwd_blocks(H)
        for pdt in dict.fromkeys(("fp32", dt)):
            for ids_t in ("i64",) if quick else ("i64", "i32"):
                for has_slots in (False, True):
                    out.append(Variant(
                        name=f"prompt.fwd.{'slots' if has_slots else 'prefix'}.{dt}.p{pdt}.{ids_t}."
                             f"{block_t}x{block_h}w{warps}",
                        kernel=_soft_prompt_fwd_kernel,
                        signature={"ids_ptr": f"*{ids_t}", "w_ptr": f"*{dt}", "prompt_ptr": f"*{pdt}",
                                   "slots_ptr": "*i32", "out_ptr": f"*{dt}", "S": "i32", "T": "i32", "P": "i32",
                                   "H": "i32", "V": "i32", "stride_ib": "i32", "stride_is": "i32", "stride_wv": "i32",
                                   "stride_pb": "i32", "stride_pp": "i32", "stride_sb": "i32", "stride_ob": "i32",
                                   "stride_ot": "i32"},
                        constexprs=dict(HAS_SLOTS=has_slots, BLOCK_T=block_t, BLOCK_H=block_h),
                        num_warps=warps, num_stages=1,
                        divisible=("ids_ptr", "w_ptr", "prompt_ptr", "slots_ptr", "out_ptr", "H", "stride_wv",
                                   "stride_pp", "stride_ob", "stride_ot"),
                    ))  # fmt: skip
            block_p, block_hb, warps_b = _gpu_bwd_blocks(H)
            for has_vpos in (False, True):
                for batched in (False, True):
                    out.append(Variant(
                        name=f"prompt.bwd.{'vpos' if has_vpos else 'prefix'}.{'batched' if batched else 'shared'}."
                             f"{dt}.p{pdt}.{block_p}x{block_hb}w{warps_b}",
                        kernel=_soft_prompt_bwd_kernel,
                        signature={"dout_ptr": f"*{dt}", "vpos_ptr": "*i32", "dprompt_ptr": f"*{pdt}", "B": "i32",
                                   "T": "i32", "P": "i32", "H": "i32", "stride_ob": "i32", "stride_ot": "i32",
                                   "stride_vb": "i32", "stride_db": "i32", "stride_dp": "i32"},
                        constexprs=dict(HAS_VPOS=has_vpos, BATCHED=batched, BLOCK_P=block_p, BLOCK_H=block_hb),
                        num_warps=warps_b, num_stages=1,
                        divisible=("dout_ptr", "vpos_ptr", "dprompt_ptr", "H", "stride_ob", "stride_ot", "stride_dp"),
                    ))  # fmt: skip
    return out
