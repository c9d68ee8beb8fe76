// Shared by the CPU and CUDA Anderson steps: the (m+1)x(m+1) bordered least-squares solve.
// Contract (same as deqfuse/reference/anderson.py):
//   [[GG + lam' I, 1], [1^T, 0]] [a; mu] = [0; 1],  lam' = lam * max_j GG[j][j] + kTiny,
// over the first n filled slots of an m-slot ring; unused slots get a = 0.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif

namespace deqfuse {

constexpr int kMaxM = 8;         // ring slots supported by the compiled steps
constexpr double kRelEps = 1e-8;  // rel residual = |f - x| / (|f| + kRelEps)
constexpr double kTiny = 1e-30;

// GG: m x m (row-major). A: (m+1)^2 and rhs: (m+1) are workspaces. alpha: m outputs.
// Gauss-Jordan without pivoting: the border sits last, so the SPD block is eliminated first and the
// final pivot -1^T (GG + lam' I)^-1 1 is strictly negative.
template <typename acc_t>
DF_HD void bordered_solve(const acc_t* GG, int m, int n, acc_t lam, acc_t* A, acc_t* rhs, acc_t* alpha) {
  const int M1 = m + 1;
  acc_t dmax = 0;
  for (int i = 0; i < n; ++i) dmax = GG[i * m + i] > dmax ? GG[i * m + i] : dmax;
  const acc_t lam_eff = lam * dmax + (acc_t)kTiny;
  for (int i = 0; i < M1; ++i) {
    for (int j = 0; j < M1; ++j) {
      acc_t v;
      if (i < m && j < m) v = (i < n && j < n) ? GG[i * m + j] + (i == j ? lam_eff : 0) : (i == j ? 1 : 0);
      else if (i == m && j < m) v = j < n ? 1 : 0;
      else if (j == m && i < m) v = i < n ? 1 : 0;
      else v = 0;
      A[i * M1 + j] = v;
    }
    rhs[i] = i == m ? 1 : 0;
  }
  for (int kk = 0; kk < M1; ++kk) {
    const acc_t piv = A[kk * M1 + kk];
    for (int i = 0; i < M1; ++i) {
      if (i == kk) continue;
      const acc_t f = A[i * M1 + kk] / piv;
      for (int j = 0; j < M1; ++j) A[i * M1 + j] -= f * A[kk * M1 + j];
      rhs[i] -= f * rhs[kk];
    }
  }
  for (int i = 0; i < m; ++i) alpha[i] = i < n ? rhs[i] / A[i * M1 + i] : 0;
}

}  // namespace deqfuse
