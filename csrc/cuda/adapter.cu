// Bottleneck adapter, CUDA C++: the two thin GEMMs of each direction on cuBLAS, the elementwise steps fused into
// one pass each (the same math as peft_kernels/ops/adapter.py's reference; activation codes as in
// peft_kernels/triton/adapter.py: 0 relu, 1 gelu (erf), 2 gelu_tanh, 3 silu, 4 tanh, 5 identity).
//
// Forward:   z = addmm(b_down, h, W_downᵀ)              cuBLAS (bias in its epilogue)          -> saved, [N, m]
//            a = act(z)                                 one pass over [N, m]
//            u = a W_upᵀ                                cuBLAS                                  [N, H]
//            y = [h +] s (u + b_up)                     one fused pass in place over u (bias, scale, residual)
// Backward:  da = dout W_up                             cuBLAS                                  [N, m]
//            dz = s da * act'(z), a = act(z)            one fused pass over [N, m] (both outputs)
//            dW_up = s doutᵀ a, dW_down = dzᵀ h         cuBLAS
//            dh = [dout +] dz W_down                    cuBLAS addmm (the residual as beta = 1)
//            db_up = s Σ dout, db_down = Σ dz           fp32 column sums
// Passes over N·H: forward 5 (h twice, u written, read and written again), backward 6 (dout three times, h, dh
// read+written by the addmm) -- more than the fused Triton kernels (3 + 4): this backend is the cuBLAS-anchored
// alternative that measured dispatch weighs against them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>

#include "peft_kernels/check.h"

namespace peft_kernels {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float tanh_f(float x) { return tanhf(x); }

__device__ __forceinline__ float act_fwd(float z, int act) {
  switch (act) {
    case 0: return z > 0.f ? z : 0.f;
    case 1: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case 2: return 0.5f * z * (1.f + tanh_f(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    case 3: return z / (1.f + __expf(-z));
    case 4: return tanh_f(z);
    default: return z;
  }
}

__device__ __forceinline__ float act_grad(float z, int act) {
  switch (act) {
    case 0: return z > 0.f ? 1.f : 0.f;
    case 1: {
      const float cdf = 0.5f * (1.f + erff(z * 0.70710678118654752f));
      return cdf + z * __expf(-0.5f * z * z) * 0.39894228040143268f;
    }
    case 2: {
      const float t = tanh_f(0.79788456080286536f * (z + 0.044715f * z * z * z));
      const float du = 0.79788456080286536f * (1.f + 3.f * 0.044715f * z * z);
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * du;
    }
    case 3: {
      const float sig = 1.f / (1.f + __expf(-z));
      return sig * (1.f + z * (1.f - sig));
    }
    case 4: {
      const float t = tanh_f(z);
      return 1.f - t * t;
    }
    default: return 1.f;
  }
}

template <typename T>
__global__ void act_fwd_kernel(const T* __restrict__ z, T* __restrict__ a, int64_t n, int act) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    a[i] = static_cast<T>(act_fwd(static_cast<float>(z[i]), act));
  }
}

// dz = (s * da) * act'(z) and a = act(z), from one read of z (and da).
template <typename T>
__global__ void act_bwd_kernel(const T* __restrict__ da, const T* __restrict__ z, T* __restrict__ dz,
                               T* __restrict__ a, int64_t n, int act, float s) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float zi = static_cast<float>(z[i]);
    if (a != nullptr) a[i] = static_cast<T>(act_fwd(zi, act));
    if (dz != nullptr) dz[i] = static_cast<T>(static_cast<float>(da[i]) * s * act_grad(zi, act));
  }
}

// u = [h +] s * (u + b_up), in place; VEC elements per thread (16-byte vectors when rows allow it).
template <typename T, int VEC>
__global__ void bias_scale_residual_kernel(T* __restrict__ u, const T* __restrict__ h, const T* __restrict__ bias,
                                           int64_t N, int64_t H, float s) {
  const int64_t total = N * H / VEC;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = v * VEC;
    const int64_t col = i % H;  // VEC divides H: the vector stays in one row
    T uv[VEC];
    T hv[VEC];
    if constexpr (VEC * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(uv) = *reinterpret_cast<const uint4*>(u + i);
      if (h != nullptr) *reinterpret_cast<uint4*>(hv) = *reinterpret_cast<const uint4*>(h + i);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        uv[k] = u[i + k];
        if (h != nullptr) hv[k] = h[i + k];
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float x = static_cast<float>(uv[k]);
      if (bias != nullptr) x += static_cast<float>(bias[col + k]);
      x *= s;
      if (h != nullptr) x += static_cast<float>(hv[k]);
      uv[k] = static_cast<T>(x);
    }
    if constexpr (VEC * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(u + i) = *reinterpret_cast<const uint4*>(uv);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) u[i + k] = uv[k];
    }
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

void check_inputs(const char* fn, const at::Tensor& h, const at::Tensor& W_down, const at::Tensor& W_up,
                  int64_t activation) {
  PK_CHECK(h.dim() == 2 && h.is_contiguous(), fn, ": h must be a contiguous [N, H] tensor");
  PK_CHECK(W_down.dim() == 2 && W_up.dim() == 2 && W_down.size(1) == h.size(1) && W_up.size(0) == h.size(1) &&
               W_up.size(1) == W_down.size(0),
           fn, ": W_down [m, H] / W_up [H, m] do not fit h [N, H]");
  PK_CHECK(activation >= 0 && activation <= 5, fn, ": activation code ", activation, " outside [0, 5]");
  PK_CHECK(h.scalar_type() == at::kHalf || h.scalar_type() == at::kBFloat16 || h.scalar_type() == at::kFloat, fn,
           ": h must be fp16, bf16 or fp32");
}

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_fwd_cuda(const at::Tensor& h, const at::Tensor& W_down,
                                                               const std::optional<at::Tensor>& b_down,
                                                               const at::Tensor& W_up,
                                                               const std::optional<at::Tensor>& b_up,
                                                               int64_t activation, double scaling, bool residual) {
  check_inputs("bottleneck_adapter_fwd_cuda", h, W_down, W_up, activation);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto dt = h.scalar_type();
  const int64_t N = h.size(0), H = h.size(1);
  const auto Wd = W_down.to(dt), Wu = W_up.to(dt);
  const bool has_bd = b_down.has_value() && b_down->defined();
  const bool has_bu = b_up.has_value() && b_up->defined();
  at::Tensor z = has_bd ? at::addmm(b_down->to(dt), h, Wd.t()) : at::mm(h, Wd.t());
  at::Tensor a = at::empty_like(z);
  at::Tensor bu = has_bu ? b_up->to(dt).contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "bottleneck_adapter_fwd_cuda", [&] {
    if (z.numel() > 0) {
      act_fwd_kernel<scalar_t><<<grid_for(z.numel()), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), a.mutable_data_ptr<scalar_t>(), z.numel(), static_cast<int>(activation));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  at::Tensor y = at::mm(a, Wu.t());  // [N, H], contiguous
  if (y.numel() == 0) return {y, z};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "bottleneck_adapter_epilogue_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* hp = residual ? h.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = has_bu ? bu.const_data_ptr<scalar_t>() : nullptr;
    const bool aligned = H % kVec == 0 && reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0 &&
                         (hp == nullptr || reinterpret_cast<uintptr_t>(hp) % 16 == 0);
    if (aligned) {
      bias_scale_residual_kernel<scalar_t, kVec><<<grid_for(N * H / kVec), kThreads, 0, stream>>>(
          y.mutable_data_ptr<scalar_t>(), hp, bp, N, H, static_cast<float>(scaling));
    } else {
      bias_scale_residual_kernel<scalar_t, 1><<<grid_for(N * H), kThreads, 0, stream>>>(
          y.mutable_data_ptr<scalar_t>(), hp, bp, N, H, static_cast<float>(scaling));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, z};
}

// Returns (dh, dW_down, db_down, dW_up, db_up); an entry not asked for in `needs` comes back undefined (None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& h, const at::Tensor& W_down, const std::optional<at::Tensor>& b_down,
    const at::Tensor& W_up, const std::optional<at::Tensor>& b_up, const at::Tensor& z, int64_t activation,
    double scaling, bool residual, std::array<bool, 5> needs) {
  check_inputs("bottleneck_adapter_bwd_cuda", h, W_down, W_up, activation);
  PK_CHECK(dy.sizes() == h.sizes() && z.dim() == 2 && z.size(0) == h.size(0) && z.size(1) == W_down.size(0),
           "bottleneck_adapter_bwd_cuda: dy must be [N, H] and z [N, m]");
  const c10::cuda::CUDAGuard guard(h.device());
  const auto dt = h.scalar_type();
  const auto g = dy.contiguous();
  const auto zc = z.contiguous();
  const bool has_bd = b_down.has_value() && b_down->defined();
  const bool has_bu = b_up.has_value() && b_up->defined();
  const bool need_dh = needs[0], need_dwd = needs[1], need_dbd = needs[2] && has_bd, need_dwu = needs[3],
             need_dbu = needs[4] && has_bu;
  const bool need_dz = need_dh || need_dwd || need_dbd;
  const auto Wd = W_down.to(dt), Wu = W_up.to(dt);
  const float s = static_cast<float>(scaling);
  at::Tensor dh, dWd, dbd, dWu, dbu;
  if (need_dbu) dbu = (g.sum(0, false, at::kFloat) * scaling).to(b_up->scalar_type());
  at::Tensor da = need_dz ? at::mm(g, Wu) : at::Tensor();
  at::Tensor dz = need_dz ? at::empty_like(zc) : at::Tensor();
  at::Tensor a = need_dwu ? at::empty_like(zc) : at::Tensor();
  if (zc.numel() > 0 && (need_dz || need_dwu)) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "bottleneck_adapter_act_bwd_cuda", [&] {
      act_bwd_kernel<scalar_t><<<grid_for(zc.numel()), kThreads, 0, stream>>>(
          need_dz ? da.const_data_ptr<scalar_t>() : nullptr, zc.const_data_ptr<scalar_t>(),
          need_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr, need_dwu ? a.mutable_data_ptr<scalar_t>() : nullptr,
          zc.numel(), static_cast<int>(activation), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (need_dwu) dWu = at::mm(g.t(), a).mul_(scaling).to(W_up.scalar_type());
  if (need_dwd) dWd = at::mm(dz.t(), h).to(W_down.scalar_type());
  if (need_dbd) dbd = dz.sum(0, false, at::kFloat).to(b_down->scalar_type());
  if (need_dh) dh = residual ? at::addmm(g, dz, Wd) : at::mm(dz, Wd);
  return {dh, dWd, dbd, dWu, dbu};
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("bottleneck_adapter_fwd_cuda", &bottleneck_adapter_fwd_cuda);
  m.impl("bottleneck_adapter_bwd_cuda", &bottleneck_adapter_bwd_cuda);
}

}  // namespace peft_kernels
