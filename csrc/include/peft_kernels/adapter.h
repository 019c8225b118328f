// The bottleneck adapter's reference math as one C++ autograd node (csrc/adapter.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace peft_kernels {

// y = [h +] s * (act(h W_down^T + b_down) W_up^T + b_up), differentiable, backward in C++.
at::Tensor bottleneck_adapter_autograd(const at::Tensor& h, const at::Tensor& W_down,
                                       const std::optional<at::Tensor>& b_down, const at::Tensor& W_up,
                                       const std::optional<at::Tensor>& b_up, const std::string& activation,
                                       double scaling, bool residual);

}  // namespace peft_kernels
