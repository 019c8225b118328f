// Column sum of dY [M, N] with fp32 accumulation: the bias gradient for BitFit and LoRA with a trainable bias.
//
// Each block owns 32 columns (one per lane, so a warp reads 32 consecutive elements of a row) and a slab of
// rows split among its 16 warps; the warps' partial sums meet in shared memory, and slabs of different blocks
// meet with one fp32 atomicAdd per column. The row split (grid.y) is sized to fill every SM once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "peft_kernels/check.h"

namespace peft_kernels {
namespace {

constexpr int kCols = 32;
constexpr int kWarps = 16;

template <typename scalar_t, typename acc_t>
__global__ void column_sum_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ out, int64_t rows,
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
    if (gridDim.y == 1) {
      out[col] = total;
    } else {
      atomicAdd(out + col, total);
    }
  }
}

at::Tensor column_sum_cuda(const at::Tensor& x, std::optional<at::ScalarType> out_dtype) {
  PK_CHECK(x.dim() == 2, "column_sum: x must be 2-D, got ", x.dim(), "-D");
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  const int64_t rows = xc.size(0), cols = xc.size(1);
  const auto acc_dtype = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto acc = at::zeros({cols}, xc.options().dtype(acc_dtype));
  if (rows > 0 && cols > 0) {
    const int64_t col_blocks = (cols + kCols - 1) / kCols;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    // Enough row slabs for ~2 blocks per SM, but at least 64 rows per slab so atomics stay rare.
    int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>((2 * sms + col_blocks - 1) / col_blocks,
                                                                (rows + 63) / 64));
    row_blocks = std::min<int64_t>(row_blocks, 65535);
    const int64_t rows_per_block = (rows + row_blocks - 1) / row_blocks;
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
    const dim3 block(kCols, kWarps);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "column_sum_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      column_sum_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), acc.mutable_data_ptr<acc_t>(), rows, cols, rows_per_block);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return acc.to(out_dtype.value_or(x.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) { m.impl("column_sum", &column_sum_cuda); }

}  // namespace peft_kernels
