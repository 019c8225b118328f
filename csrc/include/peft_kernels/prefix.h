// Prefix attention on CPU tensors (csrc/prefix.cpp): the eager node of the `concat` backend of
// peft_kernels/ops/prefix_attention.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace peft_kernels {

// softmax(q [Pk; k]^T * scale) [Pv; v] over all keys (causal: the prefix always visible, the real keys bottom-right
// causal and/or padded keys hidden, by an additive mask) as one C++ autograd node: one CPU flash call over the concatenated keys (kept for the backward, as autograd keeps SDPA's inputs over a
// torch.cat), the output laid out like q; backward through the flash backward,
// dPK/dPV the first P rows of dK/dV summed over the batch in fp32 (fp64 for fp64) for a shared [H, P, D] prefix,
// copied for a per-example one, in the prefix's dtype. The Python backend's composition (`_concat_forward` /
// `_concat_backward`) with its [prefix; k] buffer contiguous: the two are bit-identical (tested).
// Takes the op's input record as it is (key_padding_mask: bool [B, Lk], true = a real token).
at::Tensor prefix_concat_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& prefix_k, const at::Tensor& prefix_v, bool causal,
                                            const std::optional<at::Tensor>& key_padding_mask, double scale);

}  // namespace peft_kernels
