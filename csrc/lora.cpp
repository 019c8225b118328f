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
#include <torch/library.h>

#include "peft_kernels/check.h"

namespace peft_kernels {
namespace {

at::Tensor column_sum(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peft_kernels::column_sum", "")
                       .typed<at::Tensor(const at::Tensor&, std::optional<at::ScalarType>)>();
  return op.call(x, std::nullopt);
}

at::Tensor maybe_dropout(const at::Tensor& x, double p, int64_t seed) {
  if (p <= 0.0) return x;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peft_kernels::philox_dropout", "")
                       .typed<at::Tensor(const at::Tensor&, double, int64_t)>();
  return op.call(x, p, seed);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, double scaling, double dropout_p,
                                                   int64_t seed) {
  PK_CHECK(x.dim() == 2, "lora_linear_fwd: x must be 2-D [M, K]");
  PK_CHECK(weight.size(1) == x.size(1) && lora_A.size(1) == x.size(1) && lora_B.size(1) == lora_A.size(0) &&
               lora_B.size(0) == weight.size(0),
           "lora_linear_fwd: inconsistent shapes");
  const auto dt = x.scalar_type();
  const auto A = lora_A.to(dt), B = lora_B.to(dt);
  const auto S = at::mm(maybe_dropout(x, dropout_p, seed), A.t());  // [M, r]
  auto y = bias.has_value() && bias->defined() ? at::addmm(bias->to(dt), x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(S, B.t(), /*beta=*/1.0, /*alpha=*/scaling);  // second phase into the same output
  return {y, S};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& S, double scaling, double dropout_p, int64_t seed,
    std::array<bool, 5> needs) {
  const auto [need_dx, need_dW, need_db, need_dA, need_dB] = needs;
  const auto dt = dy.scalar_type();
  const auto A = lora_A.to(dt), B = lora_B.to(dt);
  at::Tensor dx, dW, db, dA, dB;
  at::Tensor G;  // s * dy B  [M, r]
  if (need_dx || need_dA) G = at::mm(dy, B).mul_(scaling);
  if (need_dx) {
    dx = at::mm(dy, weight.to(dt));
    if (dropout_p > 0.0) {
      static auto add_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("peft_kernels::philox_dropout_add_", "")
                               .typed<void(at::Tensor&, const at::Tensor&, double, int64_t)>();
      add_op.call(dx, at::mm(G, A), dropout_p, seed);  // mask regenerated, never stored
    } else {
      dx.addmm_(G, A);
    }
  }
  if (need_dW) dW = at::mm(dy.t(), x).to(weight.scalar_type());
  if (need_db) db = column_sum(dy);  // fp32 accumulation (fp64 for fp64), in dy's dtype
  if (need_dA) dA = at::mm(G.t(), maybe_dropout(x, dropout_p, seed)).to(lora_A.scalar_type());
  if (need_dB) dB = at::mm(dy.t(), S).mul_(scaling).to(lora_B.scalar_type());
  return {dx, dW, db, dA, dB};
}

}  // namespace

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
