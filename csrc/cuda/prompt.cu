// Soft-prompt embedding (prompt tuning, P-tuning), CUDA C++: the same two kernels as peft_kernels/triton/prompt.py.
//
// Forward, one pass: a warp per output row out[b, t]; the row's source is the token's embedding row or the virtual
// token's prompt row, from slots[b, t] (s >= 0: token s; -(p + 1): virtual token p) or, without a map, from t
// itself (t < P: virtual token t, else token t - P). Rows are copied with 16-byte vectors when the source and the
// output share a dtype and every row start is 16-byte aligned (H * elem % 16 == 0 and aligned bases), element by
// element (converting the prompt's dtype) otherwise. Ids outside [0, V) were refused by the Python layer; the
// kernel still writes zeros for them, so no input reads out of bounds.
//
// Backward, prompt only: dprompt[p, h] = sum_b dout[b, vpos[b, p], h] in fp32 (fp64 for fp64), batch order fixed:
// deterministic, no atomics; per-example prompts get dprompt[b, p, h] = dout[b, vpos[b, p], h].
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "peft_kernels/check.h"

namespace peft_kernels {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp per row
constexpr int kBwdThreads = 256;

template <typename out_t, typename prompt_t, typename id_t>
__global__ void soft_prompt_fwd_kernel(const id_t* __restrict__ ids, const out_t* __restrict__ weight,
                                       const prompt_t* __restrict__ prompt, const int32_t* __restrict__ slots,
                                       out_t* __restrict__ out, int64_t S, int64_t T, int64_t P, int64_t H,
                                       int64_t V, int64_t stride_ib, int64_t stride_wv, int64_t stride_pb,
                                       int64_t stride_pp, int64_t stride_sb, int64_t stride_ob, int64_t stride_ot,
                                       bool vector_tokens, bool vector_prompt) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int64_t b = blockIdx.y;
  if (t >= T) return;
  // Map entries are clamped into range below: a bad map can never index out of bounds.
  const int64_t slot = slots != nullptr ? static_cast<int64_t>(slots[b * stride_sb + t]) : (t < P ? -(t + 1) : t - P);
  out_t* dst = out + b * stride_ob + t * stride_ot;
  constexpr int kVec = 16 / sizeof(out_t);
  if (slot >= 0) {
    const int64_t tok = static_cast<int64_t>(ids[b * stride_ib + (slot < S ? slot : S - 1)]);
    if (tok < 0 || tok >= V) {
      for (int64_t h = lane; h < H; h += 32) dst[h] = out_t(0);
      return;
    }
    const out_t* src = weight + tok * stride_wv;
    if (vector_tokens) {
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
      uint4* d4 = reinterpret_cast<uint4*>(dst);
      for (int64_t i = lane; i < H / kVec; i += 32) d4[i] = __ldg(s4 + i);
    } else {
      for (int64_t h = lane; h < H; h += 32) dst[h] = src[h];
    }
  } else {
    const int64_t p = -slot - 1 < P ? -slot - 1 : P - 1;
    const prompt_t* src = prompt + b * stride_pb + p * stride_pp;
    if (vector_prompt) {  // implies prompt_t == out_t
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
      uint4* d4 = reinterpret_cast<uint4*>(dst);
      for (int64_t i = lane; i < H / kVec; i += 32) d4[i] = s4[i];
    } else {
      using conv_t = std::conditional_t<std::is_same_v<out_t, double> || std::is_same_v<prompt_t, double>, double, float>;
      for (int64_t h = lane; h < H; h += 32) dst[h] = static_cast<out_t>(static_cast<conv_t>(src[h]));
    }
  }
}

// A map entry clamped into [0, rows): a bad map can never index out of bounds.
__device__ __forceinline__ int64_t clamp_row(int32_t v, int64_t rows) {
  return v < 0 ? 0 : (static_cast<int64_t>(v) >= rows ? rows - 1 : static_cast<int64_t>(v));
}

template <typename grad_t, typename prompt_t, typename acc_t>
__global__ void soft_prompt_bwd_kernel(const grad_t* __restrict__ dout, const int32_t* __restrict__ vpos,
                                       prompt_t* __restrict__ dprompt, int64_t B, int64_t T, int64_t P, int64_t H,
                                       int64_t stride_ob, int64_t stride_ot, int64_t stride_vb, bool batched) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x;  // over P * H
  if (i >= P * H) return;
  const int64_t p = i / H, h = i - p * H;
  if (batched) {
    const int64_t b = blockIdx.y;
    const int64_t t = vpos != nullptr ? clamp_row(vpos[b * stride_vb + p], T) : p;
    dprompt[(b * P + p) * H + h] = static_cast<prompt_t>(static_cast<acc_t>(dout[b * stride_ob + t * stride_ot + h]));
    return;
  }
  acc_t acc = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = vpos != nullptr ? clamp_row(vpos[b * stride_vb + p], T) : p;
    acc += static_cast<acc_t>(dout[b * stride_ob + t * stride_ot + h]);
  }
  dprompt[p * H + h] = static_cast<prompt_t>(acc);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

at::Tensor soft_prompt_embed_fwd_cuda(const at::Tensor& input_ids, const at::Tensor& weight, const at::Tensor& prompt,
                                      const std::optional<at::Tensor>& slots) {
  PK_CHECK(input_ids.dim() == 2 && weight.dim() == 2 && (prompt.dim() == 2 || prompt.dim() == 3),
           "soft_prompt_embed_fwd_cuda: expected input_ids [B, S], weight [V, H], prompt [P, H] or [B, P, H]");
  PK_CHECK(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt,
           "soft_prompt_embed_fwd_cuda: input_ids must be int64 or int32");
  const int64_t B = input_ids.size(0), S = input_ids.size(1), V = weight.size(0), H = weight.size(1);
  const int64_t P = prompt.size(-2);
  PK_CHECK(prompt.size(-1) == H && (prompt.dim() == 2 || prompt.size(0) == B),
           "soft_prompt_embed_fwd_cuda: prompt does not match the batch / hidden size");
  PK_CHECK(B <= 65535, "soft_prompt_embed_fwd_cuda: batch ", B, " exceeds the launch grid (65535)");
  const int64_t T = P + S;
  const c10::cuda::CUDAGuard guard(weight.device());
  auto ids = input_ids.contiguous();
  auto w = weight.stride(1) == 1 ? weight : weight.contiguous();
  auto pr = prompt.stride(-1) == 1 ? prompt : prompt.contiguous();
  const int32_t* slots_ptr = nullptr;
  int64_t stride_sb = 0;
  at::Tensor slots_c;
  if (slots.has_value() && slots->defined()) {
    slots_c = slots->contiguous();
    PK_CHECK(slots_c.scalar_type() == at::kInt && slots_c.dim() == 2 && slots_c.size(1) == T &&
                 (slots_c.size(0) == 1 || slots_c.size(0) == B),
             "soft_prompt_embed_fwd_cuda: slots must be int32 [1 or B, P + S]");
    slots_ptr = slots_c.const_data_ptr<int32_t>();
    stride_sb = slots_c.size(0) == 1 ? 0 : slots_c.stride(0);
  }
  auto out = at::empty({B, T, H}, w.options());
  if (out.numel() == 0) return out;
  const dim3 grid(static_cast<unsigned>((T + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>(B));
  const dim3 block(32 * kRowsPerBlock);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t stride_pb = pr.dim() == 3 ? pr.stride(0) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_prompt_fwd_cuda", [&] {
    using out_t = scalar_t;
    const int64_t row_bytes = H * static_cast<int64_t>(sizeof(out_t));
    const bool vector_tokens = row_bytes % 16 == 0 && aligned16(w.const_data_ptr()) &&
                               (w.stride(0) * static_cast<int64_t>(sizeof(out_t))) % 16 == 0 &&
                               aligned16(out.const_data_ptr());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.scalar_type(), "soft_prompt_fwd_cuda_prompt", [&] {
      using prompt_t = scalar_t;
      const bool vector_prompt = std::is_same_v<prompt_t, out_t> && vector_tokens && aligned16(pr.const_data_ptr()) &&
                                 (pr.stride(-2) * static_cast<int64_t>(sizeof(prompt_t))) % 16 == 0 &&
                                 (pr.dim() == 2 || (pr.stride(0) * static_cast<int64_t>(sizeof(prompt_t))) % 16 == 0);
      AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "soft_prompt_fwd_cuda_ids", [&] {
        soft_prompt_fwd_kernel<out_t, prompt_t, index_t><<<grid, block, 0, stream>>>(
            ids.const_data_ptr<index_t>(), w.const_data_ptr<out_t>(), pr.const_data_ptr<prompt_t>(), slots_ptr,
            out.mutable_data_ptr<out_t>(), S, T, P, H, V, ids.stride(0), w.stride(0), stride_pb, pr.stride(-2),
            stride_sb, out.stride(0), out.stride(1), vector_tokens, vector_prompt);
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor soft_prompt_embed_bwd_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& vpos, int64_t num_prompt,
                                      bool batched, at::ScalarType prompt_dtype) {
  PK_CHECK(dout.dim() == 3, "soft_prompt_embed_bwd_cuda: dout must be [B, P + S, H]");
  const int64_t B = dout.size(0), T = dout.size(1), H = dout.size(2), P = num_prompt;
  PK_CHECK(P >= 1 && P <= T, "soft_prompt_embed_bwd_cuda: num_prompt ", P, " does not fit dout's ", T, " rows");
  PK_CHECK(!batched || B <= 65535, "soft_prompt_embed_bwd_cuda: batch ", B, " exceeds the launch grid (65535)");
  const c10::cuda::CUDAGuard guard(dout.device());
  auto g = dout.stride(2) == 1 ? dout : dout.contiguous();
  const int32_t* vpos_ptr = nullptr;
  int64_t stride_vb = 0;
  at::Tensor vpos_c;
  if (vpos.has_value() && vpos->defined()) {
    vpos_c = vpos->contiguous();
    PK_CHECK(vpos_c.scalar_type() == at::kInt && vpos_c.dim() == 2 && vpos_c.size(1) == P &&
                 (vpos_c.size(0) == 1 || vpos_c.size(0) == B),
             "soft_prompt_embed_bwd_cuda: vpos must be int32 [1 or B, P]");
    vpos_ptr = vpos_c.const_data_ptr<int32_t>();
    stride_vb = vpos_c.size(0) == 1 ? 0 : vpos_c.stride(0);
  }
  auto dprompt = batched ? at::empty({B, P, H}, g.options().dtype(prompt_dtype))
                         : at::empty({P, H}, g.options().dtype(prompt_dtype));
  if (dprompt.numel() == 0) return dprompt.zero_();
  const dim3 grid(static_cast<unsigned>((P * H + kBwdThreads - 1) / kBwdThreads), batched ? static_cast<unsigned>(B) : 1u);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "soft_prompt_bwd_cuda", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prompt_dtype, "soft_prompt_bwd_cuda_prompt", [&] {
      using prompt_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<grad_t, double> || std::is_same_v<prompt_t, double>, double, float>;
      soft_prompt_bwd_kernel<grad_t, prompt_t, acc_t><<<grid, kBwdThreads, 0, stream>>>(
          g.const_data_ptr<grad_t>(), vpos_ptr, dprompt.mutable_data_ptr<prompt_t>(), B, T, P, H, g.stride(0),
          g.stride(1), stride_vb, batched);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dprompt;
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("soft_prompt_embed_fwd_cuda", &soft_prompt_embed_fwd_cuda);
  m.impl("soft_prompt_embed_bwd_cuda", &soft_prompt_embed_bwd_cuda);
}

}  // namespace peft_kernels
