// Distillation loss, row-wise (the CUDA backend of ops/distill.py; the math is the Triton kernel's,
// peft_kernels/triton/distill.py): one block per row of the [N, V] student logits s and teacher logits t.
//
//   pass 1   each thread keeps online (max, sum) states of s/T, t/T and s (the hard-label CE at T = 1) over its
//            strided elements, plus the divergence's cross term rescaled with them; the block merges the
//            states (warp shuffles, then shared memory): the row's loss is known after one read of the row.
//   pass 1b  JSD(beta) only: sum q log(q/m) and p log(p/m), m = beta p + (1-beta) q.
//   pass 2   d(loss)/ds written in the logits' dtype, into grad_out (which may be s itself).
//
// Non-finite logits as in the reference: NaN / +inf in a counted row make its loss NaN; a -inf teacher entry
// is a masked vocabulary entry (probability 0). Rows that carry neither term are not read.
// distill_scale_grad_cuda_: ds *= dloss in place (a scalar, or one per row); exactly 1 costs no traffic.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "peft_kernels/check.h"

namespace peft_kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Online log-sum-exp state with one extra sum (the cross term) scaled alongside.
struct Online {
  float m = -INFINITY;
  float z = 0.f;
  float c = 0.f;
};

// Adds exp(x - m) (and exp(x - m) * w to the cross term). A -inf x adds nothing (masked entry); a NaN x makes
// z NaN; a +inf x becomes the max and later finite entries add exp(-inf) = 0, so the lse is +inf.
__device__ __forceinline__ void online_add(Online& st, float x, float w) {
  if (x > st.m) {
    const float scale = __expf(st.m - x);  // m = -inf: 0
    st.z = st.z * scale + 1.f;
    st.c = st.c * scale + w;
    st.m = x;
  } else if (x != -INFINITY) {
    const float e = __expf(x - st.m);
    st.z += e;
    st.c += e * w;
  }
}

__device__ __forceinline__ Online online_merge(const Online& a, const Online& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return Online{m, a.z + b.z, a.c + b.c};  // both empty (or NaN sums, kept)
  const float fa = a.m == -INFINITY ? 0.f : __expf(a.m - m);
  const float fb = b.m == -INFINITY ? 0.f : __expf(b.m - m);
  return Online{m, a.z * fa + b.z * fb, a.c * fa + b.c * fb};
}

__device__ __forceinline__ Online warp_merge(Online st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Online o{__shfl_xor_sync(0xffffffff, st.m, off), __shfl_xor_sync(0xffffffff, st.z, off),
             __shfl_xor_sync(0xffffffff, st.c, off)};
    st = online_merge(st, o);
  }
  return st;
}

// Merges one state per thread across the block; every thread gets the result.
__device__ Online block_merge(Online st, Online* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  st = warp_merge(st);
  __syncthreads();  // shared may still be read from a previous merge
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  st = lane < kWarps ? shared[lane] : Online{};
  return warp_merge(st);
}

__device__ float block_sum(float x, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffff, x, off);
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = lane < kWarps ? shared[lane] : 0.f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffff, x, off);
  return x;
}

__device__ __forceinline__ float lse_of(const Online& st) { return (st.m == -INFINITY ? 0.f : st.m) + logf(st.z); }

__device__ __forceinline__ float log_mix(float log_p, float log_q, float log_b, float log_1b) {
  const float a = log_b + log_p, b = log_1b + log_q;
  const float hi = fmaxf(a, b);
  const float hs = hi == -INFINITY ? 0.f : hi;
  return hs + logf(__expf(a - hs) + __expf(b - hs));
}

struct Params {
  int64_t V, stride_s, stride_t, stride_ds;
  float inv_temp, temp, w_kd, w_ce, beta;
  int64_t ignore_index;
  int mode;  // 0 forward KL, 1 reverse KL, 2 JSD
  bool mean, same_t, has_labels, has_kd_mask;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) distill_row_kernel(
    const scalar_t* S, const scalar_t* __restrict__ T_, const int64_t* __restrict__ labels,
    const bool* __restrict__ kd_mask, const float* __restrict__ counts, scalar_t* ds, float* __restrict__ loss_out,
    Params p) {
  __shared__ Online shared[kWarps];
  __shared__ float shared_f[kWarps];
  const int64_t row = blockIdx.x;
  const scalar_t* s_row = S + row * p.stride_s;
  const scalar_t* t_row = T_ + row * p.stride_t;
  const int64_t label = p.has_labels ? labels[row] : 0;
  const bool ce_on = p.has_labels && label != p.ignore_index;
  const bool kd_on = p.has_kd_mask ? kd_mask[row] : (p.has_labels ? ce_on : true);
  const float kd_scale = p.mean ? (counts[0] > 0.f ? 1.f / counts[0] : 0.f) : 1.f;
  const float ce_scale = p.mean ? (counts[1] > 0.f ? 1.f / counts[1] : 0.f) : 1.f;

  if (!(kd_on || ce_on)) {
    if (threadIdx.x == 0) loss_out[row] = 0.f;
    if (ds != nullptr) {
      for (int64_t j = threadIdx.x; j < p.V; j += kThreads) ds[row * p.stride_ds + j] = scalar_t(0.f);
    }
    return;
  }

  Online st_s, st_t, st_c;
  for (int64_t j = threadIdx.x; j < p.V; j += kThreads) {
    const float s = static_cast<float>(s_row[j]), t = static_cast<float>(t_row[j]);
    const float sT = s * p.inv_temp, tT = t * p.inv_temp;
    // The cross term: forward KL sum p_t (tT - sT) rides on the teacher's state, reverse KL on the student's.
    online_add(st_s, sT, p.mode == 1 ? (sT == -INFINITY ? 0.f : sT - tT) : 0.f);
    online_add(st_t, tT, p.mode == 0 ? tT - sT : 0.f);
    if (!p.same_t) online_add(st_c, s, 0.f);
  }
  st_s = block_merge(st_s, shared);
  st_t = block_merge(st_t, shared);
  const float lse_s = lse_of(st_s), lse_t = lse_of(st_t);
  float lse_c = lse_s;
  if (!p.same_t) lse_c = lse_of(block_merge(st_c, shared));

  const float log_b = logf(p.beta), log_1b = log1pf(-p.beta);
  float div, kq = 0.f;
  if (p.mode == 0) {
    div = st_t.c / st_t.z - lse_t + lse_s;
  } else if (p.mode == 1) {
    div = st_s.c / st_s.z - lse_s + lse_t;
  } else {
    float kp = 0.f;
    for (int64_t j = threadIdx.x; j < p.V; j += kThreads) {
      const float log_q = static_cast<float>(s_row[j]) * p.inv_temp - lse_s;
      const float log_p = static_cast<float>(t_row[j]) * p.inv_temp - lse_t;
      const float log_m = log_mix(log_p, log_q, log_b, log_1b);
      if (log_q != -INFINITY) kq += __expf(log_q) * (log_q - log_m);
      if (log_p != -INFINITY) kp += __expf(log_p) * (log_p - log_m);
    }
    kq = block_sum(kq, shared_f);
    kp = block_sum(kp, shared_f);
    div = p.beta * kp + (1.f - p.beta) * kq;
  }

  if (threadIdx.x == 0) {
    float loss = 0.f;
    if (kd_on) loss += p.w_kd * p.temp * p.temp * kd_scale * div;
    if (ce_on) loss += p.w_ce * ce_scale * (lse_c - static_cast<float>(s_row[label]));
    loss_out[row] = loss;
  }
  if (ds == nullptr) return;
  // Every thread has read its last element of the row before the block merges above: writing over s (ds == S)
  // is safe from here, each thread rewriting only the elements it reads.
  __syncthreads();
  const float g_kd = kd_on ? p.w_kd * p.temp * kd_scale : 0.f;
  const float g_ce = ce_on ? p.w_ce * ce_scale : 0.f;
  scalar_t* ds_row = ds + row * p.stride_ds;
  for (int64_t j = threadIdx.x; j < p.V; j += kThreads) {
    const float s = static_cast<float>(s_row[j]), t = static_cast<float>(t_row[j]);
    const float log_q = s * p.inv_temp - lse_s;
    const float q = __expf(log_q);
    float d;
    if (p.mode == 0) {
      d = g_kd * (q - __expf(t * p.inv_temp - lse_t));
    } else if (p.mode == 1) {
      const float log_p = t * p.inv_temp - lse_t;
      d = q == 0.f ? 0.f : g_kd * q * (log_q - log_p - div);
    } else {
      const float log_p = t * p.inv_temp - lse_t;
      d = q == 0.f ? 0.f : g_kd * (1.f - p.beta) * q * (log_q - log_mix(log_p, log_q, log_b, log_1b) - kq);
    }
    const float c = p.same_t ? q : __expf(s - lse_c);
    d += g_ce * (c - (j == label ? 1.f : 0.f));
    ds_row[j] = static_cast<scalar_t>(d);
  }
}

template <typename scalar_t>
__global__ void scale_kernel(scalar_t* ds, const float* __restrict__ dloss, int64_t V, int64_t stride, bool per_row) {
  const int64_t row = blockIdx.x;
  const float g = per_row ? dloss[row] : dloss[0];
  if (g == 1.f) return;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j < V) {
    scalar_t* x = ds + row * stride + j;
    *x = static_cast<scalar_t>(static_cast<float>(*x) * g);
  }
}

at::Tensor distill_loss_fwd_cuda(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels,
                                 const std::optional<at::Tensor>& kd_mask, const at::Tensor& counts,
                                 const std::optional<at::Tensor>& grad_out, double temperature, double w_kd,
                                 double w_ce, int64_t ignore_index, bool mean, int64_t divergence, double beta) {
  PK_CHECK(s.dim() == 2 && t.sizes() == s.sizes(), "distill_loss_fwd_cuda: s and t must be 2-D of one shape");
  PK_CHECK(t.scalar_type() == s.scalar_type(), "distill_loss_fwd_cuda: s and t must share a dtype");
  PK_CHECK(s.size(1) <= 1 || (s.stride(1) == 1 && t.stride(1) == 1),
           "distill_loss_fwd_cuda: s and t need a unit stride over the vocabulary");
  PK_CHECK(counts.scalar_type() == at::kFloat && counts.numel() == 2 && counts.is_contiguous(),
           "distill_loss_fwd_cuda: counts must be 2 contiguous fp32 values");
  PK_CHECK(divergence >= 0 && divergence <= 2, "distill_loss_fwd_cuda: divergence must be 0, 1 or 2");
  const int64_t N = s.size(0), V = s.size(1);
  at::Tensor lab, kdm;
  if (labels.has_value()) {
    lab = labels->to(at::kLong).contiguous();
    PK_CHECK(lab.numel() == N, "distill_loss_fwd_cuda: labels must have N entries");
  }
  if (kd_mask.has_value()) {
    kdm = kd_mask->to(at::kBool).contiguous();
    PK_CHECK(kdm.numel() == N, "distill_loss_fwd_cuda: kd_mask must have N entries");
  }
  if (grad_out.has_value()) {
    PK_CHECK(grad_out->sizes() == s.sizes() && grad_out->scalar_type() == s.scalar_type() &&
                 (V <= 1 || grad_out->stride(1) == 1),
             "distill_loss_fwd_cuda: grad_out must be like s, with a unit stride over the vocabulary");
  }
  const c10::cuda::CUDAGuard guard(s.device());
  auto loss = at::empty({N}, s.options().dtype(at::kFloat));
  if (N == 0) return loss;
  Params p;
  p.V = V;
  p.stride_s = s.stride(0);
  p.stride_t = t.stride(0);
  p.stride_ds = grad_out.has_value() ? grad_out->stride(0) : 0;
  p.inv_temp = static_cast<float>(1.0 / temperature);
  p.temp = static_cast<float>(temperature);
  p.w_kd = static_cast<float>(w_kd);
  p.w_ce = static_cast<float>(w_ce);
  p.beta = static_cast<float>(beta);
  p.ignore_index = ignore_index;
  p.mode = static_cast<int>(divergence);
  p.mean = mean;
  p.same_t = temperature == 1.0;
  p.has_labels = labels.has_value();
  p.has_kd_mask = kd_mask.has_value();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "distill_loss_fwd_cuda", [&] {
    distill_row_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
        p.has_labels ? lab.const_data_ptr<int64_t>() : nullptr, p.has_kd_mask ? kdm.const_data_ptr<bool>() : nullptr,
        counts.const_data_ptr<float>(), grad_out.has_value() ? grad_out->mutable_data_ptr<scalar_t>() : nullptr,
        loss.mutable_data_ptr<float>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

void distill_scale_grad_cuda_(at::Tensor& ds, const at::Tensor& dloss) {
  PK_CHECK(ds.dim() == 2 && (ds.size(1) <= 1 || ds.stride(1) == 1), "distill_scale_grad_cuda_: ds must be 2-D");
  PK_CHECK(dloss.scalar_type() == at::kFloat && dloss.is_contiguous() &&
               (dloss.numel() == 1 || (dloss.dim() == 1 && dloss.numel() == ds.size(0))),
           "distill_scale_grad_cuda_: dloss must be one fp32 value or one per row");
  const int64_t N = ds.size(0), V = ds.size(1);
  if (N == 0 || V == 0) return;
  const c10::cuda::CUDAGuard guard(ds.device());
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((V + threads - 1) / threads));
  const bool per_row = dloss.dim() == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ds.scalar_type(), "distill_scale_grad_cuda_", [&] {
    scale_kernel<scalar_t><<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        ds.mutable_data_ptr<scalar_t>(), dloss.const_data_ptr<float>(), V, ds.stride(0), per_row);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("distill_loss_fwd_cuda", &distill_loss_fwd_cuda);
  m.impl("distill_scale_grad_cuda_", &distill_scale_grad_cuda_);
}

}  // namespace peft_kernels
