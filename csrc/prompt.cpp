// Soft-prompt embedding on CPU tensors: the `cpp` backend of peft_kernels/ops/prompt.py (its layout and maps are
// documented there). Each output row is copied once from the vocabulary or the prompt (the reference's embedding
// + expand + cat, or its two gathers and a where, write the tokens twice), and the eager path is one C++ autograd
// node: at the sizes of a CPU step, the host time of those ATen calls is the op's time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/TypeCast.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "peft_kernels/check.h"
#include "peft_kernels/prompt.h"

namespace peft_kernels {
namespace {

at::Tensor ids_int64(const at::Tensor& ids) {
  const at::Tensor t = ids.scalar_type() == at::kLong ? ids : ids.to(at::kLong);
  return t.is_contiguous() ? t : t.contiguous();
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Ids outside [0, V) raise ValueError (the message of the Python check in ops/prompt.py).
void check_ids(const at::Tensor& ids, int64_t V) {
  const int64_t n = ids.numel();
  if (n == 0) return;
  const int64_t* p = ids.const_data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(p, p + n);
  TORCH_CHECK_VALUE(*lo >= 0 && *hi < V, "soft_prompt_embed: input_ids must be in [0, ", V,
                    ") (embedding_weight.shape[0]), got values in [", *lo, ", ", *hi, "]");
}

// Source of output row t of example b: a token index s >= 0, or -(p + 1) for virtual token p (clamped like the
// reference backend: any map is memory-safe).
inline int64_t slot_of(const int32_t* slots, int64_t slot_stride, int64_t b, int64_t t, int64_t P, int64_t S) {
  if (slots == nullptr) return t < P ? -(t + 1) : t - P;
  const int64_t v = slots[b * slot_stride + t];
  if (v >= 0) return std::min<int64_t>(v, std::max<int64_t>(S - 1, 0));
  return -(std::min<int64_t>(-v - 1, P - 1) + 1);
}

template <typename scalar_t, typename prompt_t>
void forward_rows(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& prompt, const int32_t* slots,
                  int64_t slot_stride, at::Tensor& out) {
  const int64_t B = ids.size(0), S = ids.size(1), H = weight.size(1), P = prompt.size(-2), T = P + S;
  const bool batched = prompt.dim() == 3;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const prompt_t* pr = prompt.const_data_ptr<prompt_t>();
  const int64_t ws = weight.stride(0), pb = batched ? prompt.stride(0) : 0, pp = prompt.stride(-2);
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      scalar_t* dst = o + r * H;
      const int64_t s = slot_of(slots, slot_stride, b, t, P, S);
      if (s >= 0) {
        std::memcpy(dst, w + id[b * S + s] * ws, H * sizeof(scalar_t));
      } else {
        const prompt_t* src = pr + b * pb + (-s - 1) * pp;
        if constexpr (std::is_same_v<scalar_t, prompt_t>) {
          std::memcpy(dst, src, H * sizeof(scalar_t));
        } else {
          for (int64_t h = 0; h < H; ++h) dst[h] = c10::convert<scalar_t>(src[h]);
        }
      }
    }
  });
}

}  // namespace

at::Tensor soft_prompt_embed_forward_cpu(const at::Tensor& input_ids, const at::Tensor& weight_in,
                                         const at::Tensor& prompt_in, const std::optional<at::Tensor>& slots_in,
                                         const std::optional<at::Tensor>& vpos) {
  PK_CHECK(input_ids.device().is_cpu() && weight_in.device().is_cpu() && prompt_in.device().is_cpu(),
           "soft_prompt_embed_forward_cpu takes CPU tensors");
  PK_CHECK(input_ids.dim() == 2 && weight_in.dim() == 2 && (prompt_in.dim() == 2 || prompt_in.dim() == 3) &&
               prompt_in.size(-1) == weight_in.size(1) && prompt_in.size(-2) > 0 &&
               (prompt_in.dim() == 2 || prompt_in.size(0) == input_ids.size(0)),
           "soft_prompt_embed_forward_cpu: ids [B, S], weight [V, H], prompt [(B,) P, H]");
  const at::Tensor ids = ids_int64(input_ids);
  const at::Tensor weight = unit_last_stride(weight_in), prompt = unit_last_stride(prompt_in);
  check_ids(ids, weight.size(0));
  const int64_t B = ids.size(0), S = ids.size(1), P = prompt.size(-2), H = weight.size(1);
  const bool has_slots = slots_in.has_value() && slots_in->defined();
  at::Tensor slots;
  if (has_slots) {
    PK_CHECK(slots_in->scalar_type() == at::kInt && slots_in->dim() == 2 && slots_in->size(1) == P + S &&
                 (slots_in->size(0) == 1 || slots_in->size(0) == B),
             "soft_prompt_embed_forward_cpu: slots must be int32 [1 or B, P + S]");
    slots = slots_in->contiguous();
  }
  at::Tensor out = at::empty({B, P + S, H}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  const int32_t* sp = has_slots ? slots.const_data_ptr<int32_t>() : nullptr;
  const int64_t slot_stride = has_slots && slots.size(0) > 1 ? P + S : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "soft_prompt_embed_cpu", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prompt.scalar_type(), "soft_prompt_embed_cpu", [&] {
      forward_rows<w_t, scalar_t>(ids, weight, prompt, sp, slot_stride, out);
    });
  });
  return out;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// dprompt: the rows of dout at the virtual tokens' positions, summed over the batch (shared) in the accumulation
// dtype, in batch order, or copied per example (batched); in the prompt's dtype.
template <typename dout_t>
at::Tensor prompt_grad(const at::Tensor& dout, const at::Tensor& vpos, int64_t P, bool batched,
                       at::ScalarType prompt_dtype) {
  const int64_t B = dout.size(0), T = dout.size(1), H = dout.size(2);
  const dout_t* d = dout.const_data_ptr<dout_t>();
  const int32_t* vp = vpos.defined() ? vpos.const_data_ptr<int32_t>() : nullptr;
  const int64_t vstride = vpos.defined() && vpos.size(0) > 1 ? P : 0;
  auto row = [&](int64_t b, int64_t p) {
    const int64_t t = vp == nullptr ? p : std::clamp<int64_t>(vp[b * vstride + p], 0, T - 1);
    return d + (b * T + t) * H;
  };
  const bool wide = dout.scalar_type() == at::kDouble || prompt_dtype == at::kDouble;
  if (batched) {
    at::Tensor g = at::empty({B, P, H}, dout.options());
    dout_t* o = g.data_ptr<dout_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = 0; p < P; ++p) std::memcpy(o + (b * P + p) * H, row(b, p), H * sizeof(dout_t));
    return g.scalar_type() == prompt_dtype ? g : g.to(prompt_dtype);
  }
  at::Tensor acc = at::empty({P, H}, dout.options().dtype(wide ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "soft_prompt_embed_cpu_bwd", [&] {
    scalar_t* a = acc.data_ptr<scalar_t>();
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        scalar_t* ap = a + p * H;
        std::fill(ap, ap + H, scalar_t(0));
        for (int64_t b = 0; b < B; ++b) {
          const auto* src = row(b, p);
          for (int64_t h = 0; h < H; ++h) ap[h] += static_cast<scalar_t>(src[h]);
        }
      }
    });
  });
  return acc.scalar_type() == prompt_dtype ? acc : acc.to(prompt_dtype);
}

// dweight: the token rows of dout added into their ids' rows, fp32 (fp64 for fp64) accumulation, in token order.
template <typename scalar_t>
at::Tensor weight_grad(const at::Tensor& dout, const at::Tensor& ids, const at::Tensor& slots, int64_t V, int64_t P) {
  const int64_t B = dout.size(0), T = dout.size(1), H = dout.size(2), S = ids.size(1);
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor acc = at::zeros({V, H}, dout.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* a = acc.data_ptr<acc_t>();
  const scalar_t* d = dout.const_data_ptr<scalar_t>();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int32_t* sp = slots.defined() ? slots.const_data_ptr<int32_t>() : nullptr;
  const int64_t slot_stride = slots.defined() && slots.size(0) > 1 ? T : 0;
  // Token s's output position: the reference scatters t into its token index (the last such t wins).
  std::vector<int64_t> pos(S);
  for (int64_t b = 0; b < B; ++b) {
    if (sp == nullptr) {
      for (int64_t s = 0; s < S; ++s) pos[s] = P + s;
    } else {
      std::fill(pos.begin(), pos.end(), int64_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const int64_t v = sp[b * slot_stride + t];
        if (v >= 0 && v < S) pos[v] = t;
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      const scalar_t* src = d + (b * T + pos[s]) * H;
      acc_t* dst = a + id[b * S + s] * H;
      for (int64_t h = 0; h < H; ++h) dst[h] += static_cast<acc_t>(src[h]);
    }
  }
  return acc.to(dout.scalar_type());
}

struct SoftPromptFunction : public torch::autograd::Function<SoftPromptFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input_ids, const at::Tensor& weight,
                            const at::Tensor& prompt, const std::optional<at::Tensor>& slots,
                            const std::optional<at::Tensor>& vpos) {
    at::Tensor out = soft_prompt_embed_forward_cpu(input_ids, weight, prompt, slots, vpos);
    const bool has_slots = slots.has_value() && slots->defined();
    ctx->save_for_backward({ids_int64(input_ids), has_slots ? slots->contiguous() : at::Tensor(),
                            has_slots && vpos.has_value() && vpos->defined() ? vpos->contiguous() : at::Tensor()});
    ctx->saved_data["V"] = weight.size(0);
    ctx->saved_data["P"] = prompt.size(-2);
    ctx->saved_data["batched"] = prompt.dim() == 3;
    ctx->saved_data["prompt_dtype"] = static_cast<int64_t>(prompt.scalar_type());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor dout = grads[0].contiguous();
    const int64_t V = ctx->saved_data["V"].toInt(), P = ctx->saved_data["P"].toInt();
    const auto prompt_dtype = static_cast<at::ScalarType>(ctx->saved_data["prompt_dtype"].toInt());
    // needs_input_grad counts tensor inputs: ids 0, weight 1, prompt 2.
    at::Tensor dweight, dprompt;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dout.scalar_type(), "soft_prompt_embed_cpu_bwd", [&] {
      if (ctx->needs_input_grad(1)) dweight = weight_grad<scalar_t>(dout, saved[0], saved[1], V, P);
      if (ctx->needs_input_grad(2))
        dprompt = prompt_grad<scalar_t>(dout, saved[2], P, ctx->saved_data["batched"].toBool(), prompt_dtype);
    });
    return {at::Tensor(), dweight, dprompt, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor soft_prompt_embed_autograd(const at::Tensor& input_ids, const at::Tensor& weight, const at::Tensor& prompt,
                                      const std::optional<at::Tensor>& slots, const std::optional<at::Tensor>& vpos) {
  return SoftPromptFunction::apply(input_ids, weight, prompt, slots, vpos);
}

}  // namespace peft_kernels
