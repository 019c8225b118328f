#pragma once
#include <ATen/ATen.h>

// Native ops trust the Python layer's validation but still refuse what would read out of bounds.
#define PK_CHECK(cond, ...) TORCH_CHECK(cond, "peft_kernels: ", __VA_ARGS__)

namespace peft_kernels {
inline at::Tensor optional_or_undefined(bool wanted, const at::Tensor& t) { return wanted ? t : at::Tensor(); }
}  // namespace peft_kernels
