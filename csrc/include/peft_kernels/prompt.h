// Soft-prompt embedding on CPU tensors (csrc/prompt.cpp): the `cpp` backend of peft_kernels/ops/prompt.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace peft_kernels {

// out [B, P + S, H] in weight's dtype: row (b, t) is weight[input_ids[b, s]] or prompt[(b,) p] by slots [1 or B,
// P + S] int32 (s >= 0 token, -(p + 1) virtual; clamped, so any map is memory-safe) or, without slots, the prompt
// in front. Ids outside [0, V) raise ValueError.
at::Tensor soft_prompt_embed_forward_cpu(const at::Tensor& input_ids, const at::Tensor& weight,
                                         const at::Tensor& prompt, const std::optional<at::Tensor>& slots,
                                         const std::optional<at::Tensor>& vpos);

// The same as one C++ autograd node: dprompt gathered at vpos (None: the first P rows), summed over the batch in
// fp32 (fp64 for fp64) in batch order when shared, in the prompt's dtype; dweight (only when the vocabulary needs
// a gradient) the fp32 sum of the token rows per id, in weight's dtype.
at::Tensor soft_prompt_embed_autograd(const at::Tensor& input_ids, const at::Tensor& weight, const at::Tensor& prompt,
                                      const std::optional<at::Tensor>& slots, const std::optional<at::Tensor>& vpos);

}  // namespace peft_kernels
