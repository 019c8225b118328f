// The library's dropout mask, shared by the CPU and CUDA kernels.
//
// It reproduces Triton's tl.rand(seed, offset) bit for bit (Philox-4x32, 10 rounds, key = the two halves
// of the 64-bit seed, counter = (offset mod 2^32, 0, 0, 0), first word, uint_to_uniform_float), so every
// backend regenerates the same mask from (seed, offset) and no mask is ever stored.
// Element (i, j) of an M x K input uses offset i * K + j; it is kept iff u >= p.
// The definition lives in peft_kernels/ops/dropout_mask.py; the Triton kernels pass uint32 offsets.
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

PK_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = 0, c2 = 0, c3 = 0;
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
  return c0;
}

// Triton's uint_to_uniform_float for 32-bit words: a float in [0, 1).
PK_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset) {
  int32_t x = static_cast<int32_t>(philox_first_word(seed, offset));
  if (x < 0) x = ~x;  // == -x - 1 without signed overflow
  return static_cast<float>(x) * 4.6566127342e-10f;
}

PK_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, float p) {
  return philox_uniform(seed, offset) >= p;
}

}  // namespace peft_kernels
