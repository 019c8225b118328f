// The bias-only RMSNorm's reference math (peft_kernels/ops/bias_norm.py, rms=True) as one C++ autograd node: the
// eager path of the `reference` backend. Op for op the same ATen calls as the Python forward and backward (eager
// and torch.compile results stay bit-identical), over any leading dims, without the Python: a norm layer's host
// time is its step time at small token counts.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "peft_kernels/bias_norm.h"

namespace peft_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType acc_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

struct BiasRmsNormFunction : public torch::autograd::Function<BiasRmsNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, double eps) {
    const auto acc = acc_dtype(x.scalar_type());
    const auto xf = as_dtype(x, acc);
    const auto rstd = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);  // [..., 1], in acc
    const auto y = xf * rstd * as_dtype(weight, acc) + as_dtype(bias, acc);
    ctx->save_for_backward({x, weight, rstd});
    ctx->saved_data["db_dtype"] = static_cast<int64_t>(bias.scalar_type());
    return as_dtype(y, x.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1], &rstd = saved[2];
    const auto db_dtype = static_cast<at::ScalarType>(ctx->saved_data["db_dtype"].toInt());
    const at::Tensor& dy = grads[0];
    const auto acc = acc_dtype(x.scalar_type());
    at::Tensor dx, db;
    if (ctx->needs_input_grad(0)) {
      const auto xhat = as_dtype(x, acc) * rstd;
      const auto g = as_dtype(dy, acc) * as_dtype(weight, acc);
      dx = as_dtype((g - xhat * (xhat * g).mean(-1, /*keepdim=*/true)) * rstd, x.scalar_type());
    }
    if (ctx->needs_input_grad(2)) {
      const auto dy2d = dy.dim() == 2 ? dy : dy.reshape({-1, dy.size(-1)});
      db = as_dtype(dy2d.sum(0, /*keepdim=*/false, acc_dtype(dy.scalar_type())), db_dtype);
    }
    return {dx, at::Tensor(), db, at::Tensor()};
  }
};

}  // namespace

at::Tensor bias_rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  return BiasRmsNormFunction::apply(x, weight, bias, eps);
}

}  // namespace peft_kernels
