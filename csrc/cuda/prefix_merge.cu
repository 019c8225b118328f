// The prefix part of prefix attention, merged into an attention over the real keys computed elsewhere (the `cuda`
// backend of peft_kernels/ops/prefix_attention.py: PyTorch's fused SDPA for the real keys, then these kernels).
// Same semantics as prefix_merge_torch / prefix_merge_backward_torch there (the oracle) and the Triton kernels in
// peft_kernels/triton/prefix_merge.py.
//
// Forward (prefix_merge_fwd_cuda), one pass per query tile: the prefix scores s = q pk^T scale over the P prefix
// keys, lse_p = logsumexp(s), and the exact merge with the real keys' partial softmax (O_c, lse_c):
//   lse = logaddexp(lse_c, lse_p),   O = e^(lse_c - lse) O_c + e^(lse_p - lse) O_p,   O_p = softmax(s) pv,
// written over O_c in place. Rows with lse_c = -inf (no visible real key) get the prefix alone; O_c is not read
// there (SDPA kernels leave 0, NaN or garbage in such rows).
// Backward (prefix_merge_bwd_cuda), given the *merged* O and lse (with which SDPA's own backward is exact for the
// real keys): p = exp(s - lse), delta = rowsum(dO O), ds = p (dO pv^T - delta); dq += ds pk scale (in place),
// dpk = sum over rows of ds^T q scale, dpv = sum of p^T dO, in fp32.
//
// Design. P is small (1..128 typical) and D <= 256, so the P x D prefix tile of one KV head (16 KB in fp32 at
// P = 32, D = 128) fits in shared memory beside a tile of query rows, and every row of the tile reuses it: one
// block per (query tile, head, batch) in the forward, each thread owning one query row (its P scores live in a
// shared-memory column, conflict-free), the prefix read from L2 once per tile instead of once per row. The prefix
// is staged in fp32 (the host casts it once; fp32 master weights are not rounded to the activation dtype).
// The math is SIMT fp32 FMA with 16-byte vector loads, not tensor cores: at P = 32 the prefix part is ~4 GFLOP per
// direction at the benchmark shape, and the kernel is written to be obviously correct first (see NOTES.md for the
// floor this implies). GQA: query head h reads KV head h / (Hq / Hkv).
// The backward owns (split of the query rows, KV head, batch) per block and loops over the query heads of its GQA
// group and the row tiles of its split, accumulating dpk/dpv for a chunk of 32 prefix keys in shared memory; it
// writes one fp32 partial per block and the host sums the partials over the splits (and the batch, for a shared
// prefix) in a fixed order: deterministic, no atomics. A dq row is updated by one thread only (no races).
// int64 offsets; every row, key and head-dim boundary masked.
// The kernels and their launch logic live in csrc/include/peft_kernels/prefix_merge_kernels.cuh, free of the CUDA
// host API, so that the CPU tests run this same source (tests/native/prefix_merge_emulation.cpp); this file
// launches them on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "peft_kernels/check.h"
#include "peft_kernels/prefix_merge_kernels.cuh"

namespace peft_kernels {
namespace {

using namespace prefix_merge;

template <typename Kernel>
void set_smem(Kernel kernel, size_t smem, const char* op) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  PK_CHECK(smem <= props->sharedMemPerBlockOptin, op, "needs ", smem, " bytes of shared memory per block, the device ",
           "allows ", props->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

// Launches the kernel of the params' direction for element type T on the current stream.
struct CudaLaunch {
  const char* op;
  template <typename T>
  void operator()(T, Grid g, int threads, size_t smem, const FwdParams& p) const {
    auto kernel = prefix_merge_fwd_kernel<T>;
    set_smem(kernel, smem, op);
    kernel<<<dim3(g.x, g.y, g.z), threads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  void operator()(T, Grid g, int threads, size_t smem, const BwdParams& p) const {
    auto kernel = prefix_merge_bwd_kernel<T>;
    set_smem(kernel, smem, op);
    kernel<<<dim3(g.x, g.y, g.z), threads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor prefix_merge_fwd_cuda(const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                 at::Tensor& out, const at::Tensor& lse_c, double scale) {
  constexpr const char* op = "prefix_merge_fwd_cuda: ";
  PK_CHECK(q.is_cuda(), op, "q must be a CUDA tensor, got ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  return prefix_merge_fwd_impl(op, q, prefix_k, prefix_v, out, lse_c, scale, CudaLaunch{op});
}

std::tuple<at::Tensor, at::Tensor> prefix_merge_bwd_cuda(const at::Tensor& dout, const at::Tensor& q,
                                                         const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         at::Tensor& dq, double scale) {
  constexpr const char* op = "prefix_merge_bwd_cuda: ";
  PK_CHECK(q.is_cuda(), op, "q must be a CUDA tensor, got ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  return prefix_merge_bwd_impl(op, dout, q, prefix_k, prefix_v, out, lse, dq, scale, CudaLaunch{op});
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("prefix_merge_fwd_cuda", &prefix_merge_fwd_cuda);
  m.impl("prefix_merge_bwd_cuda", &prefix_merge_bwd_cuda);
}

}  // namespace peft_kernels
