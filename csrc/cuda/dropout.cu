// CUDA kernels of the Philox dropout: the mask (peft_kernels/philox.h) is a pure function of (seed, row, column),
// identical to the Triton kernels', so the backward regenerates it instead of reading a stored mask.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "peft_kernels/check.h"
#include "peft_kernels/philox.h"

namespace peft_kernels {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  // A grid-stride loop over at most a few waves of blocks keeps launch size bounded for huge tensors.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 16)));
}

// One thread per group of eight columns of a row: one Philox call gives their eight keep bits.
// ADD: out += keep * src * scale; otherwise out = keep * src * scale.
template <typename scalar_t, bool ADD>
__global__ void philox_dropout_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ out, int64_t rows,
                                      int64_t cols, uint64_t seed, uint32_t threshold, double scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t groups = (cols + 7) / 8;
  const opmath_t s = static_cast<opmath_t>(scale);
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < rows * groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = g / groups, q = g % groups;
    const unsigned bits = dropout_keep8(seed, static_cast<uint64_t>(i), static_cast<uint64_t>(q), threshold);
    const int64_t j0 = 8 * q;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      if (j0 + c >= cols) break;
      const int64_t k = i * cols + j0 + c;
      const bool keep = (bits >> c) & 1u;
      if (ADD) {
        if (keep) out[k] = static_cast<scalar_t>(static_cast<opmath_t>(out[k]) + static_cast<opmath_t>(src[k]) * s);
      } else {
        out[k] = keep ? static_cast<scalar_t>(static_cast<opmath_t>(src[k]) * s) : scalar_t(0);
      }
    }
  }
}

at::Tensor philox_dropout_cuda(const at::Tensor& x, double p, int64_t seed) {
  PK_CHECK(x.dim() == 2, "philox_dropout: x must be 2-D, got ", x.dim(), "-D");
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const double scale = p < 1.0 ? 1.0 / (1.0 - p) : 0.0;  // cast to the op's math type in the kernel
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "philox_dropout_cuda", [&] {
    philox_dropout_kernel<scalar_t, false><<<blocks_for(xc.size(0) * ((xc.size(1) + 7) / 8)), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), xc.size(0), xc.size(1),
        static_cast<uint64_t>(seed), keep_threshold(p), scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void philox_dropout_add_cuda(at::Tensor& out, const at::Tensor& src, double p, int64_t seed) {
  PK_CHECK(out.dim() == 2 && src.sizes() == out.sizes(), "philox_dropout_add_: out and src must be equal 2-D");
  PK_CHECK(out.is_contiguous(), "philox_dropout_add_: out must be contiguous");
  const c10::cuda::CUDAGuard guard(out.device());
  auto sc = src.to(out.scalar_type()).contiguous();
  const int64_t n = out.numel();
  if (n == 0) return;
  const double scale = p < 1.0 ? 1.0 / (1.0 - p) : 0.0;  // cast to the op's math type in the kernel
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "philox_dropout_add_cuda", [&] {
    philox_dropout_kernel<scalar_t, true><<<blocks_for(out.size(0) * ((out.size(1) + 7) / 8)), kThreads, 0, stream>>>(
        sc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), out.size(0), out.size(1),
        static_cast<uint64_t>(seed), keep_threshold(p), scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("philox_dropout", &philox_dropout_cuda);
  m.impl("philox_dropout_add_", &philox_dropout_add_cuda);
}

}  // namespace peft_kernels
