// Distillation loss on CPU tensors (csrc/distill.cpp): the `cpp` backend of peft_kernels/ops/distill.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace peft_kernels {

// The whole forward of the op family over rows [N, V] (unit stride over V): the label range check, the row
// counts, per-row w_kd T^2 D(t, s; T) + w_ce CE(s, label), the reduction (0 mean, 1 sum, 2 none) and, when
// need_grad, d(loss)/ds for an incoming gradient of 1 (in s's own memory when in_place). divergence: 0 forward
// KL, 1 reverse KL, 2 JSD(beta). Returns (loss, ds) with ds empty when no gradient is needed.
std::tuple<at::Tensor, at::Tensor> distill_loss_forward_cpu(const at::Tensor& s, const at::Tensor& t,
                                                            const std::optional<at::Tensor>& labels,
                                                            const std::optional<at::Tensor>& kd_mask,
                                                            double temperature, double alpha, int64_t ignore_index,
                                                            int64_t reduction, int64_t divergence, double beta,
                                                            bool need_grad, bool in_place);

// The same as one C++ autograd node (its backward scales ds by the incoming gradient): the eager path.
at::Tensor distill_loss_autograd(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels,
                                 const std::optional<at::Tensor>& kd_mask, double temperature, double alpha,
                                 int64_t ignore_index, int64_t reduction, int64_t divergence, double beta,
                                 bool need_grad, bool in_place);

}  // namespace peft_kernels
