"""Fake (meta) kernels for the native ops declared in csrc/bindings.cpp, so they can be traced by
torch.compile and checked with torch.library.opcheck when called directly (the public ops wrap them)."""

from __future__ import annotations

import torch

from peft_kernels import _backends


def _register() -> None:
    if not _backends.native_status()[0]:
        return
    lib = "peft_kernels::"

    @torch.library.register_fake(lib + "philox_dropout")
    def _(x, p, seed):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "philox_dropout_add_")
    def _(out, src, p, seed):
        return None

    @torch.library.register_fake(lib + "column_sum")
    def _(x, out_dtype=None):
        return x.new_empty(x.shape[1], dtype=out_dtype or x.dtype)

    @torch.library.register_fake(lib + "lora_linear_fwd")
    def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])

    @torch.library.register_fake(lib + "bias_only_linear_fwd")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    def _bias_only_bwd_fake(dy, weight, needs, db_dtype=None):
        dx = dy.new_empty(dy.shape[0], weight.shape[1]) if needs[0] else None
        db = dy.new_empty(weight.shape[0], dtype=db_dtype or dy.dtype) if needs[1] else None
        return dx, db

    torch.library.register_fake(lib + "bias_only_linear_bwd", _bias_only_bwd_fake)
    if hasattr(torch.ops.peft_kernels, "bias_only_linear_bwd_cuda") and torch._C._dispatch_has_kernel_for_dispatch_key(
        lib + "bias_only_linear_bwd_cuda", "CUDA"
    ):
        torch.library.register_fake(lib + "bias_only_linear_bwd_cuda", _bias_only_bwd_fake)

    if hasattr(torch.ops.peft_kernels, "prefix_merge_fwd_cuda"):  # absent from an extension built before it

        @torch.library.register_fake(lib + "prefix_merge_fwd_cuda")
        def _(q, prefix_k, prefix_v, out, lse_c, scale):
            return q.new_empty(q.shape[:-1], dtype=torch.float32)

        @torch.library.register_fake(lib + "prefix_merge_bwd_cuda")
        def _(dout, q, prefix_k, prefix_v, out, lse, dq, scale):
            return prefix_k.new_empty(prefix_k.shape, dtype=torch.float32), prefix_v.new_empty(
                prefix_v.shape, dtype=torch.float32)

    if hasattr(torch.ops.peft_kernels, "soft_prompt_embed_fwd_cuda"):  # absent from an extension built before it

        @torch.library.register_fake(lib + "soft_prompt_embed_fwd_cuda")
        def _(input_ids, weight, prompt, slots):
            return weight.new_empty(input_ids.shape[0], prompt.shape[-2] + input_ids.shape[1], weight.shape[1])

        @torch.library.register_fake(lib + "soft_prompt_embed_bwd_cuda")
        def _(dout, vpos, num_prompt, batched, prompt_dtype):
            B, _, H = dout.shape
            return dout.new_empty((B, num_prompt, H) if batched else (num_prompt, H), dtype=prompt_dtype)

    if hasattr(torch.ops.peft_kernels, "distill_loss_fwd_cuda"):  # absent from an extension built before it

        @torch.library.register_fake(lib + "distill_loss_fwd_cuda")
        def _(s, t, labels, kd_mask, counts, grad_out, temperature, w_kd, w_ce, ignore_index, mean, divergence,
              beta):
            return s.new_empty(s.shape[0], dtype=torch.float32)

        @torch.library.register_fake(lib + "distill_scale_grad_cuda_")
        def _(ds, dloss):
            return None

    if hasattr(torch.ops.peft_kernels, "bottleneck_adapter_fwd_cuda"):  # absent from an extension built before it

        @torch.library.register_fake(lib + "bottleneck_adapter_fwd_cuda")
        def _(h, W_down, b_down, W_up, b_up, activation, scaling, residual):
            return h.new_empty(h.shape), h.new_empty(h.shape[0], W_down.shape[0])

        @torch.library.register_fake(lib + "bottleneck_adapter_bwd_cuda")
        def _(dy, h, W_down, b_down, W_up, b_up, z, activation, scaling, residual, needs):
            like = (h, W_down, b_down, W_up, b_up)
            return tuple(torch.empty_like(t) if n and t is not None else None for t, n in zip(like, needs))


_register()
