// CUDA Anderson step kernel: one 256-thread block per sample (contract: deqfuse/reference/anderson.py).
// Pass 1 streams x, f(x) and the G ring (V-wide vector loads): residual norms and the new Gram row,
// reduced with warp shuffles. Thread 0 updates the Gram matrix and solves the bordered system while
// the SM's other blocks keep streaming. Pass 2 streams x, f(x), X and G again and mixes.
// The ring loads are predicated PTX loads (zero when the slot is unused or being replaced) in loops
// over a compile-time ring size MT >= m: no branch separates them, so each thread has every slot's
// load in flight at once (the design's measurements: benchmarks/RESULTS.md).
// Kernel templates only (plain CUDA + c10 scalar types): also compiled stand-alone by
// tests/nvcc_compile.py on machines whose torch has no CUDA headers.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../anderson_common.h"

namespace deqfuse {

constexpr int kStepThreads = 256;

template <typename T>
__device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// V consecutive elements moved as one aligned access (16 B for fp32 with V = 4).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <int V, typename T>
__device__ __forceinline__ Pack<T, V> ld(const T* p) { return *reinterpret_cast<const Pack<T, V>*>(p); }
template <int V, typename T>
__device__ __forceinline__ void st(T* p, const Pack<T, V>& x) { *reinterpret_cast<Pack<T, V>*>(p) = x; }

// 4 bytes per register: the PTX vector widths a Pack maps to.
#define DF_LDP_V4(OFF)                                                                                   \
  asm("{\n .reg .pred q;\n setp.ne.b32 q, %4, 0;\n @q ld.global.v4.u32 {%0, %1, %2, %3}, [%5];\n}\n"   \
      : "+r"(u[OFF]), "+r"(u[OFF + 1]), "+r"(u[OFF + 2]), "+r"(u[OFF + 3])                           \
      : "r"((int)pred), "l"(reinterpret_cast<const char*>(p) + 4 * (OFF)))

// Pack at p if pred, else zeros, as one predicated load (no branch: the compiler may issue many of
// them back to back). Reads only slots never written in the same pass, so no memory clobber is needed.
template <int V, typename T>
__device__ __forceinline__ Pack<T, V> ldp(const T* p, bool pred) {
  constexpr int kBytes = (int)sizeof(Pack<T, V>);
  Pack<T, V> r;
  if constexpr (kBytes % 16 == 0) {
    uint32_t u[kBytes / 4] = {};
#pragma unroll
    for (int o = 0; o < kBytes / 4; o += 4) DF_LDP_V4(o);
    memcpy(&r, u, kBytes);
  } else if constexpr (kBytes == 8) {
    uint32_t u[2] = {0, 0};
    asm("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q ld.global.v2.u32 {%0, %1}, [%3];\n}\n"
        : "+r"(u[0]), "+r"(u[1]) : "r"((int)pred), "l"(p));
    memcpy(&r, u, 8);
  } else if constexpr (kBytes == 4) {
    uint32_t u = 0;
    asm("{\n .reg .pred q;\n setp.ne.b32 q, %1, 0;\n @q ld.global.u32 %0, [%2];\n}\n"
        : "+r"(u) : "r"((int)pred), "l"(p));
    memcpy(&r, &u, 4);
  } else {
    static_assert(kBytes == 2, "Pack of 2, 4, 8 or 16k bytes");
    unsigned short u = 0;
    asm("{\n .reg .pred q;\n setp.ne.b32 q, %1, 0;\n @q ld.global.u16 %0, [%2];\n}\n"
        : "+h"(u) : "r"((int)pred), "l"(p));
    memcpy(&r, &u, 2);
  }
  return r;
}
#undef DF_LDP_V4

template <typename scalar_t>
using acc_of = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// V = 4 needs L % 4 == 0 (every row and ring slot then starts 4-element aligned); else V = 1.
// MT: compiled ring size, m <= MT <= kMaxM (the launcher rounds m up to an even MT).
template <typename scalar_t, typename hist_t, int V, int MT>
__global__ void __launch_bounds__(kStepThreads, 3) anderson_step_kernel(
    scalar_t* __restrict__ x, const scalar_t* __restrict__ fx, hist_t* __restrict__ X, hist_t* __restrict__ G,
    acc_of<scalar_t>* __restrict__ GG, scalar_t* __restrict__ best_x, acc_of<scalar_t>* __restrict__ best_res,
    bool* __restrict__ converged, int32_t* __restrict__ nstep, acc_of<scalar_t>* __restrict__ abs_out,
    acc_of<scalar_t>* __restrict__ rel_out, int64_t L, int m, int k, double beta_d, double lam_d, double tol_d,
    bool stop_rel) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kWarps = kStepThreads / 32;
  const int64_t b = blockIdx.x;
  if (converged[b]) return;
  const int slot = k % m, n = min(k + 1, m), tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const acc_t beta = (acc_t)beta_d;
  scalar_t* xb = x + b * L;
  const scalar_t* fb = fx + b * L;
  hist_t* Xb = X + b * m * L;
  hist_t* Gb = G + b * m * L;
  __shared__ acc_t red[kMaxM + 3][kWarps];
  __shared__ acc_t tot[kMaxM + 3];
  __shared__ acc_t alpha[kMaxM];
  __shared__ acc_t A[(kMaxM + 1) * (kMaxM + 1)], rhs[kMaxM + 1], gg[kMaxM * kMaxM];
  __shared__ int flags;  // bit 0: mix, bit 1: better

  // ---- pass 1: norms and the Gram row
  static_assert(MT <= kMaxM, "ring size");
  constexpr int kChunk = MT > 4 ? (MT + 1) / 2 : MT;  // ring slots per batch of loads: caps live registers
  bool used[MT];  // ring slots holding a past residual (not the one replaced now)
#pragma unroll
  for (int j = 0; j < MT; ++j) used[j] = j < n && j != slot;
  acc_t g2 = 0, f2 = 0, gr2 = 0, dots[MT];
#pragma unroll
  for (int j = 0; j < MT; ++j) dots[j] = 0;
  for (int64_t l = (int64_t)tid * V; l < L; l += (int64_t)kStepThreads * V) {
    const Pack<scalar_t, V> xp = ld<V>(xb + l), fp = ld<V>(fb + l);
    acc_t gr[V];
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const acc_t xv = to_acc(xp.v[u]), fv = to_acc(fp.v[u]), g = fv - xv;
      gr[u] = to_acc(static_cast<hist_t>(g));
      g2 += g * g;
      f2 += fv * fv;
      gr2 += gr[u] * gr[u];
    }
#pragma unroll
    for (int j0 = 0; j0 < MT; j0 += kChunk) {  // unused slots load as zeros: no branch
      Pack<hist_t, V> Gp[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const int j = j0 + c < MT ? j0 + c : MT - 1;
        Gp[c] = ldp<V>(Gb + j * L + l, j0 + c < MT && used[j]);
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        if (j0 + c < MT) {  // compile-time after unrolling
#pragma unroll
          for (int u = 0; u < V; ++u) dots[j0 + c] += to_acc(Gp[c].v[u]) * gr[u];
        }
      }
    }
  }
  g2 = warp_sum(g2);
  f2 = warp_sum(f2);
  gr2 = warp_sum(gr2);
#pragma unroll
  for (int j = 0; j < MT; ++j) dots[j] = warp_sum(dots[j]);
  if (lane == 0) {
    red[0][warp] = g2;
    red[1][warp] = f2;
    red[2][warp] = gr2;
#pragma unroll
    for (int j = 0; j < MT; ++j) red[3 + j][warp] = dots[j];
  }
  __syncthreads();
  if (warp == 0) {  // cross-warp sums, one value per lane
    for (int r = lane; r < m + 3; r += 32) {
      acc_t v = 0;
      for (int w = 0; w < kWarps; ++w) v += red[r][w];
      tot[r] = v;
    }
    __syncwarp();
  }
  if (tid == 0) {
    const int fl = record_residual<acc_t>(tot[0], tot[1], stop_rel, tol_d, k, abs_out + b, rel_out + b,
                                          best_res + b, nstep + b, converged + b);
    const bool better = fl & 1, now_conv = fl & 2;
    if (!now_conv) {
      acc_t* GGb = GG + b * m * m;
      tot[3 + slot] = tot[2];
      for (int j = 0; j < m; ++j) GGb[slot * m + j] = GGb[j * m + slot] = tot[3 + j];
      for (int i = 0; i < m * m; ++i) gg[i] = GGb[i];
      bordered_solve<acc_t>(gg, m, n, (acc_t)lam_d, A, rhs, alpha);
    }
    flags = (now_conv ? 0 : 1) | (better ? 2 : 0);
  }
  __syncthreads();
  const bool mix = flags & 1, better = flags & 2;
  if (!mix && !better) return;
  // ---- pass 2: best iterate, new ring slot, mixing
  acc_t al[MT];  // compile-time indices only (a run-time index would spill it to local memory)
#pragma unroll
  for (int j = 0; j < MT; ++j) al[j] = used[j] ? alpha[j] : (acc_t)0;
  const acc_t a_s = alpha[slot];
  for (int64_t l = (int64_t)tid * V; l < L; l += (int64_t)kStepThreads * V) {
    const Pack<scalar_t, V> xp = ld<V>(xb + l);
    if (better) st<V>(best_x + b * L + l, xp);
    if (!mix) continue;
    const Pack<scalar_t, V> fp = ld<V>(fb + l);
    Pack<hist_t, V> xh, gh;
    acc_t v[V];
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const acc_t xv = to_acc(xp.v[u]);
      xh.v[u] = static_cast<hist_t>(xv);
      gh.v[u] = static_cast<hist_t>(to_acc(fp.v[u]) - xv);
      v[u] = a_s * (to_acc(xh.v[u]) + beta * to_acc(gh.v[u]));
    }
#pragma unroll
    for (int j0 = 0; j0 < MT; j0 += kChunk) {
      Pack<hist_t, V> Xp[kChunk], Gp[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const int j = j0 + c < MT ? j0 + c : MT - 1;
        const bool ok = j0 + c < MT && used[j];
        Xp[c] = ldp<V>(Xb + j * L + l, ok);
        Gp[c] = ldp<V>(Gb + j * L + l, ok);
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const acc_t a = j0 + c < MT ? al[j0 + c] : (acc_t)0;
#pragma unroll
        for (int u = 0; u < V; ++u) v[u] += a * (to_acc(Xp[c].v[u]) + beta * to_acc(Gp[c].v[u]));
      }
    }
    Pack<scalar_t, V> out;
#pragma unroll
    for (int u = 0; u < V; ++u) out.v[u] = static_cast<scalar_t>(v[u]);
    st<V>(Xb + slot * L + l, xh);
    st<V>(Gb + slot * L + l, gh);
    st<V>(xb + l, out);
  }
}

}  // namespace deqfuse
