// CPU kernels of the Philox dropout (the mask of peft_kernels/philox.h, as the Triton kernels draw it) and
// the fp32-accumulated column sum.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "peft_kernels/check.h"
#include "peft_kernels/philox.h"

namespace peft_kernels {
namespace {

// Applies f(offset, kept) to every element of a contiguous rows x cols tensor, one Philox call per eight
// columns of a row (the mask definition of peft_kernels/philox.h).
template <typename F>
void for_each_keep(int64_t rows, int64_t cols, uint64_t seed, double p, const F& f) {
  const uint32_t threshold = keep_threshold(p);
  const int64_t groups = (cols + 7) / 8;
  at::parallel_for(0, rows * groups, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t i = g / groups, q = g % groups;
      const unsigned bits = dropout_keep8(seed, static_cast<uint64_t>(i), static_cast<uint64_t>(q), threshold);
      const int64_t j0 = 8 * q, j1 = std::min<int64_t>(cols, j0 + 8);
      for (int64_t j = j0; j < j1; ++j) f(i * cols + j, ((bits >> (j - j0)) & 1u) != 0);
    }
  });
}

at::Tensor philox_dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  PK_CHECK(x.dim() == 2, "philox_dropout: x must be 2-D, got ", x.dim(), "-D");
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const int64_t rows = xc.size(0), cols = xc.size(1);
  const double scale = p < 1.0 ? 1.0 / (1.0 - p) : 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "philox_dropout_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_keep(rows, cols, static_cast<uint64_t>(seed), p, [&](int64_t k, bool keep) {
      o[k] = keep ? static_cast<scalar_t>(static_cast<opmath_t>(in[k]) * static_cast<opmath_t>(scale)) : scalar_t(0);
    });
  });
  return out;
}

void philox_dropout_add_cpu(at::Tensor& out, const at::Tensor& src, double p, int64_t seed) {
  PK_CHECK(out.dim() == 2 && src.sizes() == out.sizes(), "philox_dropout_add_: out and src must be equal 2-D");
  PK_CHECK(out.is_contiguous(), "philox_dropout_add_: out must be contiguous");
  const double scale = p < 1.0 ? 1.0 / (1.0 - p) : 0.0;
  // src is cast to out's dtype first: it is an M x K product, small next to the GEMMs around it.
  auto s2 = src.to(out.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "philox_dropout_add_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* in = s2.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_keep(out.size(0), out.size(1), static_cast<uint64_t>(seed), p, [&](int64_t k, bool keep) {
      if (keep) {
        o[k] = static_cast<scalar_t>(static_cast<opmath_t>(o[k]) +
                                     static_cast<opmath_t>(in[k]) * static_cast<opmath_t>(scale));
      }
    });
  });
}

at::Tensor column_sum_cpu(const at::Tensor& x, std::optional<at::ScalarType> out_dtype) {
  PK_CHECK(x.dim() == 2, "column_sum: x must be 2-D, got ", x.dim(), "-D");
  auto xc = x.contiguous();
  const int64_t rows = xc.size(0), cols = xc.size(1);
  const auto acc_dtype = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto acc = at::zeros({cols}, xc.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "column_sum_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;  // float for half/bf16/float, double for double
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    opmath_t* a = acc.mutable_data_ptr<opmath_t>();
    // Parallel over column blocks; each thread walks all rows of its block (rows are contiguous in memory).
    at::parallel_for(0, cols, 256, [&](int64_t c0, int64_t c1) {
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* row = in + r * cols;
        for (int64_t c = c0; c < c1; ++c) a[c] += static_cast<opmath_t>(row[c]);
      }
    });
  });
  return acc.to(out_dtype.value_or(x.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("philox_dropout", &philox_dropout_cpu);
  m.impl("philox_dropout_add_", &philox_dropout_add_cpu);
  m.impl("column_sum", &column_sum_cpu);
}

}  // namespace peft_kernels
