// The C++ CPU Anderson step of one sample, shared by the anderson_step op (anderson_cpu.cpp) and the
// whole-solve ops (solve_cpu.cpp). Internal linkage (unnamed namespace): see cell_cpu_kernels.h.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "anderson_common.h"
#include "cpu_simd.h"

namespace deqfuse {
namespace {

// One sample's step (the contract of reference/anderson.py). gp: [L] scratch row. Pass 1 forms
// g = f(x) - x once (norms, then the history-rounded copy the Gram row is taken from); the Gram row is
// one contiguous dot product per ring slot; pass 2 writes the new slot and mixes the ring straight into
// x (per element in slot order: the sum order of the reference). Every inner loop is over contiguous
// rows (SIMD).
template <typename scalar_t, typename hist_t, typename acc_t>
DEQFUSE_SIMD_CLONES void anderson_row(scalar_t* xb, const scalar_t* fb, hist_t* Xb, hist_t* Gb, acc_t* GGb,
                                      scalar_t* bxb, acc_t* brb, bool* cb, int32_t* nb, acc_t* ab, acc_t* rb,
                                      acc_t* gp, int64_t L, int m, int slot, int n, int64_t k,
                                      acc_t beta, acc_t lam, double tol, bool stop_rel) {
  acc_t dots[kMaxM], alpha[kMaxM], A[(kMaxM + 1) * (kMaxM + 1)], rhs[kMaxM + 1];
  acc_t g2 = 0, f2 = 0, gr2 = 0;
#pragma omp simd reduction(+ : g2, f2)
  for (int64_t l = 0; l < L; ++l) {
    const acc_t fv = (acc_t)fb[l], gv = fv - (acc_t)xb[l];
    gp[l] = gv;
    g2 += gv * gv;
    f2 += fv * fv;
  }
  if constexpr (!std::is_same_v<hist_t, acc_t>) {
    for (int64_t l = 0; l < L; ++l) gp[l] = (acc_t)(hist_t)gp[l];  // what the ring will hold
#pragma omp simd reduction(+ : gr2)
    for (int64_t l = 0; l < L; ++l) gr2 += gp[l] * gp[l];
  } else {
    gr2 = g2;
  }
  for (int j = 0; j < m; ++j) {
    acc_t d = 0;
    if (j < n && j != slot) {
      const hist_t* Gj = Gb + j * L;
#pragma omp simd reduction(+ : d)
      for (int64_t l = 0; l < L; ++l) d += (acc_t)Gj[l] * gp[l];
    }
    dots[j] = d;
  }
  const int fl = record_residual<acc_t>(g2, f2, stop_rel, tol, k, ab, rb, brb, nb, cb);
  if (fl & 1) std::copy(xb, xb + L, bxb);
  if (fl & 2) return;
  dots[slot] = gr2;
  for (int j = 0; j < m; ++j) GGb[slot * m + j] = GGb[j * m + slot] = dots[j];
  bordered_solve<acc_t>(GGb, m, n, lam, A, rhs, alpha);
  hist_t* Xs = Xb + slot * L;
  hist_t* Gs = Gb + slot * L;
  for (int64_t l = 0; l < L; ++l) {
    Xs[l] = (hist_t)xb[l];
    Gs[l] = (hist_t)gp[l];
  }
  // x = sum_j alpha_j (X_j + beta G_j), summed in slot order (the reference's order), tile by tile: a
  // tile's partial sums stay in L1 and the last slot's pass writes x
  constexpr int64_t kTile = 64;
  for (int64_t l0 = 0; l0 < L; l0 += kTile) {
    const int64_t len = std::min<int64_t>(kTile, L - l0);
    acc_t acc[kTile];
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) acc[l] = 0;
    for (int j = 0; j + 1 < n; ++j) {
      const acc_t a = alpha[j];
      const hist_t* Xj = Xb + j * L + l0;
      const hist_t* Gj = Gb + j * L + l0;
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) acc[l] += a * ((acc_t)Xj[l] + beta * (acc_t)Gj[l]);
    }
    const acc_t a = alpha[n - 1];
    const hist_t* Xj = Xb + (n - 1) * L + l0;
    const hist_t* Gj = Gb + (n - 1) * L + l0;
    scalar_t* xo = xb + l0;
#pragma omp simd
    for (int64_t l = 0; l < len; ++l) xo[l] = (scalar_t)(acc[l] + a * ((acc_t)Xj[l] + beta * (acc_t)Gj[l]));
  }
}

}  // namespace
}  // namespace deqfuse
