// Shared by the CPU and CUDA Anderson steps: the (m+1)x(m+1) bordered least-squares solve.
// Contract (same as deqfuse/reference/anderson.py):
//   [[GG + lam' I, 1], [1^T, 0]] [a; mu] = [0; 1],  lam' = lam * max_j GG[j][j] + kTiny,
// over the first n filled slots of an m-slot ring; unused slots get a = 0.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DF_HD __host__ __device__ __forceinline__
#define DF_HD_NOINLINE DF_HD
#else
#define DF_HD inline
// Host: compiled once, for the baseline ISA, in every translation unit -- not inlined into the AVX2 clones
// (DEQFUSE_SIMD_CLONES), where the compiler would contract its multiply-adds into FMAs: the per-iteration
// step op and the whole solves (two translation units) must give the same weights bit for bit. (The CPU
// steps run bordered_solve_n's Cholesky with 8 samples in SIMD lanes, anderson_weights_rows in
// anderson_cpu_kernels.h, also for the baseline ISA; bordered_solve serves their non-positive-pivot lanes.)
#define DF_HD_NOINLINE __attribute__((noinline)) inline
#endif

namespace deqfuse {

constexpr int kMaxM = 8;         // ring slots supported by the compiled steps
constexpr double kRelEps = 1e-8;  // rel residual = |f - x| / (|f| + kRelEps)
constexpr double kTiny = 1e-30;

// The bordered system by elimination: Gauss-Jordan without pivoting (the border sits last, so the SPD
// block is eliminated first and the final pivot -1^T (GG + lam' I)^-1 1 is strictly negative). The
// fallback of bordered_solve. A: (m+1)^2 and rhs: (m+1) workspaces.
template <typename acc_t>
DF_HD void bordered_solve_gj(const acc_t* GG, int m, int n, acc_t lam_eff, acc_t* A, acc_t* rhs, acc_t* alpha) {
  const int M1 = m + 1;
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

// GG: m x m (row-major), its first n slots filled. A: (m+1)^2 and rhs: (m+1) are workspaces. alpha: m
// outputs. The bordered system's solution is a = y / (1^T y) with H y = 1, H = GG + lam' I (SPD): one
// Cholesky factorisation of the n x n block and two triangular solves (~n^3/6 + n^2 multiply-adds, about
// a fifth of the elimination of the whole (m+1)^2 system, which it replaced as the CPU step's largest
// cost after the ring passes: benchmarks/RESULTS.md). A pivot that is not positive (H numerically
// indefinite, or NaN) falls back to the elimination, which then gives what it always gave.
// NC > 0: n as a compile-time constant (bordered_solve dispatches n = 1..kMaxM), so the loops unroll and
// the factor lives in registers; one divide per pivot (the divides and square roots are the latency chain).
template <typename acc_t, int NC>
DF_HD void bordered_solve_n(const acc_t* GG, int m, int n_rt, acc_t lam, acc_t* A, acc_t* rhs, acc_t* alpha) {
  const int n = NC > 0 ? NC : n_rt;
  acc_t dmax = 0;
  for (int i = 0; i < n; ++i) dmax = GG[i * m + i] > dmax ? GG[i * m + i] : dmax;
  const acc_t lam_eff = lam * dmax + (acc_t)kTiny;
  acc_t Lf[kMaxM][kMaxM], inv[kMaxM], y[kMaxM] = {};  // Lf[i][j], j <= i: the Cholesky factor of H
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j <= i; ++j) {
      acc_t v = GG[i * m + j] + (i == j ? lam_eff : (acc_t)0);
      for (int q = 0; q < j; ++q) v -= Lf[i][q] * Lf[j][q];
      if (i == j) {
        if (!(v > 0)) return bordered_solve_gj<acc_t>(GG, m, n, lam_eff, A, rhs, alpha);
        const acc_t d = std::sqrt(v);
        Lf[i][i] = d;
        inv[i] = (acc_t)1 / d;
      } else {
        Lf[i][j] = v * inv[j];
      }
    }
  }
  for (int i = 0; i < n; ++i) {  // L u = 1
    acc_t v = 1;
    for (int q = 0; q < i; ++q) v -= Lf[i][q] * y[q];
    y[i] = v * inv[i];
  }
  acc_t sum = 0;
  for (int i = n - 1; i >= 0; --i) {  // L^T y = u
    acc_t v = y[i];
    for (int q = i + 1; q < n; ++q) v -= Lf[q][i] * y[q];
    y[i] = v * inv[i];
    sum += y[i];
  }
  const acc_t isum = (acc_t)1 / sum;
  for (int i = 0; i < m; ++i) alpha[i] = i < n ? y[i] * isum : 0;
}

template <typename acc_t>
DF_HD_NOINLINE void bordered_solve(const acc_t* GG, int m, int n, acc_t lam, acc_t* A, acc_t* rhs, acc_t* alpha) {
  static_assert(kMaxM == 8, "bordered_solve dispatches n = 1..8");
  switch (n) {
    case 1: return bordered_solve_n<acc_t, 1>(GG, m, n, lam, A, rhs, alpha);
    case 2: return bordered_solve_n<acc_t, 2>(GG, m, n, lam, A, rhs, alpha);
    case 3: return bordered_solve_n<acc_t, 3>(GG, m, n, lam, A, rhs, alpha);
    case 4: return bordered_solve_n<acc_t, 4>(GG, m, n, lam, A, rhs, alpha);
    case 5: return bordered_solve_n<acc_t, 5>(GG, m, n, lam, A, rhs, alpha);
    case 6: return bordered_solve_n<acc_t, 6>(GG, m, n, lam, A, rhs, alpha);
    case 7: return bordered_solve_n<acc_t, 7>(GG, m, n, lam, A, rhs, alpha);
    case 8: return bordered_solve_n<acc_t, 8>(GG, m, n, lam, A, rhs, alpha);
    default: return bordered_solve_n<acc_t, 0>(GG, m, n, lam, A, rhs, alpha);
  }
}

// Per-sample bookkeeping of a step, shared by the CPU and CUDA steps: residuals from the sums
// |g|^2 and |f(x)|^2 (written to abs_out/rel_out), best residual and its step, converged flag.
// Returns bit 0: the residual improved (the caller copies x to best_x), bit 1: converged now.
template <typename acc_t>
DF_HD int record_residual(acc_t g2, acc_t f2, bool stop_rel, double tol, int64_t k, acc_t* abs_out,
                          acc_t* rel_out, acc_t* best_res, int32_t* nstep, bool* converged) {
  const acc_t absr = std::sqrt(g2), relr = absr / (std::sqrt(f2) + (acc_t)kRelEps);
  const acc_t res = stop_rel ? relr : absr;
  *abs_out = absr;
  *rel_out = relr;
  const bool better = res < *best_res;
  if (better) {
    *best_res = res;
    *nstep = (int32_t)(k + 1);
  }
  const bool now_conv = res < (acc_t)tol;  // frozen from here on; a NaN residual never converges
  if (now_conv) *converged = true;
  return (better ? 1 : 0) | (now_conv ? 2 : 0);
}

}  // namespace deqfuse
