// The CUDA C++ prefix-and-merge kernels of prefix attention and their host-side launch logic, with no CUDA host API
// in them: csrc/cuda/prefix_merge.cu launches them on the GPU (see its header for the math and the design), and
// the CPU tests run this same source with one std::thread per CUDA thread (tests/native/prefix_merge_emulation.cpp)
// since no GPU is at hand to run it. A translation unit defines the launcher; PK_SHARED_FLOATS may be predefined.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

#include "peft_kernels/check.h"

#ifndef PK_SHARED_FLOATS
#define PK_SHARED_FLOATS(name) extern __shared__ __align__(16) float name[]
#endif

namespace peft_kernels {
namespace prefix_merge {

struct Grid {
  unsigned x, y, z;
};


constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kFwdRows = 128;                    // forward: query rows per block, one thread each
constexpr int kBwdRows = 32;                     // backward: query rows per tile, one per lane
constexpr int kBwdWarps = 4;
constexpr int kBwdThreads = 32 * kBwdWarps;
constexpr int kBwdKeys = 8 * kBwdWarps;          // backward: prefix keys per chunk, 8 per warp
constexpr int kSplitRows = 512;                  // backward: query rows (times the GQA group) per block
constexpr int kMaxHeadDim = 256;

constexpr int round8(int x) { return (x + 7) / 8 * 8; }

// Shared-memory bytes of each kernel (the Python why_not mirrors these formulas).
inline size_t fwd_smem_bytes(int P, int D) { return sizeof(float) * static_cast<size_t>(P) * (round8(D) + kFwdRows); }
inline size_t bwd_smem_bytes(int D) {
  const size_t Dp = round8(D), Dq = Dp + 4;
  return sizeof(float) * (4 * kBwdKeys * Dp + 2 * kBwdRows * Dq + 2 * kBwdKeys * kBwdRows + kBwdWarps * kBwdRows);
}

// A 16-bit element type (c10::Half, c10::BFloat16) to and from its bits, through the types' own bit constructor and
// bits member: no type punning through pointers (which a compiler may assume does not alias; the CPU emulation's
// host compiler did).
template <typename T>
__device__ __forceinline__ float lo_half(uint32_t w) {
  return static_cast<float>(T(static_cast<uint16_t>(w & 0xFFFFu), T::from_bits()));
}

template <typename T>
__device__ __forceinline__ float hi_half(uint32_t w) {
  return static_cast<float>(T(static_cast<uint16_t>(w >> 16), T::from_bits()));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  return static_cast<uint32_t>(static_cast<T>(a).x) | (static_cast<uint32_t>(static_cast<T>(b).x) << 16);
}

// 8 consecutive head-dim elements [d0, d0 + 8) of a row as fp32: one 16-byte load (two for fp32) when `vec` (the
// host checked D % 8 == 0 and 16-byte aligned rows), element by element with the D boundary masked otherwise.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ row, int d0, int D, bool vec, float (&x)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + d0);
      x[0] = lo_half<T>(raw.x), x[1] = hi_half<T>(raw.x), x[2] = lo_half<T>(raw.y), x[3] = hi_half<T>(raw.y);
      x[4] = lo_half<T>(raw.z), x[5] = hi_half<T>(raw.z), x[6] = lo_half<T>(raw.w), x[7] = hi_half<T>(raw.w);
    } else {
      const float4 a = *reinterpret_cast<const float4*>(row + d0);
      const float4 b = *reinterpret_cast<const float4*>(row + d0 + 4);
      x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = d0 + j < D ? static_cast<float>(row[d0 + j]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ row, int d0, int D, bool vec, const float (&x)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      *reinterpret_cast<uint4*>(row + d0) =
          uint4{pack2<T>(x[0], x[1]), pack2<T>(x[2], x[3]), pack2<T>(x[4], x[5]), pack2<T>(x[6], x[7])};
    } else {
      *reinterpret_cast<float4*>(row + d0) = make_float4(x[0], x[1], x[2], x[3]);
      *reinterpret_cast<float4*>(row + d0 + 4) = make_float4(x[4], x[5], x[6], x[7]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (d0 + j < D) row[d0 + j] = static_cast<T>(x[j]);
    }
  }
}

// 8 fp32 values from 16-byte-aligned shared memory.
__device__ __forceinline__ void lds8(const float* p, float (&x)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}

__device__ __forceinline__ float dot8(const float (&a)[8], const float (&b)[8], float acc) {
#pragma unroll
  for (int j = 0; j < 8; ++j) acc = fmaf(a[j], b[j], acc);
  return acc;
}

// Rows [0, n) of a contiguous fp32 [*, D] prefix into shared memory [n][Dp], zero beyond D.
__device__ __forceinline__ void load_prefix(float* __restrict__ dst, const float* __restrict__ src, int n, int D,
                                            int Dp, int tid, int nthreads) {
  for (int i = tid; i < n * Dp; i += nthreads) {
    const int p = i / Dp, d = i - p * Dp;
    dst[i] = d < D ? src[static_cast<int64_t>(p) * D + d] : 0.f;
  }
}

struct FwdParams {
  const void* q;
  const float* pk;  // fp32 contiguous [(B,) Hkv, P, D]
  const float* pv;
  void* out;            // O_c in, merged O out
  const float* lse_c;   // [B, Hq, Lq], any strides
  float* lse;           // [B, Hq, Lq] contiguous
  int64_t q_sb, q_sh, q_sl, o_sb, o_sh, o_sl, c_sb, c_sh, c_sl;
  int64_t p_sb, p_sh;   // prefix batch stride (0: shared by the batch) and head stride
  int64_t Hq, Lq;
  int group, P, D, Dp;
  float scale_log2;
  bool vec;
};

template <typename T>
__global__ void __launch_bounds__(kFwdRows) prefix_merge_fwd_kernel(const FwdParams p) {
  PK_SHARED_FLOATS(smem);
  float* kv = smem;                                   // [P][Dp]: the prefix K, then the prefix V
  float* sc = smem + static_cast<int64_t>(p.P) * p.Dp;  // [P][kFwdRows]: base-2 scores, then exp2(s - m)
  const int tid = threadIdx.x;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kFwdRows + tid;
  const bool row_ok = i < p.Lq;
  const int64_t hk = h / p.group;
  const int64_t prefix_off = b * p.p_sb + hk * p.p_sh;
  const int64_t ir = row_ok ? i : 0;
  const T* qrow = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + ir * p.q_sl;
  T* orow = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + ir * p.o_sl;

  load_prefix(kv, p.pk + prefix_off, p.P, p.D, p.Dp, tid, kFwdRows);
  __syncthreads();

  // Scores, 8 keys at a time: each q chunk (from L1 after the first key group) meets 8 broadcast K rows.
  float m = -INFINITY;
  if (row_ok) {
    for (int p0 = 0; p0 < p.P; p0 += 8) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int d0 = 0; d0 < p.Dp; d0 += 8) {
        float x[8];
        load8(qrow, d0, p.D, p.vec, x);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          if (p0 + k < p.P) {
            float kr[8];
            lds8(kv + static_cast<int64_t>(p0 + k) * p.Dp + d0, kr);
            acc[k] = dot8(x, kr, acc[k]);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (p0 + k < p.P) {
          const float s2 = acc[k] * p.scale_log2;
          sc[(p0 + k) * kFwdRows + tid] = s2;
          m = fmaxf(m, s2);
        }
      }
    }
  }
  // Prefix softmax (base 2) and the merge weights; m is finite in valid rows (P >= 1, finite inputs).
  float l = 0.f;
  if (row_ok) {
    for (int k = 0; k < p.P; ++k) {
      const float e = exp2f(sc[k * kFwdRows + tid] - m);
      sc[k * kFwdRows + tid] = e;
      l += e;
    }
  }
  const float lse_p = m + log2f(l);
  const float lse_c = row_ok ? p.lse_c[b * p.c_sb + h * p.c_sh + i * p.c_sl] * kLog2e : -INFINITY;
  const bool has_c = lse_c > -INFINITY;
  const float mx = has_c ? fmaxf(lse_c, lse_p) : lse_p;
  const float lse = has_c ? mx + log2f(exp2f(lse_c - mx) + exp2f(lse_p - mx)) : lse_p;
  const float w_c = has_c ? exp2f(lse_c - lse) : 0.f;
  const float w_p = exp2f(m - lse);  // O_p = w_p * sum_k exp2(s_k - m) pv_k

  __syncthreads();  // every row is done with K
  load_prefix(kv, p.pv + prefix_off, p.P, p.D, p.Dp, tid, kFwdRows);
  __syncthreads();

  if (row_ok) {
    for (int d0 = 0; d0 < p.Dp; d0 += 8) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int k = 0; k < p.P; ++k) {
        const float e = sc[k * kFwdRows + tid];
        float vr[8];
        lds8(kv + static_cast<int64_t>(k) * p.Dp + d0, vr);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = fmaf(e, vr[j], acc[j]);
      }
      float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (has_c) load8(orow, d0, p.D, p.vec, o);  // never read where no real key is seen (0, NaN or garbage)
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = fmaf(w_c, o[j], w_p * acc[j]);
      store8(orow, d0, p.D, p.vec, o);
    }
    p.lse[(b * p.Hq + h) * p.Lq + i] = lse * kLn2;
  }
}

struct BwdParams {
  const void* q;
  const void* dout;
  const void* out;     // the merged output
  const float* lse;    // the merged lse, [B, Hq, Lq], any strides
  void* dq;            // SDPA's dq, updated in place
  const float* pk;     // fp32 contiguous [(B,) Hkv, P, D]
  const float* pv;
  float* dpk;          // fp32 partials [n_split, B, Hkv, P, D]
  float* dpv;
  int64_t q_sb, q_sh, q_sl, do_sb, do_sh, do_sl, o_sb, o_sh, o_sl, dq_sb, dq_sh, dq_sl, l_sb, l_sh, l_sl;
  int64_t p_sb, p_sh;
  int64_t B, Hkv, Lq, split_rows;
  int group, P, D, Dp, Dq;
  float scale, scale_log2;
  bool vec;
};

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) prefix_merge_bwd_kernel(const BwdParams p) {
  PK_SHARED_FLOATS(smem);
  const int Dp = p.Dp, Dq = p.Dq, nc = Dp / 8;
  float* ks = smem;                              // [kBwdKeys][Dp]  prefix K chunk
  float* vs = ks + kBwdKeys * Dp;                // [kBwdKeys][Dp]  prefix V chunk
  float* dks = vs + kBwdKeys * Dp;               // [kBwdKeys][Dp]  dpk accumulator (unscaled)
  float* dvs = dks + kBwdKeys * Dp;              // [kBwdKeys][Dp]  dpv accumulator
  float* qt = dvs + kBwdKeys * Dp;               // [kBwdRows][Dq]  q tile (row pad: conflict-free row reads)
  float* dot = qt + kBwdRows * Dq;               // [kBwdRows][Dq]  dO tile
  float* s1 = dot + kBwdRows * Dq;               // [kBwdKeys][kBwdRows]  p
  float* s2 = s1 + kBwdKeys * kBwdRows;          // [kBwdKeys][kBwdRows]  ds
  float* part = s2 + kBwdKeys * kBwdRows;        // [kBwdWarps][kBwdRows] delta partials
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int64_t lo = split * p.split_rows;
  const int64_t hi = lo + p.split_rows < p.Lq ? lo + p.split_rows : p.Lq;
  const int64_t prefix_off = b * p.p_sb + hk * p.p_sh;
  const T* Q = static_cast<const T*>(p.q);
  const T* DO = static_cast<const T*>(p.dout);
  const T* O = static_cast<const T*>(p.out);
  T* DQ = static_cast<T*>(p.dq);

  for (int pc0 = 0; pc0 < p.P; pc0 += kBwdKeys) {
    const int nk = p.P - pc0 < kBwdKeys ? p.P - pc0 : kBwdKeys;
    __syncthreads();  // the previous chunk's partials are written out
    load_prefix(ks, p.pk + prefix_off + static_cast<int64_t>(pc0) * p.D, nk, p.D, Dp, tid, kBwdThreads);
    load_prefix(vs, p.pv + prefix_off + static_cast<int64_t>(pc0) * p.D, nk, p.D, Dp, tid, kBwdThreads);
    for (int e = tid; e < kBwdKeys * Dp; e += kBwdThreads) dks[e] = 0.f, dvs[e] = 0.f;

    for (int j = 0; j < p.group; ++j) {
      const int64_t h = hk * p.group + j;
      for (int64_t t0 = lo; t0 < hi; t0 += kBwdRows) {
        __syncthreads();  // the previous tile's readers are done with qt, dot, s1, s2, part
        // q and dO tiles in fp32, zero rows past the split (their p and ds come out 0 below).
        for (int e = tid; e < kBwdRows * nc; e += kBwdThreads) {
          const int r = e / nc, d0 = (e - r * nc) * 8;
          const int64_t i = t0 + r;
          float x[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          float g[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          if (i < hi) {
            load8(Q + b * p.q_sb + h * p.q_sh + i * p.q_sl, d0, p.D, p.vec, x);
            load8(DO + b * p.do_sb + h * p.do_sh + i * p.do_sl, d0, p.D, p.vec, g);
          }
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) qt[r * Dq + d0 + jj] = x[jj], dot[r * Dq + d0 + jj] = g[jj];
        }
        __syncthreads();
        const int r = lane;
        const int64_t i = t0 + r;
        const bool ok = i < hi;
        {  // delta = rowsum(dO O), split over the warps by head-dim chunk
          float acc = 0.f;
          if (ok) {
            const T* orow = O + b * p.o_sb + h * p.o_sh + i * p.o_sl;
            for (int c = warp; c < nc; c += kBwdWarps) {
              float o[8], g[8];
              load8(orow, c * 8, p.D, p.vec, o);
              lds8(dot + r * Dq + c * 8, g);
              acc = dot8(o, g, acc);
            }
          }
          part[warp * kBwdRows + r] = acc;
        }
        __syncthreads();
        {  // p and ds for keys [8 warp, 8 warp + 8) of the chunk, row = lane
          float delta = 0.f;
#pragma unroll
          for (int w = 0; w < kBwdWarps; ++w) delta += part[w * kBwdRows + r];
          const int k0 = warp * 8;
          float sa[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          float da[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          if (ok && k0 < nk) {
            for (int d0 = 0; d0 < Dp; d0 += 8) {
              float x[8], g[8];
              lds8(qt + r * Dq + d0, x);
              lds8(dot + r * Dq + d0, g);
#pragma unroll
              for (int k = 0; k < 8; ++k) {
                if (k0 + k < nk) {
                  float kr[8], vr[8];
                  lds8(ks + (k0 + k) * Dp + d0, kr);
                  lds8(vs + (k0 + k) * Dp + d0, vr);
                  sa[k] = dot8(x, kr, sa[k]);
                  da[k] = dot8(g, vr, da[k]);
                }
              }
            }
          }
          const float lse2 = ok ? p.lse[b * p.l_sb + h * p.l_sh + i * p.l_sl] * kLog2e : 0.f;
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            float pr = 0.f, ds = 0.f;
            if (ok && k0 + k < nk) {
              pr = exp2f(sa[k] * p.scale_log2 - lse2);
              ds = pr * (da[k] - delta);
            }
            s1[(k0 + k) * kBwdRows + r] = pr;
            s2[(k0 + k) * kBwdRows + r] = ds;
          }
        }
        __syncthreads();
        // dq += scale * ds pk: row = lane, head-dim chunks split over the warps. The same thread updates the
        // same dq elements in every key chunk, so the read-modify-write needs no synchronisation.
        if (ok) {
          T* dqrow = DQ + b * p.dq_sb + h * p.dq_sh + i * p.dq_sl;
          for (int c = warp; c < nc; c += kBwdWarps) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int k = 0; k < nk; ++k) {
              const float ds = s2[k * kBwdRows + r];
              float kr[8];
              lds8(ks + k * Dp + c * 8, kr);
#pragma unroll
              for (int jj = 0; jj < 8; ++jj) acc[jj] = fmaf(ds, kr[jj], acc[jj]);
            }
            float g[8];
            load8(dqrow, c * 8, p.D, p.vec, g);
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) g[jj] = fmaf(p.scale, acc[jj], g[jj]);
            store8(dqrow, c * 8, p.D, p.vec, g);
          }
        }
        // dpk += ds^T q, dpv += p^T dO over the tile's rows; each (key, chunk) item has one owner thread for the
        // whole key chunk, so the shared-memory accumulation needs no atomics.
        for (int e = tid; e < nk * nc; e += kBwdThreads) {
          const int k = e / nc, d0 = (e - k * nc) * 8;
          float ak[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          float av[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          for (int rr = 0; rr < kBwdRows; ++rr) {
            const float ds = s2[k * kBwdRows + rr], pr = s1[k * kBwdRows + rr];
            float x[8], g[8];
            lds8(qt + rr * Dq + d0, x);
            lds8(dot + rr * Dq + d0, g);
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) ak[jj] = fmaf(ds, x[jj], ak[jj]), av[jj] = fmaf(pr, g[jj], av[jj]);
          }
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) dks[k * Dp + d0 + jj] += ak[jj], dvs[k * Dp + d0 + jj] += av[jj];
        }
      }
    }
    __syncthreads();
    // This block's partial for the key chunk: [split, b, hk, pc0 + k, d].
    const int64_t base = ((split * p.B + b) * p.Hkv + hk) * p.P * p.D + static_cast<int64_t>(pc0) * p.D;
    for (int e = tid; e < nk * p.D; e += kBwdThreads) {
      const int k = e / p.D, d = e - k * p.D;
      p.dpk[base + e] = dks[k * Dp + d] * p.scale;
      p.dpv[base + e] = dvs[k * Dp + d];
    }
  }
}

// 16-byte vector loads are safe when the base is 16-byte aligned and so is every row start (the strides of the
// dims that are ever indexed, i.e. of size > 1, multiples of 16 bytes).
inline bool rows_16b_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * static_cast<int64_t>(t.element_size())) % 16 != 0) return false;
  }
  return true;
}

// Checks shared by both directions (memory safety: the Python layer validated the semantics).
inline void check_common(const char* op, const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                         std::initializer_list<std::pair<const char*, const at::Tensor*>> like_q) {
  PK_CHECK(q.dim() == 4, op, "q must be 4-D [B, Hq, Lq, D], got ", q.dim(), "-D");
  PK_CHECK((prefix_k.dim() == 3 || prefix_k.dim() == 4) && prefix_k.sizes() == prefix_v.sizes(), op,
           "prefix_k and prefix_v must be [Hkv, P, D] or [B, Hkv, P, D] of equal shape, got ", prefix_k.sizes(),
           " and ", prefix_v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3);
  const int64_t Hkv = prefix_k.size(-3), P = prefix_k.size(-2);
  PK_CHECK(Hkv > 0 && Hq % Hkv == 0, op, "q has ", Hq, " heads, the prefix ", Hkv,
           "; the query heads must be a multiple of the KV heads");
  PK_CHECK(prefix_k.size(-1) == D && (prefix_k.dim() == 3 || prefix_k.size(0) == B), op, "prefix_k of shape ",
           prefix_k.sizes(), " does not match q of shape ", q.sizes());
  PK_CHECK(P >= 1 && P <= INT_MAX, op, "the prefix must have 1 <= P <= INT_MAX virtual tokens, got ", P);
  PK_CHECK(D >= 1 && D <= kMaxHeadDim, op, "head dim D = ", D, " is not supported (1 <= D <= ", kMaxHeadDim, ")");
  const auto dtype = q.scalar_type();
  PK_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
           "q must be float16, bfloat16 or float32, got ", dtype);
  PK_CHECK(q.stride(-1) == 1 || D == 1, op, "q must have a unit-stride last dim, got strides ", q.strides());
  for (const auto* t : {&prefix_k, &prefix_v}) {
    PK_CHECK(t->device() == q.device(), op, "the prefix must be on ", q.device(), ", got ", t->device());
    PK_CHECK(at::isFloatingType(t->scalar_type()), op, "the prefix must be floating point, got ", t->scalar_type());
  }
  for (const auto& [name, t] : like_q) {
    PK_CHECK(t->sizes() == q.sizes(), op, name, " must have q's shape ", q.sizes(), ", got ", t->sizes());
    PK_CHECK(t->device() == q.device(), op, name, " must be on ", q.device(), ", got ", t->device());
    PK_CHECK(t->scalar_type() == dtype, op, name, " has dtype ", t->scalar_type(), ", expected q's ", dtype);
    PK_CHECK(t->stride(-1) == 1 || D == 1, op, name, " must have a unit-stride last dim, got strides ", t->strides());
  }
}

inline void check_lse(const char* op, const char* name, const at::Tensor& lse, const at::Tensor& q) {
  PK_CHECK(lse.dim() == 3 && lse.sizes() == q.sizes().slice(0, 3), op, name, " must be [B, Hq, Lq] = ",
           q.sizes().slice(0, 3), ", got ", lse.sizes());
  PK_CHECK(lse.scalar_type() == at::kFloat && lse.device() == q.device(), op, name, " must be float32 on ",
           q.device(), ", got ", lse.scalar_type(), " on ", lse.device());
}

inline std::tuple<int64_t, int64_t> prefix_strides(const at::Tensor& prefix32) {
  const int64_t P = prefix32.size(-2), D = prefix32.size(-1);
  return {prefix32.dim() == 4 ? prefix32.size(1) * P * D : 0, P * D};
}

// The three activation dtypes (check_common refused the others): fn receives a value of the element type.
template <typename Fn>
void dispatch_activation(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: fn(float{}); break;
  }
}

template <typename Launch>
at::Tensor prefix_merge_fwd_impl(const char* op, const at::Tensor& q, const at::Tensor& prefix_k,
                                 const at::Tensor& prefix_v, at::Tensor& out, const at::Tensor& lse_c, double scale,
                                 const Launch& launch) {
  check_common(op, q, prefix_k, prefix_v, {{"out", &out}});
  check_lse(op, "lse_c", lse_c, q);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = prefix_k.size(-3), P = prefix_k.size(-2);
  PK_CHECK(Hq <= 65535 && B <= 65535, op, "grid limit: Hq = ", Hq, " and B = ", B, " must be <= 65535");
  PK_CHECK((Lq + kFwdRows - 1) / kFwdRows <= INT_MAX, op, "Lq = ", Lq, " exceeds the grid limit");
  auto lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return lse;
  // The prefix in fp32 once (a no-op for fp32 master weights): P x D, tiny.
  const auto pk = prefix_k.to(at::kFloat).contiguous(), pv = prefix_v.to(at::kFloat).contiguous();

  FwdParams p{};
  p.q = q.const_data_ptr();
  p.pk = pk.const_data_ptr<float>();
  p.pv = pv.const_data_ptr<float>();
  p.out = out.mutable_data_ptr();
  p.lse_c = lse_c.const_data_ptr<float>();
  p.lse = lse.mutable_data_ptr<float>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2);
  p.c_sb = lse_c.stride(0), p.c_sh = lse_c.stride(1), p.c_sl = lse_c.stride(2);
  std::tie(p.p_sb, p.p_sh) = prefix_strides(pk);
  p.Hq = Hq, p.Lq = Lq;
  p.group = static_cast<int>(Hq / Hkv), p.P = static_cast<int>(P), p.D = static_cast<int>(D);
  p.Dp = round8(p.D);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.vec = D % 8 == 0 && rows_16b_aligned(q) && rows_16b_aligned(out);

  const size_t smem = fwd_smem_bytes(p.P, p.D);
  const Grid grid{static_cast<unsigned>((Lq + kFwdRows - 1) / kFwdRows), static_cast<unsigned>(Hq),
                  static_cast<unsigned>(B)};
  dispatch_activation(q.scalar_type(), [&](auto tag) { launch(tag, grid, kFwdRows, smem, p); });
  return lse;
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> prefix_merge_bwd_impl(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                                         const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         at::Tensor& dq, double scale, const Launch& launch) {
  check_common(op, q, prefix_k, prefix_v, {{"dout", &dout}, {"out", &out}, {"dq", &dq}});
  check_lse(op, "lse", lse, q);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = prefix_k.size(-3), P = prefix_k.size(-2);
  const int64_t group = Hq / Hkv;
  PK_CHECK(Hkv <= 65535 && B <= 65535, op, "grid limit: Hkv = ", Hkv, " and B = ", B, " must be <= 65535");
  auto part_opts = q.options().dtype(at::kFloat);
  const bool shared = prefix_k.dim() == 3;
  if (Lq == 0 || B == 0) {
    return {at::zeros(prefix_k.sizes(), part_opts), at::zeros(prefix_k.sizes(), part_opts)};
  }
  // Rows per block: ~kSplitRows query rows of work (the group's heads included), a whole number of tiles.
  const int64_t split_rows = std::max<int64_t>(kBwdRows, kSplitRows / group / kBwdRows * kBwdRows);
  const int64_t n_split = (Lq + split_rows - 1) / split_rows;
  PK_CHECK(n_split <= INT_MAX, op, "Lq = ", Lq, " exceeds the grid limit");
  const auto pk = prefix_k.to(at::kFloat).contiguous(), pv = prefix_v.to(at::kFloat).contiguous();
  // Every element of the partials is written by its block: no zero fill.
  auto dpk_part = at::empty({n_split, B, Hkv, P, D}, part_opts);
  auto dpv_part = at::empty({n_split, B, Hkv, P, D}, part_opts);

  BwdParams p{};
  p.q = q.const_data_ptr();
  p.dout = dout.const_data_ptr();
  p.out = out.const_data_ptr();
  p.lse = lse.const_data_ptr<float>();
  p.dq = dq.mutable_data_ptr();
  p.pk = pk.const_data_ptr<float>();
  p.pv = pv.const_data_ptr<float>();
  p.dpk = dpk_part.mutable_data_ptr<float>();
  p.dpv = dpv_part.mutable_data_ptr<float>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.do_sb = dout.stride(0), p.do_sh = dout.stride(1), p.do_sl = dout.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2);
  p.dq_sb = dq.stride(0), p.dq_sh = dq.stride(1), p.dq_sl = dq.stride(2);
  p.l_sb = lse.stride(0), p.l_sh = lse.stride(1), p.l_sl = lse.stride(2);
  std::tie(p.p_sb, p.p_sh) = prefix_strides(pk);
  p.B = B, p.Hkv = Hkv, p.Lq = Lq, p.split_rows = split_rows;
  p.group = static_cast<int>(group), p.P = static_cast<int>(P), p.D = static_cast<int>(D);
  p.Dp = round8(p.D), p.Dq = p.Dp + 4;
  p.scale = static_cast<float>(scale), p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.vec = D % 8 == 0 && rows_16b_aligned(q) && rows_16b_aligned(dout) && rows_16b_aligned(out) &&
          rows_16b_aligned(dq);

  const size_t smem = bwd_smem_bytes(p.D);
  const Grid grid{static_cast<unsigned>(n_split), static_cast<unsigned>(Hkv), static_cast<unsigned>(B)};
  dispatch_activation(q.scalar_type(), [&](auto tag) { launch(tag, grid, kBwdThreads, smem, p); });
  // Fixed-order fp32 sums over the splits (and the batch for a shared prefix): deterministic.
  const std::vector<int64_t> dims = shared ? std::vector<int64_t>{0, 1} : std::vector<int64_t>{0};
  return {dpk_part.sum(dims), dpv_part.sum(dims)};
}

}  // namespace prefix_merge
}  // namespace peft_kernels
