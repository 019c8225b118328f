#pragma once
// Deterministic column sum of a row-major [rows, cols] CUDA tensor (csrc/cuda/column_sum.cu), shared by the
// column_sum op and the BitFit backward (csrc/cuda/bias_only.cu).
#include <ATen/ATen.h>
#include <cuda_runtime.h>

namespace peft_kernels {
// out[j] = sum_i x[i, j], accumulated in fp32 (fp64 for fp64) and written in out_dtype, on `stream`.
// No atomics: the row slabs' partial sums meet in a fixed order, so the result is the same run to run.
at::Tensor column_sum_on_stream(const at::Tensor& x, at::ScalarType out_dtype, cudaStream_t stream);
}  // namespace peft_kernels
