// Distillation loss on CPU tensors: the `cpp` backend of peft_kernels/ops/distill.py (its math, masks and
// reductions are documented there; this is the closed form of its reference backend, `reference_rows`, written
// as one loop per row instead of ~40 ATen calls).
//
// Why: at the sizes a CPU step sees (a few rows, a small vocabulary) the reference's host time is its ATen calls;
// here the whole forward (label check, row counts, losses, gradient, reduction) is one C++ call, and the eager
// path is one C++ autograd node whose backward only scales the saved gradient. Per row: one pass for the maxima,
// one for the exponential sums, one for the divergence (and, for forward KL, the gradient), and for reverse KL /
// JSD one more for the gradient (it needs the row's divergence). Rows run in parallel (at::parallel_for).
//
// Numerics follow the reference step by step (fp32 math for fp16/bf16/fp32, fp64 for fp64; log_softmax as
// (x - max) - log(sum exp(x - max)); the same masked_fill rules: 0 log 0 = 0 for a -inf entry, NaN and +inf
// propagate). Rows that carry neither term are never read (they may hold garbage) and get a zero gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>
#include <vector>

#include "peft_kernels/check.h"
#include "peft_kernels/distill.h"

namespace peft_kernels {
namespace {

constexpr int64_t kMean = 0, kNone = 2;
constexpr int64_t kForwardKL = 0, kReverseKL = 1;

// max that propagates NaN (as ATen's reductions do), so a NaN row gives a NaN loss.
template <typename acc_t>
inline acc_t nan_max(acc_t m, acc_t x) {
  return (x > m || x != x) ? x : m;
}

// torch.logaddexp: -inf + -inf stays -inf (and inf + inf stays inf) instead of NaN.
template <typename acc_t>
inline acc_t log_add_exp(acc_t a, acc_t b) {
  if (std::isinf(a) && a == b) return a;
  const acc_t m = std::max(a, b);
  return m + std::log1p(std::exp(-std::abs(a - b)));
}

struct Params {
  int64_t N, V, ss0, ss1, ts0, ts1, gs0, gs1;
  double T;
  int64_t divergence;
  double beta;
  bool has_labels, need_grad;
};

template <typename scalar_t, typename tscalar_t>
void distill_rows(const Params& P, const scalar_t* s, const tscalar_t* t, const int64_t* labels, const bool* kd_on,
                  const bool* ce_on, double kd_w_value, double ce_w_value, scalar_t* grad, void* loss_rows_ptr) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* loss_rows = static_cast<acc_t*>(loss_rows_ptr);
  const int64_t V = P.V;
  const acc_t inv_t = static_cast<acc_t>(1.0 / P.T);
  const acc_t T = static_cast<acc_t>(P.T);
  const acc_t kd_w = static_cast<acc_t>(kd_w_value), ce_w = static_cast<acc_t>(ce_w_value);
  const acc_t kd_loss_w = kd_w * static_cast<acc_t>(P.T * P.T);
  const acc_t kd_grad_w = kd_w * T;
  const acc_t beta = static_cast<acc_t>(P.beta), one_minus_beta = static_cast<acc_t>(1.0 - P.beta);
  const acc_t log_beta = static_cast<acc_t>(std::log(P.beta)), log1m_beta = static_cast<acc_t>(std::log1p(-P.beta));
  const bool t_is_one = P.T == 1.0, t_is_two = P.T == 2.0;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));

  // Rows go in chunks through three stages: (1) per row, the maxima and the shifted logits x - max of its softmaxes
  // into buffers (s/T, t/T, and s at T != 1, 2); (2) their exponentials, by ATen's vectorized exp over the whole
  // chunk (libm's scalar expf per element was most of the loop's time); (3) per row, the sums, the divergence, the
  // loss and the gradient from the buffers. Stage 3 does not read s: the gradient may overwrite it (in_place).
  const bool want_c = P.has_labels && !t_is_one;
  const bool own_c = want_c && !t_is_two;  // T = 2: exp(s - max s) is the square of exp(s/2 - max(s/2)), exactly
  const int64_t nb = own_c ? 3 : 2;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(P.N, (int64_t{1} << 18) / std::max<int64_t>(V, 1)));
  const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor xbuf = at::empty({nb, chunk, V}, acc_opts), ebuf = at::empty({nb, chunk, V}, acc_opts);
  acc_t* X = xbuf.data_ptr<acc_t>();
  acc_t* E = ebuf.data_ptr<acc_t>();
  const int64_t plane = chunk * V;
  for (int64_t c0 = 0; c0 < P.N; c0 += chunk) {
    const int64_t c1 = std::min(P.N, c0 + chunk), rows = c1 - c0;
    at::parallel_for(c0, c1, grain, [&](int64_t begin, int64_t end) {
      for (const auto i : c10::irange(begin, end)) {
        const scalar_t* sr = s + i * P.ss0;
        const tscalar_t* tr = t + i * P.ts0;
        acc_t* xs = X + (i - c0) * V;
        acc_t* xt = xs + plane;
        acc_t* xc = xt + plane;
        const bool kd = kd_on[i], active = kd || ce_on[i];
        // A NaN the maximum skips still reaches the row sum (exp(NaN - m) is NaN): the row's loss is NaN.
        acc_t ms = ninf, mt = ninf, mc = ninf;
        if (active) {
          for (int64_t v = 0; v < V; ++v) {
            const acc_t x = static_cast<acc_t>(sr[v * P.ss1]);
            ms = nan_max(ms, x * inv_t);
            if (own_c) mc = nan_max(mc, x);
            if (kd) mt = nan_max(mt, static_cast<acc_t>(tr[v * P.ts1]) * inv_t);
          }
        }
        // Rows (or softmaxes) not needed get zeros: their exponentials are computed with the chunk's, never read.
        for (int64_t v = 0; v < V; ++v) {
          const acc_t x = active ? static_cast<acc_t>(sr[v * P.ss1]) : acc_t(0);
          xs[v] = active ? x * inv_t - ms : acc_t(0);
          xt[v] = kd ? static_cast<acc_t>(tr[v * P.ts1]) * inv_t - mt : acc_t(0);
          if (own_c) xc[v] = active ? x - mc : acc_t(0);
        }
      }
    });
    if (rows * V * nb >= 2048) {
      for (int64_t b = 0; b < nb; ++b) {  // contiguous [rows, V] of each plane
        at::Tensor out = ebuf[b].narrow(0, 0, rows);
        at::exp_out(out, xbuf[b].narrow(0, 0, rows));
      }
    } else {
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t k = 0; k < rows * V; ++k) E[b * plane + k] = std::exp(X[b * plane + k]);
    }
    at::parallel_for(c0, c1, grain, [&](int64_t begin, int64_t end) {
      for (const auto i : c10::irange(begin, end)) {
        const acc_t* xs = X + (i - c0) * V;
        const acc_t* xt = xs + plane;
        const acc_t* xc = xt + plane;
        const acc_t* es = E + (i - c0) * V;
        const acc_t* et = es + plane;
        const acc_t* ec = et + plane;
        scalar_t* gr = P.need_grad ? grad + i * P.gs0 : nullptr;
        const bool kd = kd_on[i], ce = ce_on[i];
        if (!kd && !ce) {
          loss_rows[i] = acc_t(0);
          if (gr)
            for (int64_t v = 0; v < V; ++v) gr[v * P.gs1] = scalar_t(0);
          continue;
        }
        acc_t zs = 0, zt = 0, zc = 0;
#pragma omp simd reduction(+ : zs)
        for (int64_t v = 0; v < V; ++v) zs += es[v];
        if (kd) {
#pragma omp simd reduction(+ : zt)
          for (int64_t v = 0; v < V; ++v) zt += et[v];
        }
        if (want_c) {
          if (own_c) {
#pragma omp simd reduction(+ : zc)
            for (int64_t v = 0; v < V; ++v) zc += ec[v];
          } else {
#pragma omp simd reduction(+ : zc)
            for (int64_t v = 0; v < V; ++v) zc += es[v] * es[v];
          }
        }
        const acc_t lzs = std::log(zs), lzt = std::log(zt), lzc = std::log(zc);
        const acc_t rzs = acc_t(1) / zs, rzt = acc_t(1) / zt, rzc = acc_t(1) / zc;
        // log_softmax as (x - max) - log(sum exp(x - max)), as ATen's; probabilities from the kept exponentials
        // (the reference exponentiates the log-probabilities: the same value to an ulp; a -inf entry gives 0).
        auto log_q_at = [&](int64_t v) { return xs[v] - lzs; };
        auto log_p_at = [&](int64_t v) { return xt[v] - lzt; };
        auto log_c_at = [&](int64_t v) {
          return t_is_one ? xs[v] - lzs : (own_c ? xc[v] : xs[v] * acc_t(2)) - lzc;
        };
        auto q_at = [&](int64_t v) { return es[v] * rzs; };
        auto p_at = [&](int64_t v) { return et[v] * rzt; };
        auto c_at = [&](int64_t v) { return t_is_one ? es[v] * rzs : (own_c ? ec[v] : es[v] * es[v]) * rzc; };
        const int64_t lab = ce ? labels[i] : 0;
        const acc_t cw = ce ? ce_w : acc_t(0);  // a row without a label has weight 0 (its c * 0 is added, as there)
        const acc_t ce_term = ce ? log_c_at(lab) * -cw : acc_t(0);
        // The gradient of the hard-label term at entry v (added after the divergence's, as the reference does).
        auto ce_grad = [&](acc_t g, int64_t v) {
          if (!P.has_labels) return g;
          g = g + c_at(v) * cw;
          if (v == lab) g = g + -cw;
          return g;
        };
        acc_t div = 0, kq = 0;
        if (P.divergence == kForwardKL && kd) {
          // The common case in branch-free loops the compiler vectorizes: the divergence, then the gradient with
          // the label's entry fixed up after (the same arithmetic, in the same order, as ce_grad).
#pragma omp simd reduction(+ : div)
          for (int64_t v = 0; v < V; ++v) {
            const acc_t lq = xs[v] - lzs, lp = xt[v] - lzt;
            div += lp == ninf ? acc_t(0) : (lp - lq) * (et[v] * rzt);
          }
          if (gr) {
            scalar_t* g1 = P.gs1 == 1 ? gr : nullptr;
            if (g1 != nullptr && P.has_labels) {
              if (own_c || t_is_one) {
                const acc_t* cexp = t_is_one ? es : ec;
                const acc_t rc = t_is_one ? rzs : rzc;
#pragma omp simd
                for (int64_t v = 0; v < V; ++v)
                  g1[v] = static_cast<scalar_t>((es[v] * rzs - et[v] * rzt) * kd_grad_w + (cexp[v] * rc) * cw);
              } else {
#pragma omp simd
                for (int64_t v = 0; v < V; ++v)
                  g1[v] = static_cast<scalar_t>((es[v] * rzs - et[v] * rzt) * kd_grad_w + (es[v] * es[v] * rzc) * cw);
              }
              g1[lab] = static_cast<scalar_t>(ce_grad((q_at(lab) - p_at(lab)) * kd_grad_w, lab));
            } else if (g1 != nullptr) {
#pragma omp simd
              for (int64_t v = 0; v < V; ++v) g1[v] = static_cast<scalar_t>((es[v] * rzs - et[v] * rzt) * kd_grad_w);
            } else {
              for (int64_t v = 0; v < V; ++v)
                gr[v * P.gs1] = static_cast<scalar_t>(ce_grad((q_at(v) - p_at(v)) * kd_grad_w, v));
            }
          }
        } else if (P.divergence == kForwardKL) {
          for (int64_t v = 0; v < V; ++v) {
            if (kd) {
              const acc_t lq = log_q_at(v), lp = log_p_at(v);
              const acc_t p = p_at(v);
              div += lp == ninf ? acc_t(0) : (lp - lq) * p;
              if (gr) gr[v * P.gs1] = static_cast<scalar_t>(ce_grad((q_at(v) - p) * kd_grad_w, v));
            } else if (gr) {
              gr[v * P.gs1] = static_cast<scalar_t>(ce_grad(acc_t(0), v));
            }
          }
        } else {
          if (kd) {
            for (int64_t v = 0; v < V; ++v) {
              const acc_t lq = log_q_at(v), lp = log_p_at(v);
              const acc_t q = q_at(v);
              if (P.divergence == kReverseKL) {
                div += lq == ninf ? acc_t(0) : (lq - lp) * q;
              } else {
                const acc_t lm = log_add_exp(lp + log_beta, lq + log1m_beta);
                kq += lq == ninf ? acc_t(0) : (lq - lm) * q;
                div += lp == ninf ? acc_t(0) : (lp - lm) * p_at(v);  // kp, combined below
              }
            }
            if (P.divergence != kReverseKL) div = beta * div + one_minus_beta * kq;
          }
          if (gr) {
            for (int64_t v = 0; v < V; ++v) {
              acc_t g = 0;
              if (kd) {
                const acc_t lq = log_q_at(v), lp = log_p_at(v);
                const acc_t q = q_at(v);
                if (P.divergence == kReverseKL) {
                  g = q == acc_t(0) ? acc_t(0) : ((lq - lp) - div) * q;
                } else {
                  const acc_t lm = log_add_exp(lp + log_beta, lq + log1m_beta);
                  g = q == acc_t(0) ? acc_t(0) : ((lq - lm) - kq) * q;
                  g = g * one_minus_beta;
                }
                g = g * kd_grad_w;
              }
              gr[v * P.gs1] = static_cast<scalar_t>(ce_grad(g, v));
            }
          }
        }
        acc_t row_loss = kd ? div * kd_loss_w : acc_t(0);
        if (P.has_labels) row_loss = row_loss + ce_term;
        loss_rows[i] = row_loss;
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> distill_loss_forward_cpu(const at::Tensor& s_in, const at::Tensor& t_in,
                                                            const std::optional<at::Tensor>& labels_in,
                                                            const std::optional<at::Tensor>& kd_mask_in,
                                                            double temperature, double alpha, int64_t ignore_index,
                                                            int64_t reduction, int64_t divergence, double beta,
                                                            bool need_grad, bool in_place) {
  PK_CHECK(s_in.device().is_cpu() && t_in.device().is_cpu(), "distill_loss_forward_cpu takes CPU tensors");
  PK_CHECK(s_in.dim() == 2 && t_in.sizes() == s_in.sizes(), "distill_loss_forward_cpu: s and t must be [N, V]");
  const int64_t N = s_in.size(0), V = s_in.size(1);
  const at::ScalarType acc_type = s_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // A teacher of another dtype is read in the compute dtype (as the reference upcasts it).
  const at::Tensor t = (t_in.scalar_type() == s_in.scalar_type() || t_in.scalar_type() == acc_type)
                           ? t_in : t_in.to(acc_type);
  const bool has_labels = labels_in.has_value() && labels_in->defined();
  const bool has_mask = kd_mask_in.has_value() && kd_mask_in->defined();
  at::Tensor labels, kd_mask;
  if (has_labels) {
    PK_CHECK(labels_in->numel() == N, "distill_loss_forward_cpu: labels must have N entries");
    labels = labels_in->scalar_type() == at::kLong ? labels_in->contiguous() : labels_in->to(at::kLong).contiguous();
  }
  if (has_mask) {
    PK_CHECK(kd_mask_in->numel() == N && kd_mask_in->scalar_type() == at::kBool,
             "distill_loss_forward_cpu: kd_mask must be N bools");
    kd_mask = kd_mask_in->contiguous();
  }
  // Row flags and counts, and the label range check (a ValueError naming the op, as the Python check gives).
  std::vector<uint8_t> flags(2 * static_cast<size_t>(N));
  bool* kd_on = reinterpret_cast<bool*>(flags.data());
  bool* ce_on = kd_on + N;
  const int64_t* lab = has_labels ? labels.data_ptr<int64_t>() : nullptr;
  const bool* mask = has_mask ? kd_mask.data_ptr<bool>() : nullptr;
  int64_t n_kd = 0, n_ce = 0, n_bad = 0, first_bad = 0;
  for (int64_t i = 0; i < N; ++i) {
    const bool c = has_labels && lab[i] != ignore_index;
    if (c && (lab[i] < 0 || lab[i] >= V)) {
      if (n_bad++ == 0) first_bad = lab[i];
    }
    ce_on[i] = c;
    kd_on[i] = has_mask ? mask[i] : (has_labels ? c : true);
    n_kd += kd_on[i];
    n_ce += c;
  }
  TORCH_CHECK_VALUE(n_bad == 0, "distillation_loss: labels must be in [0, ", V,
                    ") (student_logits.shape[-1]) or equal ignore_index=", ignore_index, "; got ", first_bad, " (",
                    n_bad, " such labels)");
  const double w_kd = has_labels ? alpha : 1.0, w_ce = has_labels ? 1.0 - alpha : 0.0;
  // The per-row weights of the two terms, in the compute dtype as the reference forms them (w / count).
  double kd_w, ce_w;
  if (acc_type == at::kFloat) {
    kd_w = static_cast<float>(w_kd) / (reduction == kMean ? static_cast<float>(std::max<int64_t>(n_kd, 1)) : 1.0f);
    ce_w = static_cast<float>(w_ce) / (reduction == kMean ? static_cast<float>(std::max<int64_t>(n_ce, 1)) : 1.0f);
  } else {
    kd_w = w_kd / (reduction == kMean ? static_cast<double>(std::max<int64_t>(n_kd, 1)) : 1.0);
    ce_w = w_ce / (reduction == kMean ? static_cast<double>(std::max<int64_t>(n_ce, 1)) : 1.0);
  }
  at::Tensor ds;
  if (need_grad) {
    ds = in_place ? s_in : at::empty({N, V}, s_in.options());
  }
  at::Tensor loss_rows = at::empty({N}, s_in.options().dtype(acc_type));
  Params P{N, V, s_in.stride(0), s_in.stride(1), t.stride(0), t.stride(1),
           need_grad ? ds.stride(0) : 0, need_grad ? ds.stride(1) : 0,
           temperature, divergence, beta, has_labels, need_grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_in.scalar_type(), "distill_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* g = need_grad ? ds.data_ptr<scalar_t>() : nullptr;
    if (t.scalar_type() == s_in.scalar_type()) {
      distill_rows<scalar_t, scalar_t>(P, s_in.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), lab, kd_on,
                                       ce_on, kd_w, ce_w, g, loss_rows.data_ptr());
    } else {
      distill_rows<scalar_t, acc_t>(P, s_in.const_data_ptr<scalar_t>(), t.const_data_ptr<acc_t>(), lab, kd_on, ce_on,
                                    kd_w, ce_w, g, loss_rows.data_ptr());
    }
  });
  at::Tensor loss = reduction == kNone ? loss_rows : loss_rows.sum();
  return {loss, need_grad ? ds : at::empty({0}, s_in.options())};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The eager path: the forward above as one autograd node; its backward scales the saved gradient by the incoming
// one (the reference backward's math), with no Python in it. torch.compile traces the family's custom ops instead.
struct DistillLossFunction : public torch::autograd::Function<DistillLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& t,
                            const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& kd_mask,
                            double temperature, double alpha, int64_t ignore_index, int64_t reduction,
                            int64_t divergence, double beta, bool need_grad, bool in_place) {
    auto [loss, ds] = distill_loss_forward_cpu(s, t, labels, kd_mask, temperature, alpha, ignore_index, reduction,
                                               divergence, beta, need_grad, in_place);
    ctx->save_for_backward({ds});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor ds = ctx->get_saved_variables()[0];
    at::Tensor dloss = grads[0].scalar_type() == ds.scalar_type() ? grads[0] : grads[0].to(ds.scalar_type());
    at::Tensor ds_grad = dloss.dim() == 1 ? ds * dloss.unsqueeze(1) : ds * dloss;
    variable_list out(12);
    out[0] = ds_grad;
    return out;
  }
};

}  // namespace

at::Tensor distill_loss_autograd(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels,
                                 const std::optional<at::Tensor>& kd_mask, double temperature, double alpha,
                                 int64_t ignore_index, int64_t reduction, int64_t divergence, double beta,
                                 bool need_grad, bool in_place) {
  if (!need_grad) {  // nothing to differentiate: no node
    return std::get<0>(distill_loss_forward_cpu(s, t, labels, kd_mask, temperature, alpha, ignore_index, reduction,
                                                divergence, beta, false, false));
  }
  return DistillLossFunction::apply(s, t, labels, kd_mask, temperature, alpha, ignore_index, reduction, divergence,
                                    beta, need_grad, in_place);
}

}  // namespace peft_kernels
