// Runs the CUDA C++ prefix-and-merge kernels (csrc/include/peft_kernels/prefix_merge_kernels.cuh: the same source
// the sm_90a build compiles) on the CPU, for the tests: one std::thread per CUDA thread, a std::barrier per block for
// __syncthreads, the block's dynamic shared memory NaN-poisoned and guarded, blocks one after another. What this
// checks is the kernels' logic (indexing, masking, the shared-memory protocol, the host-side launch logic); not warp
// timing, not the GPU's float rounding details (fast-math exp2/log2 on the device).
#include <torch/extension.h>

#include <barrier>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmuDim3 threadIdx, blockIdx;
static std::barrier<>* g_barrier = nullptr;
static float* g_smem = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define PK_SHARED_FLOATS(name) float* name = g_smem

#include "peft_kernels/prefix_merge_kernels.cuh"

namespace pm = peft_kernels::prefix_merge;

template <typename Kernel, typename Params>
void emulate(Kernel kernel, pm::Grid g, int threads, size_t smem_bytes, const Params& p) {
  // The block's shared memory, then a guard region: both NaN-poisoned, so reading memory the kernel did not write
  // shows up as NaN in its outputs, and a write past the declared size is caught below.
  constexpr size_t kGuard = 1024;
  const size_t used = smem_bytes / sizeof(float), n = used + kGuard;
  std::unique_ptr<float, decltype(&std::free)> smem(
      static_cast<float*>(std::aligned_alloc(16, (n * sizeof(float) + 15) / 16 * 16)), &std::free);
  for (unsigned z = 0; z < g.z; ++z) {
    for (unsigned y = 0; y < g.y; ++y) {
      for (unsigned x = 0; x < g.x; ++x) {
        std::fill(smem.get(), smem.get() + n, std::numeric_limits<float>::quiet_NaN());
        g_smem = smem.get();
        std::barrier<> bar(threads);
        g_barrier = &bar;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            blockIdx = {x, y, z};
            kernel(p);
          });
        }
        for (auto& th : pool) th.join();
        for (size_t i = used; i < n; ++i) {
          TORCH_CHECK(std::isnan(smem.get()[i]), "emulated kernel wrote shared memory past its ", smem_bytes,
                      " bytes (float ", i, ") in block (", x, ", ", y, ", ", z, ")");
        }
      }
    }
  }
}

struct CpuLaunch {
  template <typename T>
  void operator()(T, pm::Grid g, int threads, size_t smem, const pm::FwdParams& p) const {
    emulate(pm::prefix_merge_fwd_kernel<T>, g, threads, smem, p);
  }
  template <typename T>
  void operator()(T, pm::Grid g, int threads, size_t smem, const pm::BwdParams& p) const {
    emulate(pm::prefix_merge_bwd_kernel<T>, g, threads, smem, p);
  }
};

at::Tensor fwd(const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v, at::Tensor out,
               const at::Tensor& lse_c, double scale) {
  return pm::prefix_merge_fwd_impl("prefix_merge_fwd_emulated: ", q, prefix_k, prefix_v, out, lse_c, scale,
                                   CpuLaunch{});
}

std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& prefix_k,
                                       const at::Tensor& prefix_v, const at::Tensor& out, const at::Tensor& lse,
                                       at::Tensor dq, double scale) {
  return pm::prefix_merge_bwd_impl("prefix_merge_bwd_emulated: ", dout, q, prefix_k, prefix_v, out, lse, dq, scale,
                                   CpuLaunch{});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "prefix_merge_fwd_cuda's kernel emulated on the CPU (out updated in place)");
  m.def("bwd", &bwd, "prefix_merge_bwd_cuda's kernel emulated on the CPU (dq updated in place)");
}
