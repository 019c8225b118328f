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

    if torch._C._dispatch_has_kernel_for_dispatch_key(lib + "prefix_attention_fwd_cuda", "CUDA"):

        @torch.library.register_fake(lib + "prefix_attention_fwd_cuda")
        def _(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
            return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


_register()
