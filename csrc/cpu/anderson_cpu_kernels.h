// The C++ CPU Anderson step, shared by the anderson_step op (anderson_cpu.cpp) and the whole-solve ops
// (solve_cpu.cpp). Internal linkage (unnamed namespace): see cell_cpu_kernels.h.
//
// anderson_rows steps up to kStepRows samples together (the contract of reference/anderson.py per
// sample), in three passes:
//   1. per sample (anderson_gram_row; float with AVX2: gram_row_avx2, one pass): g = f(x) - x once (its
//      norms, then the history-rounded copy the Gram row is taken from) and the Gram row, one contiguous dot
//      product per ring slot;
//   2. the bookkeeping (record_residual, best iterate) and the mixing weights of all of them at once
//      (anderson_weights_rows: the bordered solves with the samples in SIMD lanes -- a sample's weights are a
//      chain of dependent divides and square roots, which one sample at a time left the core waiting);
//   3. per sample (anderson_mix_row): the new ring slot and the mixing straight into x (per element in slot
//      order: the sum order of the reference; in the whole solves ring X may hold X + beta G instead,
//      StepConst::own_rings).
// A sample's arithmetic does not depend on which samples share its group or on its lane, so the step op
// and the whole solves give the same iterate bit for bit (tests/test_fused_solve.py).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../anderson_common.h"
#include "cpu_simd.h"

namespace deqfuse {
namespace {

constexpr int kStepRows = 8;  // samples per anderson_rows group (the SIMD lanes of the weights' solve)

// One sample's operands: its rows of the step's buffers (x, f(x), rings X / G [m, L], Gram [m, m], best
// iterate / residual, flag, step of the best, residual outputs of this step).
template <typename scalar_t, typename hist_t, typename acc_t>
struct AndersonRow {
  scalar_t* x;
  const scalar_t* f;
  hist_t *X, *G;
  acc_t* GG;
  scalar_t* bx;
  acc_t* br;
  bool* cv;
  int32_t* ns;
  acc_t *ab, *rb;
};

// The step's constants: row width, ring size, slot written this step, filled slots n = min(k + 1, m).
template <typename acc_t>
struct StepConst {
  int64_t L;
  int m, slot, n;
  int64_t k;
  acc_t beta, lam;
  double tol;
  bool stop_rel;
  // The caller owns the rings (the whole solves): where the float AVX2 mixing runs, ring X may hold
  // X_j + beta G_j instead of X_j (mix_row_avx2's MIXED). The step op's rings are the caller's tensors in
  // reference/anderson.py's layout: false there.
  bool own_rings = false;
};

// Pass 1 of one sample: gp = f(x) - x ([L] scratch, rounded to hist_t's precision), s = (|g|^2, |f(x)|^2,
// |gp|^2, then the Gram row <G_j, gp> of the filled slots j != slot; 0 elsewhere).
template <typename scalar_t, typename hist_t, typename acc_t>
DEQFUSE_SIMD_CLONES void anderson_gram_row(const scalar_t* xb, const scalar_t* fb, const hist_t* Gb, acc_t* gp,
                                           int64_t L, int m, int slot, int n, acc_t* s) {
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
  s[0] = g2;
  s[1] = f2;
  s[2] = gr2;
  for (int j = 0; j < m; ++j) {
    acc_t d = 0;
    if (j < n && j != slot) {
      const hist_t* Gj = Gb + j * L;
#pragma omp simd reduction(+ : d)
      for (int64_t l = 0; l < L; ++l) d += (acc_t)Gj[l] * gp[l];
    }
    s[3 + j] = d;
  }
}

// Pass 3 of one sample: ring slot `slot` = (x, gp), then x = sum_j alpha_j (X_j + beta G_j), summed in slot
// order (the reference's order), tile by tile: a tile's partial sums stay in L1 and the last slot's pass
// writes x.
template <typename scalar_t, typename hist_t, typename acc_t>
DEQFUSE_SIMD_CLONES void anderson_mix_row(scalar_t* xb, hist_t* Xb, hist_t* Gb, const acc_t* gp, const acc_t* alpha,
                                          int64_t L, int slot, int n, acc_t beta) {
  hist_t* Xs = Xb + slot * L;
  hist_t* Gs = Gb + slot * L;
  for (int64_t l = 0; l < L; ++l) {
    Xs[l] = (hist_t)xb[l];
    Gs[l] = (hist_t)gp[l];
  }
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

#ifdef DEQFUSE_X86_TARGETS
// float, L % 8 == 0, with AVX2 + FMA: the two passes of the step over the ring. Each computes exactly what the generic loops above compute in the x86-64-v3
// clone (GCC's `omp simd` code), so the step's values do not depend on which one ran:
//   gram_row_avx2: g = f(x) - x (stored to gp), |g|^2, |f(x)|^2 and <G_j, g> for ND slots in one pass, each
//     sum in 8 lanes (lane q: the elements l = q mod 8, in order, one FMA each), the lanes then added to 0 in
//     lane order -- the generic loops' reductions; the ND + 2 chains side by side, x, f(x) and g loaded once
//     (anderson_gram_row's reductions, then slot by slot, were chains of L / 8 dependent FMAs each);
//   mix_row_avx2: x = sum_j alpha_j (X_j + beta G_j) per element in slot order, t = fma(beta, G_j, X_j) then
//     acc = fma(alpha_j, t, acc) from acc = 0 (the contraction GCC makes of the generic loop), 32 elements'
//     sums in registers (the generic loop's tile array lived on the stack, zeroed by `rep stos`).
//     MIXED (the whole solves, whose rings live inside the op): ring X holds t_j itself, written once when
//     slot j is filled, so the mixing reads one ring instead of two -- the same t, so the same values.
template <int ND>
__attribute__((target("avx2,fma"))) inline void gram_row_avx2(const float* xb, const float* fb,
                                                             const float* const* Gj, float* gp, int64_t L,
                                                             float* out) {
  __m256 acc[ND + 2];  // |g|^2, |f(x)|^2, then the ND dots
  const float* Gl[ND > 0 ? ND : 1];  // local copies: the stores to gp cannot alias them
  for (int i = 0; i < ND; ++i) Gl[i] = Gj[i];
  for (int i = 0; i < ND + 2; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t l = 0; l < L; l += 8) {
    const __m256 f = _mm256_loadu_ps(fb + l), g = _mm256_sub_ps(f, _mm256_loadu_ps(xb + l));
    _mm256_storeu_ps(gp + l, g);
    acc[0] = _mm256_fmadd_ps(g, g, acc[0]);
    acc[1] = _mm256_fmadd_ps(f, f, acc[1]);
    for (int i = 0; i < ND; ++i) acc[2 + i] = _mm256_fmadd_ps(_mm256_loadu_ps(Gl[i] + l), g, acc[2 + i]);
  }
  for (int i = 0; i < ND + 2; ++i) {
    alignas(32) float v[8];
    _mm256_store_ps(v, acc[i]);
    float d = 0;
    for (int q = 0; q < 8; ++q) d += v[q];
    out[i] = d;
  }
}

// anderson_gram_row for float (L % 8 == 0): s[0..2] = |g|^2, |f(x)|^2, |gp|^2 (= |g|^2: the ring holds
// float), s[3 + j] = <G_j, gp> for the filled slots j != slot, 0 elsewhere.
inline void gram_row_sums_avx2(const float* xb, const float* fb, const float* Gb, float* gp, int64_t L, int m,
                               int slot, int n, float* s) {
  const float* Gj[kMaxM];
  int js[kMaxM], nd = 0;
  for (int j = 0; j < m; ++j) {
    s[3 + j] = 0;
    if (j < n && j != slot) {
      js[nd] = j;
      Gj[nd++] = Gb + j * L;
    }
  }
  float d[kMaxM + 2] = {};
  switch (nd) {
    case 0: gram_row_avx2<0>(xb, fb, Gj, gp, L, d); break;
    case 1: gram_row_avx2<1>(xb, fb, Gj, gp, L, d); break;
    case 2: gram_row_avx2<2>(xb, fb, Gj, gp, L, d); break;
    case 3: gram_row_avx2<3>(xb, fb, Gj, gp, L, d); break;
    case 4: gram_row_avx2<4>(xb, fb, Gj, gp, L, d); break;
    case 5: gram_row_avx2<5>(xb, fb, Gj, gp, L, d); break;
    case 6: gram_row_avx2<6>(xb, fb, Gj, gp, L, d); break;
    default: gram_row_avx2<7>(xb, fb, Gj, gp, L, d); break;  // nd <= kMaxM - 1 = 7
  }
  static_assert(kMaxM == 8, "gram_row_sums_avx2 dispatches 0..7 slots");
  s[0] = d[0];
  s[1] = d[1];
  s[2] = d[0];
  for (int i = 0; i < nd; ++i) s[3 + js[i]] = d[2 + i];
}

template <int V, bool MIXED>  // V 8-element vectors of x
__attribute__((target("avx2,fma"))) inline void mix_tile_avx2(float* xo, float* Xb, float* Gb, const float* gp,
                                                             const float* alpha, int64_t L, int slot, int n,
                                                             __m256 beta) {
  __m256 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const __m256 a = _mm256_set1_ps(alpha[j]);
    float *Xj = Xb + j * L, *Gj = Gb + j * L;
    for (int v = 0; v < V; ++v) {
      __m256 t;
      if (j == slot) {  // the new entry: read from x and g, and written into the ring here (no copy pass)
        const __m256 xv = _mm256_loadu_ps(xo + 8 * v), gv = _mm256_loadu_ps(gp + 8 * v);
        t = _mm256_fmadd_ps(beta, gv, xv);
        _mm256_storeu_ps(Xj + 8 * v, MIXED ? t : xv);
        _mm256_storeu_ps(Gj + 8 * v, gv);
      } else if (MIXED) {
        t = _mm256_loadu_ps(Xj + 8 * v);
      } else {
        t = _mm256_fmadd_ps(beta, _mm256_loadu_ps(Gj + 8 * v), _mm256_loadu_ps(Xj + 8 * v));
      }
      acc[v] = _mm256_fmadd_ps(a, t, acc[v]);
    }
  }
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(xo + 8 * v, acc[v]);  // after every read of this tile's x
}

// anderson_mix_row for float: ring slot `slot` = (x or t, gp), then the mixing into x -- in one pass (slot < n:
// the slot being written is always one of the n mixed).
template <bool MIXED>
__attribute__((target("avx2,fma"))) inline void mix_row_avx2(float* xb, float* Xb, float* Gb, const float* gp,
                                                            const float* alpha, int64_t L, int slot, int n,
                                                            float beta) {
  const __m256 bv = _mm256_set1_ps(beta);
  int64_t l0 = 0;
  for (; l0 + 32 <= L; l0 += 32) mix_tile_avx2<4, MIXED>(xb + l0, Xb + l0, Gb + l0, gp + l0, alpha, L, slot, n, bv);
  for (; l0 < L; l0 += 8) mix_tile_avx2<1, MIXED>(xb + l0, Xb + l0, Gb + l0, gp + l0, alpha, L, slot, n, bv);
}
#endif

#ifdef DEQFUSE_X86_TARGETS
// mix_row_avx2 with 16-lane vectors where the CPU has AVX-512F: the mixing is elementwise (each element's
// sum over the slots in slot order, the same two FMAs), so the lane width does not change a value; half the
// instructions per element.
template <int V, bool MIXED>  // V 16-element vectors of x
__attribute__((target("avx512f,avx2,fma"))) inline void mix_tile_avx512(float* xo, float* Xb, float* Gb,
                                                                       const float* gp, const float* alpha,
                                                                       int64_t L, int slot, int n, __m512 beta) {
  __m512 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const __m512 a = _mm512_set1_ps(alpha[j]);
    float *Xj = Xb + j * L, *Gj = Gb + j * L;
    for (int v = 0; v < V; ++v) {
      __m512 t;
      if (j == slot) {
        const __m512 xv = _mm512_loadu_ps(xo + 16 * v), gv = _mm512_loadu_ps(gp + 16 * v);
        t = _mm512_fmadd_ps(beta, gv, xv);
        _mm512_storeu_ps(Xj + 16 * v, MIXED ? t : xv);
        _mm512_storeu_ps(Gj + 16 * v, gv);
      } else if (MIXED) {
        t = _mm512_loadu_ps(Xj + 16 * v);
      } else {
        t = _mm512_fmadd_ps(beta, _mm512_loadu_ps(Gj + 16 * v), _mm512_loadu_ps(Xj + 16 * v));
      }
      acc[v] = _mm512_fmadd_ps(a, t, acc[v]);
    }
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_ps(xo + 16 * v, acc[v]);
}

template <bool MIXED>
__attribute__((target("avx512f,avx2,fma"))) inline void mix_row_avx512(float* xb, float* Xb, float* Gb,
                                                                      const float* gp, const float* alpha,
                                                                      int64_t L, int slot, int n, float beta) {
  const __m512 bv = _mm512_set1_ps(beta);
  int64_t l0 = 0;
  for (; l0 + 64 <= L; l0 += 64)
    mix_tile_avx512<4, MIXED>(xb + l0, Xb + l0, Gb + l0, gp + l0, alpha, L, slot, n, bv);
  for (; l0 + 16 <= L; l0 += 16)
    mix_tile_avx512<1, MIXED>(xb + l0, Xb + l0, Gb + l0, gp + l0, alpha, L, slot, n, bv);
  if (l0 < L)  // L % 8 == 0: one 8-element tail
    mix_tile_avx2<1, MIXED>(xb + l0, Xb + l0, Gb + l0, gp + l0, alpha, L, slot, n, _mm256_set1_ps(beta));
}
#endif

// The bordered solves of kStepRows samples in SIMD lanes (anderson_common.h: bordered_solve_n's Cholesky
// of H = GG + lam' I, a = y / (1^T y) with H y = 1, the same operations in the same order per lane).
// H[i][j][r]: GG[i][j] of lane r (i, j < NC); alpha[i][r] out; bad[r]: a pivot was not positive (or NaN),
// the lane's alpha is to be replaced by the one-sample solve's (bordered_solve: its elimination fallback).
template <typename acc_t, int NC>
DEQFUSE_INLINE void cholesky_lanes(const acc_t (*H)[kMaxM][kStepRows], acc_t lam, acc_t (*alpha)[kStepRows],
                                   bool* bad) {
#pragma omp simd
  for (int r = 0; r < kStepRows; ++r) {
    acc_t dmax = 0;
#pragma GCC unroll 8
    for (int i = 0; i < NC; ++i) dmax = H[i][i][r] > dmax ? H[i][i][r] : dmax;
    const acc_t lam_eff = lam * dmax + (acc_t)kTiny;
    acc_t Lf[NC][NC], inv[NC], y[NC];
    bool ok = true;
#pragma GCC unroll 8
    for (int i = 0; i < NC; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j <= i; ++j) {
        acc_t v = H[i][j][r] + (i == j ? lam_eff : (acc_t)0);
#pragma GCC unroll 8
        for (int q = 0; q < j; ++q) v -= Lf[i][q] * Lf[j][q];
        if (i == j) {
          ok = ok && v > 0;
          const acc_t d = std::sqrt(v > 0 ? v : (acc_t)1);  // a bad lane is redone by the elimination
          Lf[i][i] = d;
          inv[i] = (acc_t)1 / d;
        } else {
          Lf[i][j] = v * inv[j];
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < NC; ++i) {  // L u = 1
      acc_t v = 1;
#pragma GCC unroll 8
      for (int q = 0; q < i; ++q) v -= Lf[i][q] * y[q];
      y[i] = v * inv[i];
    }
    acc_t sum = 0;
#pragma GCC unroll 8
    for (int i = NC - 1; i >= 0; --i) {  // L^T y = u
      acc_t v = y[i];
#pragma GCC unroll 8
      for (int q = i + 1; q < NC; ++q) v -= Lf[q][i] * y[q];
      y[i] = v * inv[i];
      sum += y[i];
    }
    const acc_t isum = (acc_t)1 / sum;
#pragma GCC unroll 8
    for (int i = 0; i < NC; ++i) alpha[i][r] = y[i] * isum;
    bad[r] = !ok;
  }
}

#if defined(__x86_64__)
// cholesky_lanes for float with SSE2 intrinsics, kStepRows / 4 vectors side by side: GCC compiles the
// `omp simd` loop above as scalar code (mulss / subss per lane).
// The same IEEE operations in the same order per lane (the baseline ISA has no FMA, nothing is
// contracted), so the same values as bordered_solve_n.
template <int NC>
inline void cholesky_lanes_sse(const float (*H)[kMaxM][kStepRows], float lam, float (*alpha)[kStepRows], bool* bad) {
  constexpr int V = kStepRows / 4;
  static_assert(kStepRows % 4 == 0, "cholesky_lanes_sse: 4-lane vectors");
  const __m128 zero = _mm_setzero_ps(), one = _mm_set1_ps(1.0f);
  __m128 dmax[V], lam_eff[V], ok[V];
  __m128 Lf[NC][NC][V], inv[NC][V], y[NC][V];
  for (int u = 0; u < V; ++u) {
    dmax[u] = zero;
    for (int i = 0; i < NC; ++i) dmax[u] = _mm_max_ps(_mm_loadu_ps(&H[i][i][4 * u]), dmax[u]);  // H > d ? H : d
    lam_eff[u] = _mm_add_ps(_mm_mul_ps(_mm_set1_ps(lam), dmax[u]), _mm_set1_ps((float)kTiny));
    ok[u] = _mm_castsi128_ps(_mm_set1_epi32(-1));
  }
  for (int i = 0; i < NC; ++i) {
    for (int j = 0; j <= i; ++j) {
      for (int u = 0; u < V; ++u) {
        __m128 v = _mm_add_ps(_mm_loadu_ps(&H[i][j][4 * u]), i == j ? lam_eff[u] : zero);
        for (int q = 0; q < j; ++q) v = _mm_sub_ps(v, _mm_mul_ps(Lf[i][q][u], Lf[j][q][u]));
        if (i == j) {
          const __m128 pos = _mm_cmpgt_ps(v, zero);
          ok[u] = _mm_and_ps(ok[u], pos);
          const __m128 d = _mm_sqrt_ps(_mm_or_ps(_mm_and_ps(pos, v), _mm_andnot_ps(pos, one)));  // v > 0 ? v : 1
          Lf[i][i][u] = d;
          inv[i][u] = _mm_div_ps(one, d);
        } else {
          Lf[i][j][u] = _mm_mul_ps(v, inv[j][u]);
        }
      }
    }
  }
  for (int u = 0; u < V; ++u) {
    for (int i = 0; i < NC; ++i) {  // L u = 1
      __m128 v = one;
      for (int q = 0; q < i; ++q) v = _mm_sub_ps(v, _mm_mul_ps(Lf[i][q][u], y[q][u]));
      y[i][u] = _mm_mul_ps(v, inv[i][u]);
    }
    __m128 sum = zero;
    for (int i = NC - 1; i >= 0; --i) {  // L^T y = u
      __m128 v = y[i][u];
      for (int q = i + 1; q < NC; ++q) v = _mm_sub_ps(v, _mm_mul_ps(Lf[q][i][u], y[q][u]));
      y[i][u] = _mm_mul_ps(v, inv[i][u]);
      sum = _mm_add_ps(sum, y[i][u]);
    }
    const __m128 isum = _mm_div_ps(one, sum);
    for (int i = 0; i < NC; ++i) _mm_storeu_ps(&alpha[i][4 * u], _mm_mul_ps(y[i][u], isum));
    const int mask = _mm_movemask_ps(ok[u]);
    for (int l = 0; l < 4; ++l) bad[4 * u + l] = !((mask >> l) & 1);
  }
}
#endif

// The mixing weights of na <= kStepRows samples whose Gram matrices (m x m, first n slots filled) are
// GGs[0 .. na-1]: alpha[q][0 .. m-1] (0 past n). Out of line and for the baseline ISA only (SSE2 lanes, no
// FMA contraction), like bordered_solve: the step op and the whole solves call the same code, so their weights
// agree bit for bit, and they are the weights bordered_solve_n gave one sample at a time (a solve that ends
// near the limits of precision amplifies a last-bit difference in them: tests/test_fused_solve.py).
template <typename acc_t>
__attribute__((noinline)) void anderson_weights_rows(acc_t* const* GGs, int na, int m, int n,
                                                                         acc_t lam, acc_t (*alpha)[kMaxM]) {
  acc_t H[kMaxM][kMaxM][kStepRows], al[kMaxM][kStepRows];
  bool bad[kStepRows];
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      for (int r = 0; r < kStepRows; ++r) H[i][j][r] = r < na ? GGs[r][i * m + j] : (acc_t)(i == j);  // pad: I
  auto solve = [&](auto nc) {
    constexpr int NC = decltype(nc)::value;
#if defined(__x86_64__)
    if constexpr (std::is_same_v<acc_t, float>) {
      cholesky_lanes_sse<NC>(H, lam, al, bad);
    } else
#endif
    {
      cholesky_lanes<acc_t, NC>(H, lam, al, bad);
    }
  };
  switch (n) {
    case 1: solve(std::integral_constant<int, 1>()); break;
    case 2: solve(std::integral_constant<int, 2>()); break;
    case 3: solve(std::integral_constant<int, 3>()); break;
    case 4: solve(std::integral_constant<int, 4>()); break;
    case 5: solve(std::integral_constant<int, 5>()); break;
    case 6: solve(std::integral_constant<int, 6>()); break;
    case 7: solve(std::integral_constant<int, 7>()); break;
    default: solve(std::integral_constant<int, 8>()); break;  // n <= kMaxM = 8
  }
  static_assert(kMaxM == 8, "anderson_weights_rows dispatches n = 1..8");
  for (int q = 0; q < na; ++q) {
    if (bad[q]) {  // rare: the one-sample solve meets the same pivot and falls back to the elimination
      acc_t A[(kMaxM + 1) * (kMaxM + 1)], rhs[kMaxM + 1];
      bordered_solve<acc_t>(GGs[q], m, n, lam, A, rhs, alpha[q]);
    } else {
      for (int i = 0; i < m; ++i) alpha[q][i] = i < n ? al[i][q] : (acc_t)0;
    }
  }
}

// A sample's Gram matrix GG [m][m] after pass 1 (s: its sums, anderson_gram_row's layout): row and column `slot`
// = the new dots, <g, g> on the diagonal.
template <typename acc_t>
inline void store_gram_row(acc_t* GG, acc_t* s, int m, int slot) {
  acc_t* dots = s + 3;
  dots[slot] = s[2];
  for (int j = 0; j < m; ++j) GG[slot * m + j] = GG[j * m + slot] = dots[j];
}

// One step of the R <= kStepRows samples rows[0 .. R-1] (none frozen). gp: R * L scratch.
template <typename scalar_t, typename hist_t, typename acc_t>
void anderson_rows(const AndersonRow<scalar_t, hist_t, acc_t>* rows, int R, const StepConst<acc_t>& c, acc_t* gp) {
  const int64_t L = c.L;
  const int m = c.m, slot = c.slot, n = c.n;
  acc_t sums[kStepRows][3 + kMaxM];
  acc_t* GGs[kStepRows];
  int live[kStepRows], na = 0;
  // the AVX2 dots and mixing (float, L % 8 == 0; the same values as the generic loops)
  constexpr bool f32 = std::is_same_v<scalar_t, float> && std::is_same_v<hist_t, float> && std::is_same_v<acc_t, float>;
  const bool avx2 = f32 && L % 8 == 0 && cpu_has_avx2_fma();
  [[maybe_unused]] const bool avx512 = avx2 && cpu_has_avx512f();  // the mixing's 16-lane variant (same values)
  for (int r = 0; r < R; ++r) {
    const auto& a = rows[r];
#ifdef DEQFUSE_X86_TARGETS
    if constexpr (f32) {
      if (avx2) gram_row_sums_avx2(a.x, a.f, a.G, gp + r * L, L, m, slot, n, sums[r]);
    }
#endif
    if (!avx2) anderson_gram_row<scalar_t, hist_t, acc_t>(a.x, a.f, a.G, gp + r * L, L, m, slot, n, sums[r]);
    const int fl = record_residual<acc_t>(sums[r][0], sums[r][1], c.stop_rel, c.tol, c.k, a.ab, a.rb, a.br, a.ns, a.cv);
    if (fl & 1) std::copy(a.x, a.x + L, a.bx);
    if (fl & 2) continue;  // converged now: frozen, no history update
    store_gram_row(a.GG, sums[r], m, slot);
    GGs[na] = a.GG;
    live[na++] = r;
  }
  if (na == 0) return;
  acc_t alpha[kStepRows][kMaxM];
  anderson_weights_rows<acc_t>(GGs, na, m, n, c.lam, alpha);
  for (int q = 0; q < na; ++q) {
    const auto& a = rows[live[q]];
#ifdef DEQFUSE_X86_TARGETS
    if constexpr (f32) {
      const float* g = gp + live[q] * L;
      if (avx512) {
        c.own_rings ? mix_row_avx512<true>(a.x, a.X, a.G, g, alpha[q], L, slot, n, c.beta)
                    : mix_row_avx512<false>(a.x, a.X, a.G, g, alpha[q], L, slot, n, c.beta);
        continue;
      }
      if (avx2) {
        c.own_rings ? mix_row_avx2<true>(a.x, a.X, a.G, g, alpha[q], L, slot, n, c.beta)
                    : mix_row_avx2<false>(a.x, a.X, a.G, g, alpha[q], L, slot, n, c.beta);
        continue;
      }
    }
#endif
    anderson_mix_row<scalar_t, hist_t, acc_t>(a.x, a.X, a.G, gp + live[q] * L, alpha[q], L, slot, n, c.beta);
  }
}

}  // namespace
}  // namespace deqfuse
