// The bottleneck adapter's reference math (peft_kernels/ops/adapter.py) as one C++ autograd node: the eager path
// of the `reference` backend. Op for op the same ATen calls as the Python forward and backward (so eager and
// torch.compile gradients stay bit-identical), without the Python: on small layers the host time is the step.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <string>

#include "peft_kernels/adapter.h"
#include "peft_kernels/check.h"

namespace peft_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const double kSqrt2OverPi = std::sqrt(2.0 / M_PI);
const double kInvSqrt2 = 1.0 / std::sqrt(2.0);
const double kInvSqrt2Pi = 1.0 / std::sqrt(2.0 * M_PI);
constexpr double kGeluTanhC = 0.044715;

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

std::optional<at::Tensor> as_dtype(const std::optional<at::Tensor>& t, at::ScalarType dt) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return as_dtype(*t, dt);
}

// Half types: the activation and its derivative in fp32, as eager PyTorch's kernels do.
at::ScalarType act_math_dtype(at::ScalarType dt) {
  return dt == at::kHalf || dt == at::kBFloat16 ? at::kFloat : dt;
}

at::Tensor act(const at::Tensor& z, const std::string& a) {
  if (a == "relu") return at::relu(z);
  if (a == "gelu") return at::gelu(z);
  if (a == "gelu_tanh") return at::gelu(z, "tanh");
  if (a == "silu") return at::silu(z);
  if (a == "tanh") return at::tanh(z);
  if (a == "identity") return z;
  PK_CHECK(false, "bottleneck_adapter: unknown activation " + a);
  return z;
}

at::Tensor apply_act(const at::Tensor& z, const std::string& a) {
  const auto mdt = act_math_dtype(z.scalar_type());
  return mdt == z.scalar_type() ? act(z, a) : act(z.to(mdt), a).to(z.scalar_type());
}

// act'(z), the formulas of activation_derivative in ops/adapter.py.
at::Tensor act_derivative(const at::Tensor& z, const std::string& a) {
  if (a == "relu") return z.gt(0).to(z.scalar_type());
  if (a == "gelu") {
    const auto cdf = at::add(at::erf(z * kInvSqrt2), 1.0) * 0.5;
    const auto pdf = at::exp(z * -0.5 * z) * kInvSqrt2Pi;
    return cdf + z * pdf;
  }
  if (a == "gelu_tanh") {
    const auto t = at::tanh((z + z * kGeluTanhC * z * z) * kSqrt2OverPi);
    const auto du = at::add(z * (3.0 * kGeluTanhC) * z, 1.0) * kSqrt2OverPi;
    return at::add(t, 1.0) * 0.5 + z * 0.5 * at::rsub(t * t, 1.0) * du;
  }
  if (a == "silu") {
    const auto sig = at::sigmoid(z);
    return sig * at::add(z * at::rsub(sig, 1.0), 1.0);
  }
  if (a == "tanh") {
    const auto t = at::tanh(z);
    return at::rsub(t * t, 1.0);
  }
  if (a == "identity") return at::ones_like(z);
  PK_CHECK(false, "bottleneck_adapter: unknown activation " + a);
  return z;
}

at::Tensor sum_rows(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t.sum(0) : t.sum(0, false, at::kFloat);
}

struct AdapterFunction : public torch::autograd::Function<AdapterFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& W_down,
                            const std::optional<at::Tensor>& b_down, const at::Tensor& W_up,
                            const std::optional<at::Tensor>& b_up, const std::string& activation, double scaling,
                            bool residual) {
    const auto dt = h.scalar_type();
    const auto z = at::linear(h, as_dtype(W_down, dt), as_dtype(b_down, dt));
    auto u = at::linear(apply_act(z, activation), as_dtype(W_up, dt), as_dtype(b_up, dt));
    at::Tensor y;
    if (residual) {
      y = scaling == 1.0 ? h + u : at::add(h, u, scaling);
    } else {
      y = scaling == 1.0 ? u : u.mul_(scaling);
    }
    const bool has_bd = b_down.has_value() && b_down->defined(), has_bu = b_up.has_value() && b_up->defined();
    ctx->save_for_backward({h, W_down, has_bd ? *b_down : at::Tensor(), W_up, has_bu ? *b_up : at::Tensor(), z});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["residual"] = residual;
    ctx->saved_data["has_bd"] = has_bd;
    ctx->saved_data["has_bu"] = has_bu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &h = saved[0], &W_down = saved[1], &b_down = saved[2], &W_up = saved[3], &b_up = saved[4],
               &z = saved[5];
    const auto activation = ctx->saved_data["activation"].toStringRef();
    const double s = ctx->saved_data["scaling"].toDouble();
    const bool residual = ctx->saved_data["residual"].toBool();
    const bool has_bd = ctx->saved_data["has_bd"].toBool(), has_bu = ctx->saved_data["has_bu"].toBool();
    // needs_input_grad counts tensor inputs only: an absent bias has no edge.
    size_t i = 0;
    const bool need_dh = ctx->needs_input_grad(i++), need_dWd = ctx->needs_input_grad(i++);
    const bool need_dbd = has_bd && ctx->needs_input_grad(i++);
    const bool need_dWu = ctx->needs_input_grad(i++);
    const bool need_dbu = has_bu && ctx->needs_input_grad(i++);
    const at::Tensor& dy = grads[0];
    const auto dt = dy.scalar_type();
    const auto Wd = as_dtype(W_down, dt), Wu = as_dtype(W_up, dt);
    at::Tensor dh, dWd, dbd, dWu, dbu;
    if (need_dWu) dWu = as_dtype(at::mm(dy.t(), apply_act(z, activation)).mul_(s), W_up.scalar_type());
    if (need_dbu) dbu = as_dtype(sum_rows(dy) * s, b_up.scalar_type());
    if (need_dh || need_dWd || need_dbd) {
      const auto mdt = act_math_dtype(dt);
      const auto da = as_dtype(at::mm(dy, Wu), mdt).mul_(s);
      // relu: da where z > 0, else 0, in one op (what eager autograd runs; the Python backward's masked_fill).
      const auto dz = activation == "relu" ? as_dtype(at::threshold_backward(da, z, 0), dt)
                                           : as_dtype(da * act_derivative(as_dtype(z, mdt), activation), dt);
      if (need_dh) dh = residual ? at::addmm(dy, dz, Wd) : at::mm(dz, Wd);
      if (need_dWd) dWd = as_dtype(at::mm(dz.t(), h), W_down.scalar_type());
      if (need_dbd) dbd = as_dtype(sum_rows(dz), b_down.scalar_type());
    }
    return {dh, dWd, dbd, dWu, dbu, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor bottleneck_adapter_autograd(const at::Tensor& h, const at::Tensor& W_down,
                                       const std::optional<at::Tensor>& b_down, const at::Tensor& W_up,
                                       const std::optional<at::Tensor>& b_up, const std::string& activation,
                                       double scaling, bool residual) {
  return AdapterFunction::apply(h, W_down, b_down, W_up, b_up, activation, scaling, residual);
}

}  // namespace peft_kernels
