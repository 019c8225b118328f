// BitFit backward on CUDA: dx = dy W (cuBLAS) and db = column_sum(dy) (csrc/cuda/column_sum.cu) at once.
//
// Design. dx is a [M, N] x [N, K] GEMM: compute-bound (2.5 ms at M=8192, 4096 -> 14336 on an H100), and
// cuBLAS is within a few percent of the hardware there; db is one memory-bound pass over dy (~0.1 ms). The two
// share no output and both only read dy, so instead of running them back to back (what eager PyTorch does), the
// column-sum kernel runs on a side stream forked from the current one, while the GEMM runs on the current
// stream; the side stream is joined before returning, so callers see one stream. The column sum's reads of dy
// then hide under the GEMM's compute wherever the GEMM leaves SM slots or bandwidth free (its tail wave, and
// the gaps between its persistent tiles), and its second stage writes db in the bias's dtype directly (no
// cast kernel). No atomics: db is deterministic. cuBLASLt's BGRAD epilogues cannot do this fusion: they
// reduce over the GEMM's k dimension, which is M only in the dW GEMM, and BitFit never computes dW.
// What is not here: a hand-written Hopper GEMM with the column sum in its main loop (the Triton backend does
// that); without a GPU to tune it, it would lose more to cuBLAS than it saves.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "peft_kernels/check.h"
#include "peft_kernels/column_sum.cuh"

namespace peft_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> bias_only_linear_bwd_cuda(const at::Tensor& dy, const at::Tensor& weight,
                                                             std::array<bool, 2> needs,
                                                             std::optional<at::ScalarType> db_dtype) {
  PK_CHECK(dy.dim() == 2 && weight.dim() == 2 && weight.size(0) == dy.size(1),
           "bias_only_linear_bwd_cuda: inconsistent shapes dy ", dy.sizes(), ", weight ", weight.sizes());
  PK_CHECK(dy.is_cuda() && weight.device() == dy.device(), "bias_only_linear_bwd_cuda: CUDA tensors on one device");
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto out_dtype = db_dtype.value_or(dy.scalar_type());
  auto dyc = dy.contiguous();
  if (!needs[0]) {
    at::Tensor db = needs[1] ? column_sum_on_stream(dyc, out_dtype, at::cuda::getCurrentCUDAStream()) : at::Tensor();
    return {at::Tensor(), db};
  }
  at::Tensor db;
  auto main = at::cuda::getCurrentCUDAStream();
  if (needs[1] && dyc.numel() > 0) {
    // Fork: the side stream waits for dy to be ready on the main stream, then sums it.
    auto side = at::cuda::getStreamFromPool(/*isHighPriority=*/false, dy.device().index());
    at::cuda::CUDAEvent ready;
    ready.record(main);
    ready.block(side);
    db = column_sum_on_stream(dyc, out_dtype, side.stream());  // records its buffers' use on the side stream
    auto dx = at::mm(dyc, weight.scalar_type() == dyc.scalar_type() ? weight : weight.to(dyc.scalar_type()));
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(main);  // join: db is ready for whatever the main stream does next
    return {dx, db};
  }
  if (needs[1]) db = at::zeros({dy.size(1)}, dy.options().dtype(out_dtype));
  auto dx = at::mm(dyc, weight.to(dyc.scalar_type()));
  return {dx, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) { m.impl("bias_only_linear_bwd_cuda", &bias_only_linear_bwd_cuda); }

}  // namespace peft_kernels
