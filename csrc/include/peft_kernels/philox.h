// The library's dropout mask, shared by the CPU and CUDA kernels (definition: peft_kernels/ops/dropout_mask.py).
//
// Element (i, j) of a rows x cols activation takes 16 bits of Philox-4x32-10 with key = the two halves of
// the 64-bit seed and counter (j / 8, i, 0, 0): word (j % 8) / 2, its low half for even j, its high half for
// odd j -- one Philox call gives the keep decisions of eight neighbouring columns. It is kept iff those 16
// bits >= keep_threshold(p) = floor(p * 65536 + 0.5) (p quantized to 2^-16).
// The Triton kernels compute the same words with tl.philox(seed, j // 8, i, 0, 0), so every backend
// regenerates the same mask and no mask is ever stored.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PK_HOST_DEVICE inline
#endif

namespace peft_kernels {

PK_HOST_DEVICE uint32_t philox_umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct PhiloxWords {
  uint32_t w[4];
};

// Philox-4x32-10 at counter (c0, c1, 0, 0), key (seed mod 2^32, seed >> 32).
PK_HOST_DEVICE PhiloxWords philox4(uint64_t seed, uint32_t c0, uint32_t c1) {
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = philox_umulhi(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = philox_umulhi(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The 16-bit keep threshold of drop probability p (p * 65536 is exact in double): kept iff bits >= it.
inline uint32_t keep_threshold(double p) {
  if (!(p > 0.0)) return 0;  // also NaN: keep everything
  const double t = std::floor(p * 65536.0 + 0.5);
  return t >= 65536.0 ? 65536u : static_cast<uint32_t>(t);
}

// Keep bits of columns 8q .. 8q+7 of row `row` (bit c set: column 8q + c kept); threshold from keep_threshold.
PK_HOST_DEVICE unsigned dropout_keep8(uint64_t seed, uint64_t row, uint64_t q, uint32_t threshold) {
  const PhiloxWords r = philox4(seed, static_cast<uint32_t>(q), static_cast<uint32_t>(row));
  unsigned bits = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int w = 0; w < 4; ++w) {
    bits |= ((r.w[w] & 0xFFFFu) >= threshold ? 1u : 0u) << (2 * w);
    bits |= ((r.w[w] >> 16) >= threshold ? 1u : 0u) << (2 * w + 1);
  }
  return bits;
}

}  // namespace peft_kernels
