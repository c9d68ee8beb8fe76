// CUDA Anderson step: one block per sample (contract: deqfuse/reference/anderson.py).
// Pass 1 streams x, f(x) and the G ring: norms + the new Gram row (block reductions). Thread 0 does
// the Gram update and the bordered solve. Pass 2 mixes. When the sample's x, g and G ring fit in
// shared memory (CACHE), pass 1 keeps them there, so pass 2 reads only the X ring from DRAM.
// Kernel templates only (plain CUDA + c10 scalar types): also compiled stand-alone by
// tests/nvcc_compile.py on machines whose torch has no CUDA headers.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../anderson_common.h"

namespace deqfuse {

constexpr size_t kMaxCacheBytes = 110 * 1024;  // two blocks per SM on Hopper (227 KB)

template <typename T>
__device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, typename hist_t, bool CACHE, int kThreads = CACHE ? 512 : 256>
__global__ void __launch_bounds__(kThreads) anderson_step_kernel(
    scalar_t* __restrict__ x, const scalar_t* __restrict__ fx, hist_t* __restrict__ X, hist_t* __restrict__ G,
    typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type* __restrict__ GG,
    scalar_t* __restrict__ best_x,
    typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type* __restrict__ best_res,
    bool* __restrict__ converged, int32_t* __restrict__ nstep,
    typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type* __restrict__ abs_out,
    typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type* __restrict__ rel_out,
    int64_t L, int m, int k, double beta_d, double lam_d, double tol_d, bool stop_rel) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  constexpr int kWarps = kThreads / 32;
  const int64_t b = blockIdx.x;
  if (converged[b]) return;
  const int slot = k % m, n = min(k + 1, m), tid = threadIdx.x;
  const acc_t beta = (acc_t)beta_d;
  scalar_t* xb = x + b * L;
  const scalar_t* fb = fx + b * L;
  hist_t* Xb = X + b * m * L;
  hist_t* Gb = G + b * m * L;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* xc = reinterpret_cast<acc_t*>(smem_raw);  // [L] x, then [L] g, then [m, L] G ring (CACHE only)
  acc_t* gc = xc + L;
  hist_t* Gc = reinterpret_cast<hist_t*>(gc + L);
  __shared__ acc_t red[kMaxM + 3][kWarps];
  __shared__ acc_t alpha[kMaxM];
  __shared__ acc_t A[(kMaxM + 1) * (kMaxM + 1)], rhs[kMaxM + 1], ggrow[kMaxM * kMaxM];
  __shared__ int flags;  // bit 0: mix, bit 1: better

  // ---- pass 1
  acc_t g2 = 0, f2 = 0, gr2 = 0, dots[kMaxM];
#pragma unroll
  for (int j = 0; j < kMaxM; ++j) dots[j] = 0;
  for (int64_t l = tid; l < L; l += kThreads) {
    const acc_t xv = to_acc(xb[l]), fv = to_acc(fb[l]), g = fv - xv, gr = to_acc(static_cast<hist_t>(g));
    g2 += g * g;
    f2 += fv * fv;
    gr2 += gr * gr;
    if (CACHE) { xc[l] = xv; gc[l] = g; }
#pragma unroll
    for (int j = 0; j < kMaxM; ++j) {
      if (j < n && j != slot) {
        const hist_t Gv = Gb[j * L + l];
        if (CACHE) Gc[j * L + l] = Gv;
        dots[j] += to_acc(Gv) * gr;
      }
    }
  }
  const int warp = tid / 32, lane = tid % 32;
  g2 = warp_sum(g2); f2 = warp_sum(f2); gr2 = warp_sum(gr2);
#pragma unroll
  for (int j = 0; j < kMaxM; ++j) dots[j] = warp_sum(dots[j]);
  if (lane == 0) {
    red[0][warp] = g2; red[1][warp] = f2; red[2][warp] = gr2;
#pragma unroll
    for (int j = 0; j < kMaxM; ++j) red[3 + j][warp] = dots[j];
  }
  __syncthreads();
  __shared__ acc_t tot[kMaxM + 3];
  if (warp == 0) {  // cross-warp sums, one value per lane
    for (int r = lane; r < m + 3; r += 32) {
      acc_t v = 0;
      for (int w = 0; w < kWarps; ++w) v += red[r][w];
      tot[r] = v;
    }
    __syncwarp();
  }
  if (tid == 0) {
    acc_t* s = tot;
    const acc_t absr = sqrt(s[0]), relr = absr / (sqrt(s[1]) + (acc_t)kRelEps);
    const acc_t res = stop_rel ? relr : absr;
    abs_out[b] = absr;
    rel_out[b] = relr;
    const bool better = res < best_res[b];
    if (better) { best_res[b] = res; nstep[b] = k + 1; }
    const bool now_conv = res < (acc_t)tol_d;  // NaN never converges
    if (now_conv) converged[b] = true;
    int fl = (now_conv ? 0 : 1) | (better ? 2 : 0);
    if (!now_conv) {
      acc_t* GGb = GG + b * m * m;
      s[3 + slot] = s[2];
      for (int j = 0; j < m; ++j) GGb[slot * m + j] = GGb[j * m + slot] = s[3 + j];
      for (int i = 0; i < m * m; ++i) ggrow[i] = GGb[i];
      acc_t a[kMaxM];
      bordered_solve<acc_t>(ggrow, m, n, (acc_t)lam_d, A, rhs, a);
      for (int j = 0; j < m; ++j) alpha[j] = a[j];
    }
    flags = fl;
  }
  __syncthreads();
  const bool mix = flags & 1, better = flags & 2;
  if (!mix && !better) return;
  // ---- pass 2
  acc_t al[kMaxM];
#pragma unroll
  for (int j = 0; j < kMaxM; ++j) al[j] = (j < n) ? alpha[j] : (acc_t)0;
  for (int64_t l = tid; l < L; l += kThreads) {
    const acc_t xv = CACHE ? xc[l] : to_acc(xb[l]);
    if (better) best_x[b * L + l] = CACHE ? static_cast<scalar_t>(xv) : xb[l];
    if (!mix) continue;
    const acc_t g = CACHE ? gc[l] : to_acc(fb[l]) - xv;
    const hist_t xh = static_cast<hist_t>(xv), gh = static_cast<hist_t>(g);
    acc_t v = 0;
#pragma unroll
    for (int j = 0; j < kMaxM; ++j) {
      if (j < n) {
        const acc_t Xv = j == slot ? to_acc(xh) : to_acc(Xb[j * L + l]);
        const acc_t Gv = j == slot ? to_acc(gh) : to_acc(CACHE ? Gc[j * L + l] : Gb[j * L + l]);
        v += al[j] * (Xv + beta * Gv);
      }
    }
    Xb[slot * L + l] = xh;
    Gb[slot * L + l] = gh;
    xb[l] = static_cast<scalar_t>(v);
  }
}

}  // namespace deqfuse
