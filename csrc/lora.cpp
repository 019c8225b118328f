// LoRA linear as a composition of cuBLAS/ATen GEMMs and the Philox dropout kernels: the `aten` backend, the
// portable fallback (CPU and any CUDA GPU, any dtype incl. fp64), not a fused kernel. On CUDA the Triton
// backend is preferred (and measured dispatch keeps whichever is faster per shape bucket): this path is the
// design of the cuBLAS `mm` + `addmm_` anchor (1.22-1.27x of the frozen base), and with dropout it
// materializes drop(x) once per direction and G.A once -- see benchmarks/NOTES.md.
//
// The GEMMs go to MKL/OpenBLAS or cuBLAS, and the dropout mask kernels to csrc/cpu/dropout.cpp or
// csrc/cuda/dropout.cu. The low-rank term is accumulated into the base GEMM's output in place (addmm_ with
// beta = 1), the dropped input is never saved, and the adapter weights are cast once per call to the
// activation dtype (they are r x K / N x r: tiny next to the activations).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "peft_kernels/check.h"
#include "peft_kernels/lora.h"

namespace peft_kernels {
namespace {

at::Tensor column_sum(const at::Tensor& x, std::optional<at::ScalarType> out_dtype = std::nullopt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peft_kernels::column_sum", "")
                       .typed<at::Tensor(const at::Tensor&, std::optional<at::ScalarType>)>();
  return op.call(x, out_dtype);
}

// A no-op cast still goes through the dispatcher: skip it (host time is the step time at small token counts).
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

at::Tensor maybe_dropout(const at::Tensor& x, double p, int64_t seed) {
  if (p <= 0.0) return x;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peft_kernels::philox_dropout", "")
                       .typed<at::Tensor(const at::Tensor&, double, int64_t)>();
  return op.call(x, p, seed);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, double scaling, double dropout_p,
                                                   int64_t seed) {
  PK_CHECK(x.dim() == 2, "lora_linear_fwd: x must be 2-D [M, K]");
  PK_CHECK(weight.size(1) == x.size(1) && lora_A.size(1) == x.size(1) && lora_B.size(1) == lora_A.size(0) &&
               lora_B.size(0) == weight.size(0),
           "lora_linear_fwd: inconsistent shapes");
  const auto dt = x.scalar_type();
  const auto A = as_dtype(lora_A, dt), B = as_dtype(lora_B, dt);
  const auto S = at::mm(maybe_dropout(x, dropout_p, seed), A.t());  // [M, r]
  auto y = bias.has_value() && bias->defined() ? at::addmm(as_dtype(*bias, dt), x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(S, B.t(), /*beta=*/1.0, /*alpha=*/scaling);  // second phase into the same output
  return {y, S};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& S, double scaling, double dropout_p, int64_t seed,
    std::array<bool, 5> needs) {
  const auto [need_dx, need_dW, need_db, need_dA, need_dB] = needs;
  const auto dt = dy.scalar_type();
  const auto A = as_dtype(lora_A, dt), B = as_dtype(lora_B, dt);
  at::Tensor dx, dW, db, dA, dB;
  at::Tensor G;  // s * dy B  [M, r]
  // s * (a @ b) as one addmm with beta = 0 (its `self`, a tensor of the output's shape, is ignored): one
  // dispatcher call instead of mm + mul_ (host time is the step time on small layers).
  if (need_dx || need_dA) G = at::addmm(S, dy, B, /*beta=*/0.0, /*alpha=*/scaling);
  if (need_dx) {
    dx = at::mm(dy, as_dtype(weight, dt));
    if (dropout_p > 0.0) {
      static auto add_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("peft_kernels::philox_dropout_add_", "")
                               .typed<void(at::Tensor&, const at::Tensor&, double, int64_t)>();
      add_op.call(dx, at::mm(G, A), dropout_p, seed);  // mask regenerated, never stored
    } else {
      dx.addmm_(G, A);
    }
  }
  if (need_dW) dW = as_dtype(at::mm(dy.t(), x), weight.scalar_type());
  if (need_db) db = column_sum(dy);  // fp32 accumulation (fp64 for fp64), in dy's dtype
  if (need_dA) dA = as_dtype(at::mm(G.t(), maybe_dropout(x, dropout_p, seed)), lora_A.scalar_type());
  if (need_dB) dB = as_dtype(at::addmm(B, dy.t(), S, /*beta=*/0.0, /*alpha=*/scaling), lora_B.scalar_type());
  return {dx, dW, db, dA, dB};
}

namespace {

// The eager path of the `aten` backend: the two functions above as one C++ autograd node. Called from Python
// through the extension module (not torch.ops), a steady-state layer call costs one Python->C++ call, and its
// backward runs with no Python at all: at small token counts that host time is the layer's step time.
// torch.compile does not see this: it traces the custom ops defined in peft_kernels/ops/lora.py.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, double dropout_p, int64_t seed) {
    auto [y, S] = lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
    ctx->save_for_backward({x, weight, lora_A, lora_B, S});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    // db comes back in the bias's own dtype (an fp32 master bias gets an fp32 gradient, summed in fp32).
    ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool has_bias = bias_dtype >= 0;
    // needs_input_grad counts tensor inputs only: an absent bias has no edge.
    const size_t a = has_bias ? 3 : 2;
    const bool need_db = has_bias && ctx->needs_input_grad(2);
    const std::array<bool, 5> needs = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), false,
                                       ctx->needs_input_grad(a), ctx->needs_input_grad(a + 1)};
    const at::Tensor dy = grads[0].contiguous();
    auto [dx, dW, unused_db, dA, dB] =
        lora_linear_bwd(dy, saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["scaling"].toDouble(),
                        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["seed"].toInt(), needs);
    at::Tensor db;
    if (need_db) db = column_sum(dy, static_cast<at::ScalarType>(bias_dtype));
    // One entry per forward argument (the scalars get undefined tensors).
    return {dx, dW, db, dA, dB, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                                int64_t seed) {
  return LoraLinearFunction::apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd);
  m.impl("lora_linear_bwd", &lora_linear_bwd);
}

#ifdef PEFT_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd);
  m.impl("lora_linear_bwd", &lora_linear_bwd);
}
#endif

}  // namespace peft_kernels
