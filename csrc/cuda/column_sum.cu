// Column sum of dY [M, N] with fp32 accumulation: the bias gradient for BitFit and LoRA with a trainable bias.
//
// Stage 1: each block owns 32 columns (one per lane, so a warp reads 32 consecutive elements of a row) and a
// slab of rows split among its 16 warps; the warps' sums meet in shared memory in warp order. With one slab
// (wide N fills the GPU by columns alone) the block writes the result in the output dtype and that is all.
// Stage 2 (several slabs): one thread per column adds the slabs' fp32 partials in slab order and writes the
// output dtype. No atomics anywhere, so the result is bit-identical run to run (torch's deterministic mode
// needs nothing more), and the cast to the bias's dtype is fused into the last stage.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "peft_kernels/check.h"
#include "peft_kernels/column_sum.cuh"

namespace peft_kernels {
namespace {

constexpr int kCols = 32;
constexpr int kWarps = 16;

// Writes the slab's sums to out[blockIdx.y * cols + col] (fp32 partials, or the final dtype with one slab).
template <typename scalar_t, typename acc_t, typename out_t>
__global__ void column_sum_slab_kernel(const scalar_t* __restrict__ x, out_t* __restrict__ out, int64_t rows,
                                       int64_t cols, int64_t rows_per_block) {
  __shared__ acc_t partial[kWarps][kCols];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = min(rows, row_begin + rows_per_block);
  acc_t acc = 0;
  if (col < cols) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kWarps) acc += static_cast<acc_t>(x[r * cols + col]);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    acc_t total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w][threadIdx.x];
    out[static_cast<int64_t>(blockIdx.y) * cols + col] = static_cast<out_t>(total);
  }
}

template <typename acc_t, typename out_t>
__global__ void column_sum_reduce_kernel(const acc_t* __restrict__ partial, out_t* __restrict__ out, int64_t slabs,
                                         int64_t cols) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  acc_t total = 0;
  for (int64_t s = 0; s < slabs; ++s) total += partial[s * cols + col];  // fixed order: deterministic
  out[col] = static_cast<out_t>(total);
}

at::Tensor column_sum_cuda(const at::Tensor& x, std::optional<at::ScalarType> out_dtype) {
  PK_CHECK(x.dim() == 2, "column_sum: x must be 2-D, got ", x.dim(), "-D");
  const c10::cuda::CUDAGuard guard(x.device());
  return column_sum_on_stream(x, out_dtype.value_or(x.scalar_type()), at::cuda::getCurrentCUDAStream());
}

}  // namespace

at::Tensor column_sum_on_stream(const at::Tensor& x, at::ScalarType out_dtype, cudaStream_t stream) {
  auto xc = x.contiguous();
  const int64_t rows = xc.size(0), cols = xc.size(1);
  const auto acc_dtype = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (rows == 0 || cols == 0) return at::zeros({cols}, xc.options().dtype(out_dtype));
  PK_CHECK(at::isFloatingType(out_dtype), "column_sum: out_dtype must be a floating type, got ", out_dtype);
  const int64_t col_blocks = (cols + kCols - 1) / kCols;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Enough row slabs for ~2 blocks per SM, but at least 64 rows per slab so the partials stay small.
  int64_t slabs = std::max<int64_t>(1, std::min<int64_t>((2 * sms + col_blocks - 1) / col_blocks, (rows + 63) / 64));
  slabs = std::min<int64_t>(slabs, 65535);
  const int64_t rows_per_block = (rows + slabs - 1) / slabs;
  slabs = (rows + rows_per_block - 1) / rows_per_block;  // no empty slab
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(slabs));
  const dim3 block(kCols, kWarps);
  auto out = at::empty({cols}, xc.options().dtype(out_dtype));
  at::Tensor partial = slabs > 1 ? at::empty({slabs, cols}, xc.options().dtype(acc_dtype)) : at::Tensor();
  if (stream != at::cuda::getCurrentCUDAStream(xc.device().index()).stream()) {
    // Allocated from the current stream's pool but used on `stream`: the caching allocator must not reuse them
    // (the partials are freed when this function returns) before `stream` is done with them.
    const auto used_on = c10::cuda::getStreamFromExternal(stream, xc.device().index());
    xc.record_stream(used_on);
    out.record_stream(used_on);
    if (partial.defined()) partial.record_stream(used_on);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "column_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (slabs > 1) {
      column_sum_slab_kernel<scalar_t, acc_t, acc_t><<<grid, block, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), rows, cols, rows_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "column_sum_reduce", [&] {
        using out_t = scalar_t;
        const int threads = 256;
        const auto blocks = static_cast<unsigned>((cols + threads - 1) / threads);
        column_sum_reduce_kernel<acc_t, out_t><<<blocks, threads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), out.mutable_data_ptr<out_t>(), slabs, cols);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "column_sum_slab", [&] {
        column_sum_slab_kernel<in_t, acc_t, scalar_t><<<grid, block, 0, stream>>>(
            xc.const_data_ptr<in_t>(), out.mutable_data_ptr<scalar_t>(), rows, cols, rows_per_block);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) { m.impl("column_sum", &column_sum_cuda); }

}  // namespace peft_kernels
