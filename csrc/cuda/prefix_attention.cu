// Prefix attention forward (Prefix-Tuning / P-Tuning v2), FlashAttention-2 style, in CUDA C++.
//
//   out = softmax(q [Pk; k]^T * scale + mask) [Pv; v],   lse = logsumexp of the same scores (natural log, fp32)
//
// Semantics (the same as peft_kernels/ops/prefix_attention.py): every query sees all P prefix keys; among the
// real keys, key_padding_mask[b, j] (True = real token) must hold and, when causal, query i sees key j iff
// j <= i + Lk - Lq (bottom-right aligned). GQA: query head h reads kv head h / (Hq / Hkv). The prefix is
// [Hkv, P, D] (shared by the batch: read with batch stride 0) or [B, Hkv, P, D]. The concatenated K/V are never
// built: the prefix tiles are read from the prefix tensors, then the real tiles from k/v.
//
// Design, chosen to be simple and obviously correct rather than maximally fast:
// * One thread block of 4 warps (128 threads) per (64-query tile, batch * head). Warp w owns query rows
//   [16w, 16w + 16) of the tile; lanes 2r and 2r+1 of a warp share row r of that slab (even/odd columns).
// * K/V tiles of 64 keys are staged in shared memory (zero-filled outside the valid rows and beyond the
//   head dim D, which is padded up to kD in {64, 80, 96, 128}), first the P prefix keys, then the real keys up
//   to the causal edge of the query tile (tiles past it are skipped).
// * fp16/bf16: S = Q K^T and O += P V on tensor cores with nvcuda::wmma 16x16x16 (fp32 accumulate). The fp32
//   accumulator O lives in shared memory (WMMA fragment layouts are opaque, and the online softmax must rescale
//   O per row), so each tile does: S -> smem (fp32); per-row masked online softmax in fp32 (base 2), writing
//   P in the input dtype and rescaling O's rows; then O is loaded into accumulator fragments, P V is added and
//   O is stored back. fp32: the same tiles and smem layout with plain FMA loops (SIMT) instead of WMMA.
// * Shared memory (dynamic; > 48 KB so the limit is raised with cudaFuncSetAttribute): Q, K, V tiles
//   [64][kD + pad] in the input dtype, S [64][68] fp32, P [64][72] input dtype, O [64][kD + 4] fp32, plus 64
//   key flags and 64 row scales: 70 / 80 / 90 / 110 KiB for fp16/bf16 with kD = 64 / 80 / 96 / 128 (2-3 blocks
//   per H100 SM), 100 / 116 / 132 / 164 KiB for fp32 (1-2 blocks per SM).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>

#include "peft_kernels/check.h"

namespace peft_kernels {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Per input dtype: the raw storage type staged in shared memory (16-bit types are copied as their bits, so one
// loader serves fp16 and bf16), the WMMA element type, and the fp32 -> storage conversion.
template <typename scalar_t>
struct Traits;

template <>
struct Traits<at::Half> {
  using bits_t = uint16_t;
  using mma_t = __half;
  static constexpr bool kWmma = true;
  static __device__ __forceinline__ bits_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

template <>
struct Traits<at::BFloat16> {
  using bits_t = uint16_t;
  using mma_t = __nv_bfloat16;
  static constexpr bool kWmma = true;
  static __device__ __forceinline__ bits_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

template <>
struct Traits<float> {
  using bits_t = float;
  using mma_t = float;  // unused: fp32 takes the SIMT path
  static constexpr bool kWmma = false;
  static __device__ __forceinline__ bits_t from_float(float x) { return x; }
};

constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

template <typename scalar_t, int kD_>
struct FwdConfig {
  using Tr = Traits<scalar_t>;
  using bits_t = typename Tr::bits_t;
  static constexpr bool kWmma = Tr::kWmma;
  static constexpr int kD = kD_;            // padded head dim (a multiple of 16)
  static constexpr int kBlockM = 64;        // query rows per block
  static constexpr int kBlockN = 64;        // keys per K/V tile
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpRows = kBlockM / kWarps;  // 16: one WMMA row block per warp
  static_assert(kWarpRows == 16, "each warp owns one 16-row slab");
  static_assert(kD % 16 == 0 && kD <= 128, "padded head dim must be a multiple of 16, at most 128");
  // Row strides (elements). WMMA needs ldm % 8 == 0 for 16-bit types and % 4 for fp32, and 32-byte aligned
  // fragment pointers (every fragment offset below is a multiple of 16 elements / 16 rows). The SIMT path pads Q/K/V
  // rows by one float so that lanes reading K[lane][d] hit distinct banks (kD + 1 is odd).
  static constexpr int kLdT = kD + (kWmma ? 8 : 1);      // sQ, sK, sV
  static constexpr int kLdS = kBlockN + 4;               // sS (fp32 scores)
  static constexpr int kLdP = kBlockN + (kWmma ? 8 : 4);  // sP (probabilities, storage type)
  static constexpr int kLdO = kD + 4;                    // sO (fp32 output accumulator)
  static constexpr int kChunk = kWmma ? 8 : 1;           // elements per loader step (8 x 16-bit = 16 bytes)
  static_assert(kD % kChunk == 0, "loader chunks must tile the padded head dim");
  static_assert(!kWmma || (kLdT * sizeof(bits_t)) % 16 == 0, "16-byte smem stores need 16-byte row strides");

  static constexpr size_t kOffQ = 0;
  static constexpr size_t kOffK = align128(kOffQ + size_t(kBlockM) * kLdT * sizeof(bits_t));
  static constexpr size_t kOffV = align128(kOffK + size_t(kBlockN) * kLdT * sizeof(bits_t));
  static constexpr size_t kOffS = align128(kOffV + size_t(kBlockN) * kLdT * sizeof(bits_t));
  static constexpr size_t kOffP = align128(kOffS + size_t(kBlockM) * kLdS * sizeof(float));
  static constexpr size_t kOffO = align128(kOffP + size_t(kBlockM) * kLdP * sizeof(bits_t));
  static constexpr size_t kOffKeyOk = align128(kOffO + size_t(kBlockM) * kLdO * sizeof(float));
  static constexpr size_t kOffInvL = align128(kOffKeyOk + size_t(kBlockN));
  static constexpr size_t kSmemBytes = align128(kOffInvL + size_t(kBlockM) * sizeof(float));
};

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* pk;
  const void* pv;
  const bool* mask;  // [B, Lk] or nullptr
  void* out;         // [B, Hq, Lq, D] contiguous, q's dtype
  float* lse;        // [B, Hq, Lq] contiguous
  // Element strides of (batch, head, sequence); the head dim has unit stride.
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t pk_sb, pk_sh, pk_sl;  // pk_sb = 0 for a shared [Hkv, P, D] prefix
  int64_t pv_sb, pv_sh, pv_sl;
  int64_t mask_sb, mask_sl;
  int Hq, group;  // group = Hq / Hkv
  int Lq, Lk, P, D;
  float scale_log2;  // scale * log2(e): scores are handled in base 2
  bool causal;
  bool vec;  // every q/k/v/prefix row is 16-byte aligned (D % 8 == 0): 16-byte loads
};

// Copies rows [0, rows_valid) x cols [0, D) of a 64-row tile from global memory (row stride in elements, unit
// column stride) into smem [64][kLdT]; everything else (rows past the end, columns D..kD) becomes zero.
template <typename Cfg>
__device__ __forceinline__ void load_tile(typename Cfg::bits_t* __restrict__ s,
                                          const typename Cfg::bits_t* __restrict__ g, int64_t row_stride,
                                          int rows_valid, int D, bool vec) {
  using bits_t = typename Cfg::bits_t;
  constexpr int kChunksPerRow = Cfg::kD / Cfg::kChunk;
  constexpr int kTotal = 64 * kChunksPerRow;
  for (int idx = threadIdx.x; idx < kTotal; idx += Cfg::kThreads) {
    const int r = idx / kChunksPerRow;
    const int c = (idx - r * kChunksPerRow) * Cfg::kChunk;
    bits_t* dst = s + r * Cfg::kLdT + c;
    bool done = false;
    if constexpr (Cfg::kChunk == 8) {
      if (vec && r < rows_valid && c + 8 <= D) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(g + r * row_stride + c);
        done = true;
      }
    }
    if (!done) {
#pragma unroll
      for (int e = 0; e < Cfg::kChunk; ++e) {
        dst[e] = (r < rows_valid && c + e < D) ? g[r * row_stride + c + e] : bits_t(0);
      }
    }
  }
}

struct Smem {
  void* q;
  void* k;
  void* v;
  float* s;
  void* p;
  float* o;
  unsigned char* key_ok;
  float* inv_l;
};

// One K/V tile of 64 keys: stage it, S = Q K^T, online softmax, O = O * alpha + P V.
//   g_k/g_v point at the tile's first key row; rows_valid = keys left in this phase (prefix or real);
//   mask_row (real keys only) points at key_padding_mask[b, n0] with stride mask_sl, or is nullptr;
//   causal_limit: key column c of this tile is visible to this lane's query row iff c <= causal_limit
//   (INT_MAX when no causal rule applies, e.g. the prefix phase).
template <typename Cfg>
__device__ __forceinline__ void process_tile(const Smem& sm, const typename Cfg::bits_t* g_k,
                                             const typename Cfg::bits_t* g_v, int64_t k_sl, int64_t v_sl,
                                             int rows_valid, const bool* mask_row, int64_t mask_sl,
                                             int64_t causal_limit, const FwdParams& p, float& m_run,
                                             float& l_run) {
  using bits_t = typename Cfg::bits_t;
  constexpr int kD = Cfg::kD;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  bits_t* sQ = static_cast<bits_t*>(sm.q);
  bits_t* sK = static_cast<bits_t*>(sm.k);
  bits_t* sV = static_cast<bits_t*>(sm.v);
  bits_t* sP = static_cast<bits_t*>(sm.p);

  __syncthreads();  // every warp is done reading the previous tile's sK/sV/key flags
  load_tile<Cfg>(sK, g_k, k_sl, rows_valid, p.D, p.vec);
  load_tile<Cfg>(sV, g_v, v_sl, rows_valid, p.D, p.vec);
  for (int c = threadIdx.x; c < Cfg::kBlockN; c += Cfg::kThreads) {
    bool ok = c < rows_valid;
    if (ok && mask_row != nullptr) ok = mask_row[c * mask_sl];
    sm.key_ok[c] = ok ? 1 : 0;
  }
  __syncthreads();  // sK/sV/key flags (and, on the first tile, sQ and the zeroed sO) visible to all warps

  const int row0 = warp * Cfg::kWarpRows;  // this warp's first row in the tile
  float* sSw = sm.s + row0 * Cfg::kLdS;
  bits_t* sPw = sP + row0 * Cfg::kLdP;
  float* sOw = sm.o + row0 * Cfg::kLdO;
  const bits_t* sQw = sQ + row0 * Cfg::kLdT;

  // ---- S[16 x 64] = Q[16 x kD] K[64 x kD]^T (unscaled, fp32) ----
  if constexpr (Cfg::kWmma) {
    using namespace nvcuda;
    using mma_t = typename Cfg::Tr::mma_t;
    const mma_t* q_m = reinterpret_cast<const mma_t*>(sQw);
    const mma_t* k_m = reinterpret_cast<const mma_t*>(sK);
#pragma unroll
    for (int n = 0; n < Cfg::kBlockN / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::row_major> a;
        // B = K^T [kD x 64]: B(d, j) = K[j][d] = sK[j * kLdT + d], i.e. column-major with ldm = kLdT.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::col_major> bf;
        wmma::load_matrix_sync(a, q_m + kk * 16, Cfg::kLdT);
        wmma::load_matrix_sync(bf, k_m + n * 16 * Cfg::kLdT + kk * 16, Cfg::kLdT);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(sSw + n * 16, acc, Cfg::kLdS, wmma::mem_row_major);
    }
  } else {
    // Lane owns key columns `lane` and `lane + 32` for all 16 rows.
    float acc0[Cfg::kWarpRows], acc1[Cfg::kWarpRows];
#pragma unroll
    for (int r = 0; r < Cfg::kWarpRows; ++r) acc0[r] = acc1[r] = 0.f;
    const bits_t* k0 = sK + lane * Cfg::kLdT;
    const bits_t* k1 = sK + (lane + 32) * Cfg::kLdT;
#pragma unroll 4
    for (int d = 0; d < kD; ++d) {
      const float kv0 = k0[d], kv1 = k1[d];
#pragma unroll
      for (int r = 0; r < Cfg::kWarpRows; ++r) {
        const float qv = sQw[r * Cfg::kLdT + d];
        acc0[r] = fmaf(qv, kv0, acc0[r]);
        acc1[r] = fmaf(qv, kv1, acc1[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < Cfg::kWarpRows; ++r) {
      sSw[r * Cfg::kLdS + lane] = acc0[r];
      sSw[r * Cfg::kLdS + lane + 32] = acc1[r];
    }
  }
  __syncwarp();  // S visible to every lane of the warp

  // ---- online softmax over this tile (base 2, fp32); lanes 2r, 2r+1 own row r: columns 2j + sub ----
  {
    const int row = lane >> 1;
    const int sub = lane & 1;
    const float* srow = sSw + row * Cfg::kLdS;
    float s[Cfg::kBlockN / 2];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < Cfg::kBlockN / 2; ++j) {
      const int c = 2 * j + sub;
      const bool ok = sm.key_ok[c] != 0 && c <= causal_limit;
      s[j] = ok ? srow[c] * p.scale_log2 : -INFINITY;
      mx = fmaxf(mx, s[j]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_run, mx);
    // A row with nothing visible yet keeps m = -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
    // (Cannot happen after the prefix phase, since P >= 1 and the prefix is always visible; kept for safety.)
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_run - m_use);  // 0 on the first tile (m_run = -inf)
    bits_t* prow = sPw + row * Cfg::kLdP;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < Cfg::kBlockN / 2; ++j) {
      const float pj = exp2f(s[j] - m_use);  // masked: exp2(-inf) = 0
      sum += pj;
      prow[2 * j + sub] = Cfg::Tr::from_float(pj);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    float* orow = sOw + row * Cfg::kLdO;
#pragma unroll
    for (int j = sub; j < kD; j += 2) orow[j] *= alpha;
  }
  __syncwarp();  // P and the rescaled O visible to every lane of the warp

  // ---- O[16 x kD] += P[16 x 64] V[64 x kD] ----
  if constexpr (Cfg::kWmma) {
    using namespace nvcuda;
    using mma_t = typename Cfg::Tr::mma_t;
    const mma_t* p_m = reinterpret_cast<const mma_t*>(sPw);
    const mma_t* v_m = reinterpret_cast<const mma_t*>(sV);
#pragma unroll
    for (int n = 0; n < kD / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, sOw + n * 16, Cfg::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < Cfg::kBlockN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::row_major> a;
        // B = V [64 x kD]: B(j, d) = sV[j * kLdT + d], row-major with ldm = kLdT.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::row_major> bf;
        wmma::load_matrix_sync(a, p_m + kk * 16, Cfg::kLdP);
        wmma::load_matrix_sync(bf, v_m + kk * 16 * Cfg::kLdT + n * 16, Cfg::kLdT);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(sOw + n * 16, acc, Cfg::kLdO, wmma::mem_row_major);
    }
  } else {
    // Lane owns output column d0 + lane for all 16 rows.
#pragma unroll
    for (int d0 = 0; d0 < kD; d0 += 32) {
      const int d = d0 + lane;
      if (d < kD) {
        float acc[Cfg::kWarpRows];
#pragma unroll
        for (int r = 0; r < Cfg::kWarpRows; ++r) acc[r] = 0.f;
#pragma unroll 4
        for (int c = 0; c < Cfg::kBlockN; ++c) {
          const float vv = sV[c * Cfg::kLdT + d];
#pragma unroll
          for (int r = 0; r < Cfg::kWarpRows; ++r) acc[r] = fmaf(sPw[r * Cfg::kLdP + c], vv, acc[r]);
        }
#pragma unroll
        for (int r = 0; r < Cfg::kWarpRows; ++r) sOw[r * Cfg::kLdO + d] += acc[r];
      }
    }
  }
  __syncwarp();  // O written by the warp before any lane reads it (next tile's rescale, or the epilogue)
}

template <typename scalar_t, int kD>
__global__ void __launch_bounds__(FwdConfig<scalar_t, kD>::kThreads)
    prefix_attention_fwd_kernel(const FwdParams p) {
  using Cfg = FwdConfig<scalar_t, kD>;
  using bits_t = typename Cfg::bits_t;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem sm;
  sm.q = smem_raw + Cfg::kOffQ;
  sm.k = smem_raw + Cfg::kOffK;
  sm.v = smem_raw + Cfg::kOffV;
  sm.s = reinterpret_cast<float*>(smem_raw + Cfg::kOffS);
  sm.p = smem_raw + Cfg::kOffP;
  sm.o = reinterpret_cast<float*>(smem_raw + Cfg::kOffO);
  sm.key_ok = smem_raw + Cfg::kOffKeyOk;
  sm.inv_l = reinterpret_cast<float*>(smem_raw + Cfg::kOffInvL);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // 32-bit index math here (B * Hq <= INT_MAX is checked on the host); 64-bit for every element offset below.
  const int bh32 = static_cast<int>(blockIdx.x);  // b * Hq + h
  const int64_t bh = bh32;
  const int64_t b = bh32 / p.Hq;
  const int64_t h = bh32 % p.Hq;
  const int64_t hk = static_cast<int>(h) / p.group;
  const int m0 = static_cast<int>(blockIdx.y) * Cfg::kBlockM;

  // Q tile (zero rows past Lq), O = 0.
  const bits_t* q = static_cast<const bits_t*>(p.q) + b * p.q_sb + h * p.q_sh + m0 * p.q_sl;
  load_tile<Cfg>(static_cast<bits_t*>(sm.q), q, p.q_sl, min(p.Lq - m0, Cfg::kBlockM), p.D, p.vec);
  for (int idx = threadIdx.x; idx < Cfg::kBlockM * Cfg::kLdO; idx += Cfg::kThreads) sm.o[idx] = 0.f;
  // (the __syncthreads at the top of the first process_tile publishes sQ and sO)

  const int row_local = warp * Cfg::kWarpRows + (lane >> 1);  // this lane's row in the tile
  const int64_t qi = static_cast<int64_t>(m0) + row_local;    // its query index (may be >= Lq: not stored)
  float m_run = -INFINITY;
  float l_run = 0.f;

  // Phase 1: the P prefix keys, all visible.
  {
    const bits_t* pk = static_cast<const bits_t*>(p.pk) + b * p.pk_sb + hk * p.pk_sh;
    const bits_t* pv = static_cast<const bits_t*>(p.pv) + b * p.pv_sb + hk * p.pv_sh;
    for (int n0 = 0; n0 < p.P; n0 += Cfg::kBlockN) {
      process_tile<Cfg>(sm, pk + n0 * p.pk_sl, pv + n0 * p.pv_sl, p.pk_sl, p.pv_sl, p.P - n0, nullptr, 0,
                        INT_MAX, p, m_run, l_run);
    }
  }

  // Phase 2: the real keys, up to the causal edge of this query tile.
  {
    const int64_t offset = static_cast<int64_t>(p.Lk) - p.Lq;  // query i sees key j iff j <= i + offset
    int64_t n_end = p.Lk;
    if (p.causal) {
      const int64_t last_q = min(static_cast<int64_t>(m0) + Cfg::kBlockM, static_cast<int64_t>(p.Lq)) - 1;
      n_end = max(static_cast<int64_t>(0), min(n_end, last_q + offset + 1));
    }
    const bits_t* k = static_cast<const bits_t*>(p.k) + b * p.k_sb + hk * p.k_sh;
    const bits_t* v = static_cast<const bits_t*>(p.v) + b * p.v_sb + hk * p.v_sh;
    const bool* mask = p.mask != nullptr ? p.mask + b * p.mask_sb : nullptr;
    for (int n0 = 0; n0 < n_end; n0 += Cfg::kBlockN) {
      const int64_t limit = p.causal ? qi + offset - n0 : static_cast<int64_t>(INT_MAX);
      process_tile<Cfg>(sm, k + n0 * p.k_sl, v + n0 * p.v_sl, p.k_sl, p.v_sl, p.Lk - n0,
                        mask != nullptr ? mask + n0 * p.mask_sl : nullptr, p.mask_sl, limit, p, m_run, l_run);
    }
  }

  // Epilogue: lse = (m + log2 l) ln 2; out = O / l. Lanes 2r, 2r+1 hold identical (m, l) for row r.
  if ((lane & 1) == 0) {
    const bool any = l_run > 0.f;
    sm.inv_l[row_local] = any ? 1.f / l_run : 0.f;
    if (qi < p.Lq) p.lse[bh * p.Lq + qi] = any ? (m_run + log2f(l_run)) * kLn2 : -INFINITY;
  }
  __syncwarp();  // inv_l of the warp's rows visible to the whole warp (O was published by process_tile)
  bits_t* out = static_cast<bits_t*>(p.out) + bh * p.Lq * p.D;
  for (int r = 0; r < Cfg::kWarpRows; ++r) {
    const int rr = warp * Cfg::kWarpRows + r;
    const int64_t i = static_cast<int64_t>(m0) + rr;
    if (i >= p.Lq) break;
    const float inv = sm.inv_l[rr];
    const float* orow = sm.o + rr * Cfg::kLdO;
    for (int d = lane; d < p.D; d += 32) out[i * p.D + d] = Cfg::Tr::from_float(orow[d] * inv);
  }
}

// Launches one (dtype, padded head dim) instantiation.
template <typename scalar_t, int kD>
void launch_fwd(const FwdParams& p, int64_t batch_heads, int64_t m_tiles, cudaStream_t stream) {
  using Cfg = FwdConfig<scalar_t, kD>;
  auto kernel = prefix_attention_fwd_kernel<scalar_t, kD>;
  const size_t smem = Cfg::kSmemBytes;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  PK_CHECK(smem <= props->sharedMemPerBlockOptin, "prefix_attention_fwd_cuda: needs ", smem,
           " bytes of shared memory per block, the device allows ", props->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(batch_heads), static_cast<unsigned>(m_tiles));
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_head_dim(const FwdParams& p, int64_t batch_heads, int64_t m_tiles, cudaStream_t stream) {
  if (p.D <= 64) {
    launch_fwd<scalar_t, 64>(p, batch_heads, m_tiles, stream);
  } else if (p.D <= 80) {
    launch_fwd<scalar_t, 80>(p, batch_heads, m_tiles, stream);
  } else if (p.D <= 96) {
    launch_fwd<scalar_t, 96>(p, batch_heads, m_tiles, stream);
  } else {
    launch_fwd<scalar_t, 128>(p, batch_heads, m_tiles, stream);
  }
}

// (batch, head, sequence) strides of a [B, H, L, D] tensor, or of a shared [H, L, D] one (batch stride 0).
std::tuple<int64_t, int64_t, int64_t> bhl_strides(const at::Tensor& t) {
  if (t.dim() == 3) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// 16-byte loads are safe when the base is 16-byte aligned and every row start is too (strides of dims that
// are ever indexed, i.e. of size > 1, multiples of 8 elements of 2 bytes).
bool rows_16b_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * static_cast<int64_t>(t.element_size())) % 16 != 0) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& prefix_k,
                                                             const at::Tensor& prefix_v, bool causal,
                                                             const std::optional<at::Tensor>& key_padding_mask,
                                                             double scale) {
  constexpr const char* op = "prefix_attention_fwd_cuda: ";
  PK_CHECK(q.dim() == 4, op, "q must be 4-D [B, Hq, Lq, D], got ", q.dim(), "-D");
  PK_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(), op, "k and v must be 4-D [B, Hkv, Lk, D] of ",
           "equal shape, got ", k.sizes(), " and ", v.sizes());
  PK_CHECK((prefix_k.dim() == 3 || prefix_k.dim() == 4) && prefix_k.sizes() == prefix_v.sizes(), op,
           "prefix_k and prefix_v must be [Hkv, P, D] or [B, Hkv, P, D] of equal shape, got ", prefix_k.sizes(),
           " and ", prefix_v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), P = prefix_k.size(-2);
  PK_CHECK(k.size(0) == B && k.size(3) == D, op, "k of shape ", k.sizes(), " does not match q of shape ", q.sizes());
  PK_CHECK(Hkv > 0 && Hq % Hkv == 0, op, "q has ", Hq, " heads, k has ", Hkv,
           "; the query heads must be a multiple of the KV heads");
  PK_CHECK(prefix_k.size(-3) == Hkv && prefix_k.size(-1) == D && (prefix_k.dim() == 3 || prefix_k.size(0) == B),
           op, "prefix_k of shape ", prefix_k.sizes(), " does not match k of shape ", k.sizes());
  PK_CHECK(P >= 1, op, "prefix_k has no virtual tokens (P = 0)");
  PK_CHECK(D >= 1 && D <= 128, op, "head dim D = ", D, " is not supported (1 <= D <= 128)");
  const auto dtype = q.scalar_type();
  PK_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
           "q must be float16, bfloat16 or float32, got ", dtype);
  const at::Tensor* named[] = {&q, &k, &v, &prefix_k, &prefix_v};
  const char* names[] = {"q", "k", "v", "prefix_k", "prefix_v"};
  for (int i = 0; i < 5; ++i) {
    const at::Tensor& t = *named[i];
    PK_CHECK(t.is_cuda() && t.device() == q.device(), op, names[i], " must be a CUDA tensor on ", q.device(),
             ", got ", t.device());
    PK_CHECK(t.scalar_type() == dtype, op, names[i], " has dtype ", t.scalar_type(), ", expected q's ", dtype);
    PK_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, op, names[i], " must have a unit-stride last dim, got strides ",
             t.strides());
  }
  const bool has_mask = key_padding_mask.has_value() && key_padding_mask->defined();
  if (has_mask) {
    const auto& m = *key_padding_mask;
    PK_CHECK(m.scalar_type() == at::kBool, op, "key_padding_mask must be bool, got ", m.scalar_type());
    PK_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == Lk, op, "key_padding_mask must be [B, Lk] = [", B, ", ",
             Lk, "], got ", m.sizes());
    PK_CHECK(m.is_cuda() && m.device() == q.device(), op, "key_padding_mask must be on ", q.device());
  }
  PK_CHECK(Lq <= INT_MAX && Lk <= INT_MAX && P <= INT_MAX, op, "sequence lengths must fit in 32 bits, got Lq = ", Lq,
           ", Lk = ", Lk, ", P = ", P);
  PK_CHECK(scale > 0.0, op, "scale must be positive, got ", scale);

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({B, Hq, Lq, D}, q.options());
  auto lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  const int64_t batch_heads = B * Hq;
  const int64_t m_tiles = (Lq + 63) / 64;
  if (batch_heads == 0 || Lq == 0) return {out, lse};
  PK_CHECK(batch_heads <= INT_MAX, op, "B * Hq = ", batch_heads, " exceeds the grid limit");
  PK_CHECK(m_tiles <= 65535, op, "Lq = ", Lq, " exceeds the grid limit (", 65535 * 64, " queries)");

  FwdParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.pk = prefix_k.const_data_ptr();
  p.pv = prefix_v.const_data_ptr();
  p.mask = has_mask ? key_padding_mask->const_data_ptr<bool>() : nullptr;
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  std::tie(p.pk_sb, p.pk_sh, p.pk_sl) = bhl_strides(prefix_k);
  std::tie(p.pv_sb, p.pv_sh, p.pv_sl) = bhl_strides(prefix_v);
  p.mask_sb = has_mask ? key_padding_mask->stride(0) : 0;
  p.mask_sl = has_mask ? key_padding_mask->stride(1) : 0;
  p.Hq = static_cast<int>(Hq);
  p.group = static_cast<int>(Hq / Hkv);
  p.Lq = static_cast<int>(Lq);
  p.Lk = static_cast<int>(Lk);
  p.P = static_cast<int>(P);
  p.D = static_cast<int>(D);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.causal = causal;
  p.vec = dtype != at::kFloat && D % 8 == 0;
  for (const at::Tensor* t : named) p.vec = p.vec && rows_16b_aligned(*t);

  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(dtype, "prefix_attention_fwd_cuda",
                     AT_DISPATCH_CASE(at::kHalf, [&] { dispatch_head_dim<scalar_t>(p, batch_heads, m_tiles, stream); })
                     AT_DISPATCH_CASE(at::kBFloat16,
                                      [&] { dispatch_head_dim<scalar_t>(p, batch_heads, m_tiles, stream); })
                     AT_DISPATCH_CASE(at::kFloat,
                                      [&] { dispatch_head_dim<scalar_t>(p, batch_heads, m_tiles, stream); }));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) { m.impl("prefix_attention_fwd_cuda", &prefix_attention_fwd_cuda); }

}  // namespace peft_kernels
