// Prefix attention over concatenated keys on CPU tensors as one autograd node (see peft_kernels/prefix.h). At the
// sizes of a CPU step the Python composition's host time (a torch.autograd.Function, the layout checks, five ATen
// calls through Python) is several times the attention's own; here it is one call.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <limits>

#include "peft_kernels/check.h"
#include "peft_kernels/prefix.h"

namespace peft_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// [prefix; t] along the sequence by one at::cat (contiguous), the prefix in t's dtype. The Python backend keeps
// t's physical layout (a large dK/dV then comes back in it); at the sizes of a CPU step the number of ATen calls
// is the cost, and the dK/dV slices are copied into k's layout either way. The flash kernel's results do not
// depend on the layout (tested bit-identical to the Python backend in both).
at::Tensor concat_kv(const at::Tensor& t, const at::Tensor& prefix) {
  at::Tensor pre = prefix.scalar_type() == t.scalar_type() ? prefix : prefix.to(t.scalar_type());
  if (pre.dim() == 3) pre = pre.expand({t.size(0), t.size(1), pre.size(1), pre.size(2)});
  return at::cat({pre, t}, 2);
}

// The strides torch.empty_like(ref) gives (preserve_format).
std::vector<int64_t> empty_like_strides(const at::Tensor& ref) {
  if (ref.is_non_overlapping_and_dense()) return ref.strides().vec();
  return at::empty_like(ref, ref.options().device(at::kMeta)).strides().vec();
}

// t in ref's layout (the op's contract: outputs and gradients laid out like the inputs): t itself where it has it
// and owns its storage, else a copy.
at::Tensor like(const at::Tensor& t, const at::Tensor& ref) {
  if (t.sizes() == ref.sizes() && t.strides() == at::IntArrayRef(empty_like_strides(ref)) &&
      t.storage_offset() == 0 && t.storage().nbytes() == static_cast<size_t>(t.numel()) * t.element_size()) {
    return t;
  }
  return at::empty_like(ref, t.options()).copy_(t);
}

at::ScalarType acc_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// The additive mask over [prefix; k] (0 or -inf, in q's dtype): the P prefix keys always visible, the real ones
// bottom-right causal (the CPU flash op aligns is_causal top-left) and/or padded ([B, Lk] bool, true = a real
// token). [B or 1, 1, Lq or 1, P + Lk] as the Python backend's `_additive_mask` makes it, value for value; undefined
// where nothing is masked. Filled by one loop: at a CPU step's sizes ATen calls are the cost.
at::Tensor prefix_mask(const at::Tensor& q, int64_t P, int64_t Lk, bool causal, const at::Tensor& padding) {
  causal = causal && q.size(2) > 1;  // one query row sees every key: causal is no mask there
  if (!causal && !padding.defined()) return at::Tensor();
  const int64_t Lq = q.size(2), T = P + Lk, B = padding.defined() ? q.size(0) : 1, rows = causal ? Lq : 1;
  const at::Tensor keep = padding.defined() ? padding.contiguous() : at::Tensor();
  const bool* real = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  at::Tensor mask = at::empty({B, 1, rows, T}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_mask", [&] {
    scalar_t* m = mask.data_ptr<scalar_t>();
    const scalar_t zero(0), hidden(-std::numeric_limits<float>::infinity());
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t last = causal ? i + T - Lq : T - 1;  // the last key row i sees (bottom-right alignment)
        scalar_t* row = m + (b * rows + i) * T;
        for (int64_t j = 0; j < T; ++j) {
          row[j] = j < P || (j <= last && (real == nullptr || real[b * Lk + j - P])) ? zero : hidden;
        }
      }
    }
  });
  return mask;
}

struct PrefixConcatFunction : public torch::autograd::Function<PrefixConcatFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& prefix_k, const at::Tensor& prefix_v, bool causal,
                            const std::optional<at::Tensor>& padding, double scale) {
    const at::Tensor K = concat_kv(k, prefix_k), V = concat_kv(v, prefix_v);
    // (padding as an optional: no gradient, and autograd's argument scan takes no undefined tensor)
    const at::Tensor mask = prefix_mask(q, prefix_k.size(-2), k.size(2), causal, padding.value_or(at::Tensor()));
    const std::optional<at::Tensor> attn_mask = mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt;
    auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, K, V, 0.0, false, attn_mask, scale);
    out = like(out, q);
    lse = lse.contiguous();
    // [prefix; k] and [prefix; v] kept for the backward (as autograd keeps SDPA's inputs over a torch.cat), not
    // rebuilt there: at these sizes ATen calls are the backward's cost. Of k and v only their layouts.
    ctx->save_for_backward({q, prefix_k, prefix_v, out, lse, K, V, mask});
    ctx->saved_data["k_strides"] = empty_like_strides(k);
    ctx->saved_data["v_strides"] = empty_like_strides(v);
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &prefix_k = saved[1], &prefix_v = saved[2], &out = saved[3], &lse = saved[4],
               &K = saved[5], &V = saved[6], &mask = saved[7];
    const double scale = ctx->saved_data["scale"].toDouble();
    std::array<bool, 5> need{};
    for (size_t i = 0; i < need.size(); ++i) need[i] = ctx->needs_input_grad(i);
    at::Tensor dq, dk, dv, dpk, dpv;
    at::Tensor dout = grads[0];
    if (!dout.defined() || std::none_of(need.begin(), need.end(), [](bool b) { return b; })) {
      return {dq, dk, dv, dpk, dpv, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    if (dout.stride(-1) != 1) dout = dout.contiguous();  // the flash kernel reads rows of the head dim
    const int64_t P = prefix_k.size(-2), Lk = K.size(2) - P;
    const std::optional<at::Tensor> attn_mask = mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt;
    auto [gq, gK, gV] = at::_scaled_dot_product_flash_attention_for_cpu_backward(dout, q, K, V, out, lse, 0.0,
                                                                                  false, attn_mask, scale);
    const auto acc = acc_dtype(q.scalar_type());
    auto prefix_grad = [&](const at::Tensor& g, const at::Tensor& prefix) {
      const at::Tensor rows = g.narrow(2, 0, P);
      const at::Tensor d = prefix.dim() == 3 ? rows.sum(0, false, acc) : at::empty_like(prefix).copy_(rows);
      return d.scalar_type() == prefix.scalar_type() ? d : d.to(prefix.scalar_type());
    };
    if (need[0]) dq = like(gq, q);
    // dk, dv: copies of the slices (never their own storage) in k's and v's layouts, as torch.empty_like makes.
    auto real_rows = [&](const at::Tensor& g, const char* strides) {
      const at::Tensor rows = g.narrow(2, P, Lk);
      return at::empty_strided(rows.sizes(), ctx->saved_data[strides].toIntVector(), rows.options()).copy_(rows);
    };
    if (need[1]) dk = real_rows(gK, "k_strides");
    if (need[2]) dv = real_rows(gV, "v_strides");
    if (need[3]) dpk = prefix_grad(gK, prefix_k);
    if (need[4]) dpv = prefix_grad(gV, prefix_v);
    return {dq, dk, dv, dpk, dpv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor prefix_concat_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& prefix_k, const at::Tensor& prefix_v, bool causal,
                                            const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const at::Tensor padding = key_padding_mask.has_value() ? *key_padding_mask : at::Tensor();
  PK_CHECK(!padding.defined() || (padding.scalar_type() == at::kBool && padding.dim() == 2 &&
                                  padding.size(0) == q.size(0) && padding.size(1) == k.size(2) &&
                                  padding.device().is_cpu()),
           "prefix_concat_attention_autograd: key_padding_mask must be a CPU bool [B, Lk] tensor");
  PK_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && prefix_k.device().is_cpu() &&
               prefix_v.device().is_cpu(),
           "prefix_concat_attention_autograd takes CPU tensors");
  PK_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
               q.size(3) == k.size(3) && (prefix_k.dim() == 3 || prefix_k.dim() == 4) &&
               prefix_v.sizes() == prefix_k.sizes() && prefix_k.size(-3) == k.size(1) &&
               prefix_k.size(-1) == k.size(3) && (prefix_k.dim() == 3 || prefix_k.size(0) == k.size(0)),
           "prefix_concat_attention_autograd: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], prefix [(B,) Hkv, P, D]");
  return PrefixConcatFunction::apply(q, k, v, prefix_k, prefix_v, causal,
                                     padding.defined() ? std::optional<at::Tensor>(padding) : std::nullopt, scale);
}

}  // namespace peft_kernels
