// LoRA linear composed of ATen GEMMs and the library's Philox dropout kernels (csrc/lora.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace peft_kernels {

// y = x W^T + b + s * (drop(x) A^T) B^T; returns (y, S = drop(x) A^T).
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, double scaling, double dropout_p,
                                                   int64_t seed);

// (dx, dW, db, dA, dB); an entry not asked for in `needs` is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& S, double scaling, double dropout_p, int64_t seed,
    std::array<bool, 5> needs);

// The same as one autograd node (forward and backward in C++): the eager path of the `aten` backend.
at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                                int64_t seed);

}  // namespace peft_kernels
