// BitFit's RMSNorm with a bias, the reference math as one C++ autograd node (csrc/bias_norm.cpp).
#pragma once

#include <ATen/ATen.h>

namespace peft_kernels {

// y = x * rsqrt(mean(x^2) + eps) * weight + bias over the last dim, weight frozen; backward dx and db in C++.
at::Tensor bias_rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

}  // namespace peft_kernels
