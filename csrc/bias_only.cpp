// BitFit linear: y = x W^T + b with W frozen; backward gives dx = dy W and db = column_sum(dy) only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "peft_kernels/check.h"

namespace peft_kernels {
namespace {

at::Tensor bias_only_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  PK_CHECK(x.dim() == 2 && weight.size(1) == x.size(1) && bias.size(0) == weight.size(0),
           "bias_only_linear_fwd: inconsistent shapes");
  return at::addmm(bias.to(x.scalar_type()), x, weight.t());
}

std::tuple<at::Tensor, at::Tensor> bias_only_linear_bwd(const at::Tensor& dy, const at::Tensor& weight,
                                                        std::array<bool, 2> needs,
                                                        std::optional<at::ScalarType> db_dtype) {
  static auto colsum = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("peft_kernels::column_sum", "")
                           .typed<at::Tensor(const at::Tensor&, std::optional<at::ScalarType>)>();
  at::Tensor dx = needs[0] ? at::mm(dy, weight.to(dy.scalar_type())) : at::Tensor();
  at::Tensor db = needs[1] ? colsum.call(dy, db_dtype) : at::Tensor();
  return {dx, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("bias_only_linear_fwd", &bias_only_linear_fwd);
  m.impl("bias_only_linear_bwd", &bias_only_linear_bwd);
}

#ifdef PEFT_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("bias_only_linear_fwd", &bias_only_linear_fwd);
  m.impl("bias_only_linear_bwd", &bias_only_linear_bwd);
}
#endif

}  // namespace peft_kernels
