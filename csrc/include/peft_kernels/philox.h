// The library's dropout mask, shared by the CPU and CUDA kernels (definition: peft_kernels/ops/dropout_mask.py).
//
// Element (i, j) of a rows x cols activation takes word j % 4 of Philox-4x32-10 with key = the two halves of
// the 64-bit seed and counter (j / 4, i, 0, 0) -- one Philox call gives the keep bits of four neighbouring
// columns -- turned into a float in [0, 1) as Triton's uint_to_uniform_float does; it is kept iff u >= p.
// The Triton kernels compute the same words with tl.philox(seed, j // 4, i, 0, 0), so every backend
// regenerates the same mask and no mask is ever stored.
#pragma once
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

// Triton's uint_to_uniform_float for 32-bit words: a float in [0, 1).
PK_HOST_DEVICE float philox_word_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;  // == -x - 1 without signed overflow
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Keep bits of columns 4q .. 4q+3 of row `row` (bit c set: column 4q + c kept).
PK_HOST_DEVICE unsigned dropout_keep4(uint64_t seed, uint64_t row, uint64_t q, float p) {
  const PhiloxWords r = philox4(seed, static_cast<uint32_t>(q), static_cast<uint32_t>(row));
  unsigned bits = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int c = 0; c < 4; ++c) bits |= (philox_word_to_uniform(r.w[c]) >= p ? 1u : 0u) << c;
  return bits;
}

}  // namespace peft_kernels
