// Fused modality epilogue of the fusion cell (contract: deqfuse/reference/epilogue.py):
//   a = a2 + b2_i + x_i ; u = GN2_i(a) + z_i ; out = GN3_i(ReLU(u))
// one block per (modality i, sample b) row; the row lives in registers (D <= kEpiThreads * kPer).
// Inputs: a2 [N, B, D] (the W2 GEMM output), x [B, N, D], z [B, N+1, D]; outputs out [B, N, D], u [N, B, D].
// Kernel templates only (plain CUDA + c10 scalar types): also compiled stand-alone by
// tests/nvcc_compile.py on machines whose torch has no CUDA headers.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace deqfuse {

constexpr int kEpiThreads = 256;
constexpr int kPer = 16;  // D up to 4096
constexpr int kMaxGroups = 32;

// Sum over the row of fn(v, group) for every group: per-thread partials, warp shuffles, then one
// pass over the warps. Result in sums[g] (shared, kMaxGroups). No atomics: they serialise on G addresses.
template <typename F>
__device__ __forceinline__ void group_sums(float* sums, float (*red)[kEpiThreads / 32], int G, int DG, int D,
                                           const float* v, F&& fn) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int g = 0; g < G; ++g) {
    float p = 0.f;
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int d = threadIdx.x + t * kEpiThreads;
      if (d < D && d / DG == g) p += fn(v[t], g);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) p += __shfl_xor_sync(0xffffffffu, p, o);
    if (lane == 0) red[g][warp] = p;
  }
  __syncthreads();
  if (threadIdx.x < G) {
    float s = 0.f;
    for (int w = 0; w < kEpiThreads / 32; ++w) s += red[threadIdx.x][w];
    sums[threadIdx.x] = s;
  }
  __syncthreads();
}

__device__ __forceinline__ void groupnorm(float* v, const float* w, const float* bias, int D, int G,
                                          float* mean, float* var, float (*red)[kEpiThreads / 32], float eps) {
  const int DG = D / G;
  group_sums(mean, red, G, DG, D, v, [](float a, int) { return a; });
  group_sums(var, red, G, DG, D, v, [&](float a, int g) { const float c = a - mean[g] / DG; return c * c; });
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int d = threadIdx.x + t * kEpiThreads;
    if (d < D) {
      const int g = d / DG;
      v[t] = (v[t] - mean[g] / DG) * rsqrtf(var[g] / DG + eps) * w[d] + bias[d];
    }
  }
  __syncthreads();  // mean/var/red are reused by the next call
}

template <typename T>
__global__ void __launch_bounds__(kEpiThreads) modality_epilogue_kernel(
    const T* __restrict__ a2, const T* __restrict__ x, const T* __restrict__ z, const float* __restrict__ b2,
    const float* __restrict__ w2, const float* __restrict__ bb2, const float* __restrict__ w3,
    const float* __restrict__ bb3, T* __restrict__ out, T* __restrict__ u_out, int B, int N, int D, int G, float eps) {
  const int row = blockIdx.x, i = row / B, b = row % B;
  __shared__ float mean[kMaxGroups], var[kMaxGroups], red[kMaxGroups][kEpiThreads / 32];
  float v[kPer];
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int d = threadIdx.x + t * kEpiThreads;
    v[t] = d < D ? (float)a2[(int64_t)row * D + d] + b2[i * D + d] + (float)x[((int64_t)b * N + i) * D + d] : 0.f;
  }
  groupnorm(v, w2 + i * D, bb2 + i * D, D, G, mean, var, red, eps);
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int d = threadIdx.x + t * kEpiThreads;
    if (d < D) {
      v[t] += (float)z[((int64_t)b * (N + 1) + i) * D + d];
      u_out[(int64_t)row * D + d] = (T)v[t];
      v[t] = fmaxf(v[t], 0.f);
    }
  }
  groupnorm(v, w3 + i * D, bb3 + i * D, D, G, mean, var, red, eps);
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int d = threadIdx.x + t * kEpiThreads;
    if (d < D) out[((int64_t)b * N + i) * D + d] = (T)v[t];
  }
}

}  // namespace deqfuse
