// Row-block kernels of the C++ CPU fusion cell (GroupNorm rows, the cell's GEMM calls, forward_block_body and
// vjp_block_body), the plan's choice (select_plan) and the parameter-gradient helpers, shared by the cell ops
// (cell_cpu.cpp, cell_jac_cpu.cpp), the whole-solve ops (solve_cpu.cpp) and the instruction-set files
// (rows_*.cpp). Contract: deqfuse/reference/cell.py; layout and saved tensors as described at the top of
// cell_cpu.cpp. Internal linkage (an unnamed namespace): each file compiles its own copies, for its target.
//
// DEQFUSE_ROWS_ISA (set by rows_zmm.cpp / rows_ymm.cpp before including this header): the definitions below
// are compiled for that instruction set -- the `omp simd` loops and the lambdas in its vectors. The headers
// above the target switch, included first, stay at the baseline: their inline functions have external
// linkage, and the linker keeps one copy of each, which every file calls (an AVX-512 copy there would run on
// CPUs without AVX-512).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../cell_check.h"
#include "cpu_blas.h"
#include "cpu_simd.h"
#include "gemm_small.h"
#include "plan.h"

#if defined(DEQFUSE_ROWS_ISA) && defined(DEQFUSE_X86_TARGETS) && __GNUC__ >= 11  // arch=x86-64-v3/v4: GCC 11
#pragma GCC push_options
#if DEQFUSE_ROWS_ISA == 0  // RowIsa::kZmm
#pragma GCC target("arch=x86-64-v4")
#elif DEQFUSE_ROWS_ISA == 1  // RowIsa::kYmm
#pragma GCC target("arch=x86-64-v3")
#endif
#endif

namespace deqfuse {
namespace {

constexpr double kGnEps = 1e-5;  // nn.GroupNorm's default (reference/groupnorm.py EPS)

// GroupNorm statistics of one group of n values: mean and 1/sqrt(var + eps) (two passes, in cache).
template <typename T, int64_t NC>  // NC > 0: the group width as a compile-time constant (unrolled)
DEQFUSE_INLINE void group_stats(const T* y, int64_t n_rt, T& mean, T& rstd) {
  const int64_t n = NC > 0 ? NC : n_rt;
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += y[j];
  mean = s / (T)n;
  T v = 0;
  const T m = mean;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < n; ++j) v += (y[j] - m) * (y[j] - m);
  rstd = (T)1 / std::sqrt(v / (T)n + (T)kGnEps);
}

template <typename T, int64_t NC>
DEQFUSE_INLINE void gn_row_n(const T* y, const T* gamma, const T* beta, int64_t D, int64_t G, T* out, T* yhat, T* rstd) {
  const int64_t n = NC > 0 ? NC : D / G;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * n;
    T mean, r;
    group_stats<T, NC>(y + o, n, mean, r);
    if (rstd) rstd[g] = r;
    const T *yo = y + o, *go = gamma + o, *bo = beta + o;
    T* oo = out + o;
    if (yhat) {
      T* ho = yhat + o;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const T h = (yo[j] - mean) * r;
        ho[j] = h;
        oo[j] = h * go[j] + bo[j];
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) oo[j] = (yo[j] - mean) * r * go[j] + bo[j];
    }
  }
}

// Where one GroupNorm row writes: out, and when non-null the normalised values yhat and the rstd per group.
// The store's epilogue (the cell's passes after a GroupNorm, folded into its last pass over the row), on the
// output v = yhat * gamma + beta: when add, v += add[j] first; out[j] = v (skipped when out == relu); when
// acc, acc[j] += v; when relu, relu[j] = (v < 0 ? 0 : v) (NaN stays NaN). The same operations as the passes
// they replace, so the same values.
template <typename T>
struct GnRow {
  const T* y;         // [D] the GroupNorm's input
  T* out;             // [D]
  T* yhat = nullptr;  // [D] or null
  T* rstd = nullptr;  // [G] or null
  const T* add = nullptr;
  T* acc = nullptr;
  T* relu = nullptr;
};

// GnRow's epilogue as a pass over a row whose GroupNorm output a kernel without it wrote to p.out (gn_row, the
// AVX2 kernels). Inlined into the caller's row passes, so it runs at their vector width.
template <typename T>
DEQFUSE_INLINE void gn_post_row(const GnRow<T>& p, int64_t D) {
  T* o = p.out;
  if (p.add) {  // u = out + add, relu = ReLU(u) (the cell's only use of add)
    const T* a = p.add;
    T* h = p.relu;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      o[j] += a[j];
      h[j] = o[j] < 0 ? (T)0 : o[j];
    }
    return;
  }
  if (p.acc) {
    T* s = p.acc;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) s[j] += o[j];
  }
  if (p.relu) {
    T* h = p.relu;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) h[j] = o[j] < 0 ? (T)0 : o[j];
  }
}

#ifdef DEQFUSE_X86_TARGETS
#define DEQFUSE_AVX2_GN 1
// Whether float GroupNorms of width D in G groups run in the row kernels below (gn_rows_avx2 and its
// backward; gn_rows_wide_avx512 and its backward), whose lanes are fixed, rather than gn_row's `omp simd`
// reductions, whose summation order follows the vector width the function was compiled for.
inline bool gn_float_kernels(int64_t D, int64_t G) { return G % 4 == 0 && (D / G) % 8 == 0 && cpu_has_avx2_fma(); }
// float GroupNorm of rows with AVX2 + FMA (G % 4 == 0, group width n a multiple of 8), four
// groups at a time: a group's partial sums in one 8-lane register, a row's four horizontal sums by one
// hadd tree, its four 1/sqrt(var + eps) by one vector sqrt and divide, and four rows' chains side by side.
// (Row by row and group by group, gn_row_n, every group is a chain of dependent reductions, a divide and a
// square root: latency.) Same two-pass statistics; the sums are added in another order.
__attribute__((target("avx2,fma"))) inline __m128 hsum4_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));  // [sum a, sum b, sum c, sum d]
}

// v[q] in all 8 lanes (q = 0..3): one vpermps (a permute + 128-bit insert took two shuffle uops; the
// GroupNorm kernels are bound by the shuffle port on Intel)
__attribute__((target("avx2,fma"))) inline __m256 lane_avx2(__m128 v, int q) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set1_epi32(q));
}

// K rows (1 or 4: the same arithmetic per row either way, so a row's result does not depend on its
// neighbours in the batch). W: 8-lane vectors per group (n = 8 W) as a compile-time constant, or 0 (read
// from D / G); SAVE: write yhat and rstd (every row of a call has both or neither: forward_block). With W
// and SAVE known the group loops unroll, a group's sums stay in registers and the row pointers are not
// reloaded per vector (the stores could alias them); the operations, and so the values, are those of the
// W = 0 loops.
// Out of line (noinline): inlined into the row bodies once per group width, they doubled the bodies' code
// and the solves ran 2-9% slower.
template <int K, int W, bool SAVE>
__attribute__((target("avx2,fma"), noinline)) void gn_rows_avx2(const GnRow<float>* rw, const float* gamma,
                                                             const float* beta, int64_t D, int64_t G) {
  const int64_t n = W > 0 ? 8 * W : D / G, w = W > 0 ? W : n / 8;
  const __m128 nv = _mm_set1_ps((float)n), eps = _mm_set1_ps((float)kGnEps), one = _mm_set1_ps(1.0f);
  const __m128 inv_n = _mm_set1_ps(1.0f / (float)n);  // W > 0: n = 8 W is a power of two, 1/n exact
  // the quotient by n: with W known (n = 8, 16, 32, 64) the product with 1/n, the same value without a
  // divide on the row's dependency chain
  auto div_n = [&](__m128 v) { return W > 0 ? _mm_mul_ps(v, inv_n) : _mm_div_ps(v, nv); };
  const float* y[K];
  float *yh[K], *rs[K];
  for (int p = 0; p < K; ++p) {
    y[p] = rw[p].y;
    yh[p] = rw[p].yhat;
    rs[p] = rw[p].rstd;
  }
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    __m128 mean[K], r[K];
    for (int p = 0; p < K; ++p) {
      const float* yg = y[p] + g0 * n;
      __m256 s[4];
      for (int q = 0; q < 4; ++q) {
        __m256 acc = _mm256_loadu_ps(yg + q * n);
        for (int64_t v = 1; v < w; ++v) acc = _mm256_add_ps(acc, _mm256_loadu_ps(yg + q * n + 8 * v));
        s[q] = acc;
      }
      mean[p] = div_n(hsum4_avx2(s[0], s[1], s[2], s[3]));
    }
    for (int p = 0; p < K; ++p) {
      const float* yg = y[p] + g0 * n;
      __m256 s[4];
      for (int q = 0; q < 4; ++q) {
        const __m256 m = lane_avx2(mean[p], q);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t v = 0; v < w; ++v) {
          const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(yg + q * n + 8 * v), m);
          acc = _mm256_fmadd_ps(d, d, acc);
        }
        s[q] = acc;
      }
      const __m128 var = _mm_add_ps(div_n(hsum4_avx2(s[0], s[1], s[2], s[3])), eps);
      r[p] = _mm_div_ps(one, _mm_sqrt_ps(var));
    }
    for (int p = 0; p < K; ++p) {
      if (SAVE) _mm_storeu_ps(rs[p] + g0, r[p]);
      float* out = rw[p].out;
      for (int q = 0; q < 4; ++q) {
        const int64_t o = (g0 + q) * n;
        const __m256 m = lane_avx2(mean[p], q), rq = lane_avx2(r[p], q);
        for (int64_t v = 0; v < w; ++v) {
          const int64_t j = o + 8 * v;
          const __m256 h = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(y[p] + j), m), rq);
          if (SAVE) _mm256_storeu_ps(yh[p] + j, h);
          _mm256_storeu_ps(out + j, _mm256_fmadd_ps(h, _mm256_loadu_ps(gamma + j), _mm256_loadu_ps(beta + j)));
        }
      }
    }
  }
}

// f(std::integral_constant<int, W>()) with W the 8-lane vectors of a group of n values for the widths the
// AVX2 GroupNorm kernels compile in (8, 16, 32, 64), else W = 0 (the width read at run time).
template <typename F>
inline void with_group_vectors(int64_t n, const F& f) {
  switch (n) {
    case 8: return f(std::integral_constant<int, 1>());
    case 16: return f(std::integral_constant<int, 2>());
    case 32: return f(std::integral_constant<int, 4>());
    case 64: return f(std::integral_constant<int, 8>());
    default: return f(std::integral_constant<int, 0>());
  }
}

// gn_rows_avx2 with W and SAVE from the group width and rw[0] (all K rows alike).
template <int K>
inline void gn_rows_avx2_any(const GnRow<float>* rw, const float* gamma, const float* beta, int64_t D, int64_t G) {
  const bool save = rw[0].yhat != nullptr;
  with_group_vectors(D / G, [&](auto wc) {
    constexpr int W = decltype(wc)::value;
    save ? gn_rows_avx2<K, W, true>(rw, gamma, beta, D, G) : gn_rows_avx2<K, W, false>(rw, gamma, beta, D, G);
  });
}
#endif

#if defined(DEQFUSE_AVX2_GN) && defined(DEQFUSE_AVX512_GEMM)
#define DEQFUSE_AVX512_GN 1
// float GroupNorm (forward and backward) of rows with AVX-512 for group widths 16 and 8 (G % 4 == 0; D = 64 and
// 32 with 4 groups): a row's block of four groups is 4 (or 2) registers, loaded once; the sums of four rows' four
// groups by one transposed tree (tree_pair_avx512, tree_join_avx512).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's AVX-512 intrinsics (_mm512_undefined_ps)
// Level 1 of the sums tree (tree_pair_avx512): [a's 8-lane partial | b's], each the sum of its vector's 256-bit halves
// (lane l: v[l] + v[l + 8]).
__attribute__((target("avx512f,avx2,fma"))) inline __m512 halves2_avx512(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}

// [a's upper 256 bits | b's]: level 1 where the 8-lane partials were formed in the upper halves.
__attribute__((target("avx512f,avx2,fma"))) inline __m512 uppers2_avx512(__m512 a, __m512 b) {
  return _mm512_shuffle_f32x4(a, b, 0xEE);
}

// Adjacent lanes of a and b added per 128-bit lane: [a0 + a1, a2 + a3, b0 + b1, b2 + b3] (hadd's pattern).
__attribute__((target("avx512f,avx2,fma"))) inline __m512 hadd_avx512(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
}

// The horizontal sums of 16 8-lane partials, 4 rows x 4 groups, as one vector (lane 4 p + q = row p's group
// q), in two steps: tree_pair_avx512 per pair of rows, pr[q] = [partial of the pair's first row, group q | of
// its second row], then tree_join_avx512 of the pairs (rows 0, 1) and (2, 3). Each sum is ((a0 + a1) + (a2 +
// a3)) + ((a4 + a5) + (a6 + a7)), hsum4_avx2's tree, so the values of the AVX2 kernels. Transposed, every shuffle
// and add serves 16 sums, not 4: 14 shuffles and 7 adds where four hsum4_avx2 take 28 and 16.
__attribute__((target("avx512f,avx2,fma"))) inline __m512 tree_pair_avx512(const __m512 (&pr)[4]) {
  // 128-bit lanes: the first row's two halves of each sum (lanes 0, 1), the second row's (lanes 2, 3)
  return hadd_avx512(hadd_avx512(pr[0], pr[1]), hadd_avx512(pr[2], pr[3]));
}

__attribute__((target("avx512f,avx2,fma"))) inline __m512 tree_join_avx512(__m512 r01, __m512 r23) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(r01, r23, 0x88), _mm512_shuffle_f32x4(r01, r23, 0xDD));
}

// v with its 256-bit halves swapped
__attribute__((target("avx512f,avx2,fma"))) inline __m512 swap_halves_avx512(__m512 v) {
  return _mm512_shuffle_f32x4(v, v, 0x4E);
}

// Level 1 for group width 8, where a 16-lane vector holds two groups of a row: [a's half h | b's half h]
// (h = 0: its first group, 1: its second), the groups themselves being their 8-lane partials.
__attribute__((target("avx512f,avx2,fma"))) inline __m512 half2_avx512(__m512 a, __m512 b, int h) {
  return h ? _mm512_shuffle_f32x4(a, b, 0xEE) : _mm512_shuffle_f32x4(a, b, 0x44);
}

// Statistic of vector c of a row's 4-group block, s the row's 4 statistics (group order): group width 16,
// vector c is group c (s[c] in all lanes); width 8, it holds groups 2 c and 2 c + 1 (each in its 8 lanes).
template <int NW>
__attribute__((target("avx512f,avx2,fma"))) inline __m512 stat_vec_avx512(const float* s, int c) {
  if (NW == 16) return _mm512_set1_ps(s[c]);
  return _mm512_shuffle_f32x4(_mm512_set1_ps(s[2 * c]), _mm512_set1_ps(s[2 * c + 1]), 0x44);
}

// Stores the 16 statistics v (lane 4 p + q: row p's group q) to a, whose elements the kernels then broadcast with
// loads (vbroadcastss from memory: a load port, where a vpermps and its index vector took two uops of the shuffle
// port). The empty asm hides the stored values from the compiler, which otherwise turns the loads back into
// vpermps of v.
__attribute__((target("avx512f,avx2,fma"))) inline void spill16_avx512(float (&a)[16], __m512 v) {
  _mm512_store_ps(a, v);
  asm("" : "+m"(a));
}

// A GnRow's epilogue pointers, read into locals once per row (the kernel's intrinsic stores may alias
// anything: read through the row, they were reloaded and tested at every store). Copied field by field where
// a row is taken, not as a whole struct: the caller has just written the rows with 8-byte stores, and a struct
// copy GCC makes of vector loads waits for them (a store-forwarding stall).
struct GnEpi {
  float* out = nullptr;
  const float* add = nullptr;
  float* acc = nullptr;
  float* relu = nullptr;
  bool store_out = true;  // out != relu
};

DEQFUSE_INLINE GnEpi gn_epi(const GnRow<float>& p) {
  float *out = p.out, *acc = p.acc, *relu = p.relu;
  const float* add = p.add;
  return GnEpi{.out = out, .add = add, .acc = acc, .relu = relu, .store_out = out != relu};
}

// ReLU as torch.relu: v unless v < 0 (NaN and -0 kept)
__attribute__((target("avx512f,avx2,fma"))) inline __m512 relu_avx512(__m512 v) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NLT_UQ), v);
}

// A ReLU's backward: v where gate[0 .. 15] > 0, else 0 (NaN gates closed)
__attribute__((target("avx512f,avx2,fma"))) inline __m512 gate_avx512(const float* gate, __m512 v) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(gate), _mm512_setzero_ps(), _CMP_GT_OQ), v);
}

// Stores one 16-lane vector v of a GroupNorm output at element j with e's epilogue (GnRow).
__attribute__((target("avx512f,avx2,fma"))) inline void gn_store_avx512(const GnEpi& e, int64_t j, __m512 v) {
  if (e.add) v = _mm512_add_ps(v, _mm512_loadu_ps(e.add + j));
  if (e.store_out) _mm512_storeu_ps(e.out + j, v);
  if (e.acc) _mm512_storeu_ps(e.acc + j, _mm512_add_ps(_mm512_loadu_ps(e.acc + j), v));
  if (e.relu) _mm512_storeu_ps(e.relu + j, relu_avx512(v));
}

// float GroupNorm of K rows (1 or 4) with AVX-512 for group width NW = 16 or 8 (G % 4 == 0): a block of four
// groups is 4 (or 2) registers per row, loaded once; K rows side by side (the same arithmetic per row either way;
// with K = 1 the tree's other rows are zeros). The means and variances are the group sums times 1/NW -- exactly
// the quotient (a power of two), without a divide's latency on the row's dependency chain; a row's chain (sums,
// mean, squares, sums, 1/sqrt) is long, four rows interleaved hide it. The values of gn_rows_avx2<K, NW / 8>:
// same partial sums (for NW = 16 the squares' by its fma chain), same tree, same lane operations.
template <int NW, int K>
__attribute__((target("avx512f,avx2,fma"))) inline void gn_rows_wide_avx512(const GnRow<float>* rw, const float* gamma,
                                                                            const float* beta, int64_t G) {
  constexpr int NV = NW / 4;  // registers per row and block of four groups
  const __m512 inv_n = _mm512_set1_ps(1.0f / NW), eps = _mm512_set1_ps((float)kGnEps), one = _mm512_set1_ps(1.0f);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t o = g0 * NW;
    __m512 d[4][NV], rp[2];  // rows p >= K: not read (their lanes of the sums are zeros)
#pragma GCC unroll 2
    for (int a = 0; a < 2; ++a) {
      __m512 pr[4];
      for (int p = 2 * a; p < 2 * a + 2; ++p)
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) d[p][c] = p < K ? _mm512_loadu_ps(rw[p].y + o + 16 * c) : zero;
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q)  // AVX2: lanes l and l + 8 added (NW = 16), the group itself (NW = 8)
        pr[q] = NW == 16 ? halves2_avx512(d[2 * a][q % NV], d[2 * a + 1][q % NV])
                         : half2_avx512(d[2 * a][q / 2], d[2 * a + 1][q / 2], q % 2);
      rp[a] = 2 * a < K ? tree_pair_avx512(pr) : zero;
    }
    alignas(64) float mean[16], r[16];  // broadcast by loads (spill16_avx512)
    spill16_avx512(mean, _mm512_mul_ps(tree_join_avx512(rp[0], rp[1]), inv_n));
#pragma GCC unroll 2
    for (int a = 0; a < 2; ++a) {
      __m512 sq[2][NV], pr[4];
      for (int p = 2 * a; p < 2 * a + 2; ++p)
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) {
          d[p][c] = p < K ? _mm512_sub_ps(d[p][c], stat_vec_avx512<NW>(mean + 4 * p, c)) : zero;
          const __m512 dd = d[p][c], s2 = _mm512_mul_ps(dd, dd);
          // NW = 16, upper lanes: fma(d_hi, d_hi, d_lo^2), the AVX2 chain (its partial from zero: d_lo^2, then
          // an fma); NW = 8: d^2 (fma(d, d, 0))
          sq[p - 2 * a][c] = p >= K ? zero : NW == 16 ? _mm512_fmadd_ps(dd, dd, swap_halves_avx512(s2)) : s2;
        }
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q)
        pr[q] = NW == 16 ? uppers2_avx512(sq[0][q % NV], sq[1][q % NV])
                         : half2_avx512(sq[0][q / 2], sq[1][q / 2], q % 2);
      rp[a] = 2 * a < K ? tree_pair_avx512(pr) : zero;
    }
    const __m512 var = _mm512_add_ps(_mm512_mul_ps(tree_join_avx512(rp[0], rp[1]), inv_n), eps);
    spill16_avx512(r, _mm512_div_ps(one, _mm512_sqrt_ps(var)));
    for (int p = 0; p < K; ++p) {
      if (rw[p].rstd) _mm_storeu_ps(rw[p].rstd + g0, _mm_load_ps(r + 4 * p));
      const GnEpi e = gn_epi(rw[p]);
      float* yh = rw[p].yhat;
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) {
        const int64_t j = o + 16 * c;
        const __m512 h = _mm512_mul_ps(d[p][c], stat_vec_avx512<NW>(r + 4 * p, c));
        if (yh) _mm512_storeu_ps(yh + j, h);
        gn_store_avx512(e, j, _mm512_fmadd_ps(h, _mm512_loadu_ps(gamma + j), _mm512_loadu_ps(beta + j)));
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

// kernel(rows, std::integral_constant<int, K>()) over the M rows row_of(0 .. M-1) (each a Row): K = 4 rows
// at a time, then the rest one by one. The GroupNorm row kernels do the same arithmetic per row for either K,
// so a row's result does not depend on its neighbours.
template <typename Row, typename RowOf, typename Kernel>
DEQFUSE_INLINE void by_four_rows(int64_t M, const RowOf& row_of, const Kernel& kernel) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) {
    const Row rw[4] = {row_of(r), row_of(r + 1), row_of(r + 2), row_of(r + 3)};
    kernel(rw, std::integral_constant<int, 4>());
  }
  for (; r < M; ++r) {
    const Row rw[1] = {row_of(r)};
    kernel(rw, std::integral_constant<int, 1>());
  }
}

// GroupNorm of one row y [D] (G groups): yhat = (y - mean) * rstd, out = yhat * gamma + beta.
// yhat / rstd [G] are written when non-null (saved for the VJP); out may alias y.
template <typename T>
DEQFUSE_INLINE void gn_row(const T* y, const T* gamma, const T* beta, int64_t D, int64_t G, T* out, T* yhat, T* rstd) {
  switch (D / G) {  // common group widths get fully unrolled loops (short groups: loop overhead dominates)
    case 8: return gn_row_n<T, 8>(y, gamma, beta, D, G, out, yhat, rstd);
    case 16: return gn_row_n<T, 16>(y, gamma, beta, D, G, out, yhat, rstd);
    case 32: return gn_row_n<T, 32>(y, gamma, beta, D, G, out, yhat, rstd);
    case 64: return gn_row_n<T, 64>(y, gamma, beta, D, G, out, yhat, rstd);
    default: return gn_row_n<T, 0>(y, gamma, beta, D, G, out, yhat, rstd);
  }
}

// GroupNorm of M rows, row r as row_of(r) says (a GnRow with its epilogue: in the AVX-512 kernel's stores,
// else a pass after the rows; out and relu may alias y, rows must not overlap each other), by the plan's kernel
// gn (CpuPlan::gn): 16 / 8 gn_rows_wide_avx512 of that group width, 1 gn_rows_avx2 (float, four rows at a time),
// 0 row by row.
template <typename T, typename RowOf>
DEQFUSE_INLINE void gn_rows(int gn, int64_t M, const T* gamma, const T* beta, int64_t D, int64_t G,
                            const RowOf& row_of) {
#ifdef DEQFUSE_AVX512_GN
  if constexpr (std::is_same_v<T, float>) {
    if (gn == 16 || gn == 8) {
      const int nw = gn;
      return by_four_rows<GnRow<float>>(M, row_of, [&](const GnRow<float>* rw, auto k) {
        constexpr int K = decltype(k)::value;
        nw == 16 ? gn_rows_wide_avx512<16, K>(rw, gamma, beta, G) : gn_rows_wide_avx512<8, K>(rw, gamma, beta, G);
      });
    }
  }
#endif
#ifdef DEQFUSE_AVX2_GN
  if constexpr (std::is_same_v<T, float>) {
    if (gn == 1) {
      by_four_rows<GnRow<float>>(M, row_of, [&](const GnRow<float>* rw, auto k) {
        gn_rows_avx2_any<decltype(k)::value>(rw, gamma, beta, D, G);
      });
      // the epilogue at the row passes' width (in the AVX2 kernel's 8 lanes it cost the 512-bit row builds:
      // D = 32 forward solve 7% slower)
      for (int64_t r = 0; r < M; ++r) gn_post_row(row_of(r), D);
      return;
    }
  }
#endif
  for (int64_t r = 0; r < M; ++r) {
    const GnRow<T> p = row_of(r);
    gn_row<T>(p.y, gamma, beta, D, G, p.out, p.yhat, p.rstd);
    gn_post_row(p, D);
  }
}

// GroupNorm backward of one row: dy = rstd * (d - mean(d) - yhat * mean(d * yhat)), d = dout * gamma.
// dy may alias dout.
template <typename T, int64_t NC>
DEQFUSE_INLINE void gn_row_backward_n(const T* dout, const T* gamma, const T* yhat, const T* rstd, int64_t D, int64_t G,
                              T* dy) {
  const int64_t n = NC > 0 ? NC : D / G;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * n;
    const T *d0 = dout + o, *g0 = gamma + o, *h0 = yhat + o;
    T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = 0; j < n; ++j) {
      const T d = d0[j] * g0[j];
      s1 += d;
      s2 += d * h0[j];
    }
    const T m1 = s1 / (T)n, m2 = s2 / (T)n, r = rstd[g];
    T* y0 = dy + o;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y0[j] = r * (d0[j] * g0[j] - m1 - h0[j] * m2);
  }
}

template <typename T>
DEQFUSE_INLINE void gn_row_backward(const T* dout, const T* gamma, const T* yhat, const T* rstd, int64_t D, int64_t G, T* dy) {
  switch (D / G) {
    case 8: return gn_row_backward_n<T, 8>(dout, gamma, yhat, rstd, D, G, dy);
    case 16: return gn_row_backward_n<T, 16>(dout, gamma, yhat, rstd, D, G, dy);
    case 32: return gn_row_backward_n<T, 32>(dout, gamma, yhat, rstd, D, G, dy);
    case 64: return gn_row_backward_n<T, 64>(dout, gamma, yhat, rstd, D, G, dy);
    default: return gn_row_backward_n<T, 0>(dout, gamma, yhat, rstd, D, G, dy);
  }
}

// Where one GroupNorm-backward row reads and writes: dy = GN^T(g) (dy may alias dout), with the cell's passes
// around it (folded into the AVX-512 kernel's loads and stores, else passes over the row; the same operations,
// so the same values). The incoming gradient g is dout, plus dout_add[j] when given, then 0 where in_gate[j] is
// not > 0 when given (a ReLU's backward); dy is then 0 where out_gate[j] is not > 0 when given; when copy,
// copy[j] = dy[j] (+ copy_add[j] when given).
template <typename T>
struct GnBackRow {
  const T* dout;
  const T* yhat;
  const T* rstd;
  T* dy;
  const T* dout_add = nullptr;
  const T* in_gate = nullptr;
  const T* out_gate = nullptr;
  T* copy = nullptr;
  const T* copy_add = nullptr;
};

// GnBackRow's operations before the GroupNorm as a pass writing g to dy (for the kernels without them, which
// then read the row gn_back_g_row gives).
template <typename T>
DEQFUSE_INLINE void gn_back_pre_row(const GnBackRow<T>& p, int64_t D) {
  const T* s = p.dout;
  T* d = p.dy;
  if (p.dout_add) {
    const T* a = p.dout_add;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) d[j] = s[j] + a[j];
    s = d;
  }
  if (p.in_gate) {
    const T* g = p.in_gate;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) d[j] = g[j] > 0 ? s[j] : (T)0;
  }
}

// The row after gn_back_pre_row: g read from dy.
template <typename T>
DEQFUSE_INLINE GnBackRow<T> gn_back_g_row(const GnBackRow<T>& p) {
  if (!p.dout_add && !p.in_gate) return p;
  GnBackRow<T> q = p;
  q.dout = p.dy;
  q.dout_add = q.in_gate = nullptr;
  return q;
}

// GnBackRow's operations after the GroupNorm as a pass over dy.
template <typename T>
DEQFUSE_INLINE void gn_back_post_row(const GnBackRow<T>& p, int64_t D) {
  T* d = p.dy;
  if (p.out_gate) {
    const T* g = p.out_gate;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) d[j] = g[j] > 0 ? d[j] : (T)0;
  }
  if (p.copy) {
    T* c = p.copy;
    if (p.copy_add) {
      const T* a = p.copy_add;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) c[j] = d[j] + a[j];
    } else {
      std::copy(d, d + D, c);
    }
  }
}

#ifdef DEQFUSE_AVX2_GN
// float GroupNorm backward of K rows (1 or 4) with AVX2 + FMA, four groups at a time (G % 4 == 0, group
// width a multiple of 8): the partial sums of d = dout * gamma and d * yhat in one 8-lane register per
// group, a row's four horizontal sums by one hadd tree, K rows' chains side by side (the forward's
// gn_rows_avx2 layout). Same arithmetic for every row whatever K, so a row's result does not depend on
// its neighbours in the batch.
template <int K, int W>  // W: 8-lane vectors per group as a compile-time constant, or 0 (gn_rows_avx2)
__attribute__((target("avx2,fma"), noinline)) void gn_rows_backward_avx2(const GnBackRow<float>* rw, const float* gamma,
                                                                      int64_t D, int64_t G) {
  const int64_t n = W > 0 ? 8 * W : D / G, w = W > 0 ? W : n / 8;
  const __m128 nv = _mm_set1_ps((float)n), inv_n = _mm_set1_ps(1.0f / (float)n);
  auto div_n = [&](__m128 v) { return W > 0 ? _mm_mul_ps(v, inv_n) : _mm_div_ps(v, nv); };  // as gn_rows_avx2
  const float *dout[K], *yh[K], *rs[K];
  float* dy[K];
  for (int p = 0; p < K; ++p) {
    dout[p] = rw[p].dout;
    yh[p] = rw[p].yhat;
    rs[p] = rw[p].rstd;
    dy[p] = rw[p].dy;
  }
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    __m128 m1[K], m2[K];
    for (int p = 0; p < K; ++p) {
      __m256 s1[4], s2[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t o = (g0 + q) * n;
        __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
        for (int64_t v = 0; v < w; ++v) {
          const int64_t j = o + 8 * v;
          const __m256 d = _mm256_mul_ps(_mm256_loadu_ps(dout[p] + j), _mm256_loadu_ps(gamma + j));
          a1 = _mm256_add_ps(a1, d);
          a2 = _mm256_fmadd_ps(d, _mm256_loadu_ps(yh[p] + j), a2);
        }
        s1[q] = a1;
        s2[q] = a2;
      }
      m1[p] = div_n(hsum4_avx2(s1[0], s1[1], s1[2], s1[3]));
      m2[p] = div_n(hsum4_avx2(s2[0], s2[1], s2[2], s2[3]));
    }
    for (int p = 0; p < K; ++p) {
      const __m128 r4 = _mm_loadu_ps(rs[p] + g0);
      for (int q = 0; q < 4; ++q) {
        const int64_t o = (g0 + q) * n;
        const __m256 a = lane_avx2(m1[p], q), b = lane_avx2(m2[p], q), r = lane_avx2(r4, q);
        for (int64_t v = 0; v < w; ++v) {
          const int64_t j = o + 8 * v;
          // t = d - a - yhat b with d = dout gamma, fused as written (GCC contracts the vector * and + of
          // these intrinsics on its own, differently in each unrolled copy: spelled out, every W rounds alike)
          const __m256 da = _mm256_fmsub_ps(_mm256_loadu_ps(dout[p] + j), _mm256_loadu_ps(gamma + j), a);
          const __m256 t = _mm256_fnmadd_ps(_mm256_loadu_ps(yh[p] + j), b, da);
          _mm256_storeu_ps(dy[p] + j, _mm256_mul_ps(r, t));
        }
      }
    }
  }
}

// gn_rows_backward_avx2 with W from the group width.
template <int K>
inline void gn_rows_backward_avx2_any(const GnBackRow<float>* rw, const float* gamma, int64_t D, int64_t G) {
  with_group_vectors(D / G, [&](auto wc) { gn_rows_backward_avx2<K, decltype(wc)::value>(rw, gamma, D, G); });
}
#endif

#ifdef DEQFUSE_AVX512_GN
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // as above
// float GroupNorm backward of K rows (1 or 4) with AVX-512 for group width NW = 16 or 8 (G % 4 == 0), the
// GnBackRow's passes in its loads and stores (ADD, IGATE, OGATE: whether the rows have dout_add, in_gate,
// out_gate -- every row of a call alike): a block of four groups is 4 (or 2) registers per row, loaded once
// (with dout_add and in_gate applied); the sums of four rows' four groups by one transposed tree
// (tree_pair_avx512). The values of gn_rows_backward_avx2<K, NW / 8> and the passes: there a group's partial
// sums start from zero and add its 8-lane vectors in turn -- a1 = (0 + d_lo) + d_hi and a2 = fma(d_hi, yhat_hi,
// fma(d_lo, yhat_lo, 0)) for NW = 16; here a1 = (d_lo + d_hi) + 0, the same value (d_lo + d_hi is -0 only when
// both are, where the other order gives +0 too), and a2 by the same two fmas, the second in the upper lanes
// (NW = 8: d + 0 and fma(d, yhat, 0), as there).
template <int NW, int K, bool ADD, bool IGATE, bool OGATE>
__attribute__((target("avx512f,avx2,fma"))) inline void gn_rows_backward_wide_avx512(const GnBackRow<float>* rw,
                                                                                     const float* gamma, int64_t G) {
  constexpr int NV = NW / 4;  // registers per row and block of four groups
  const __m512 inv_n = _mm512_set1_ps(1.0f / NW), zero = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t o = g0 * NW;
    __m512 v[4][NV], r1[2], r2[2];  // rows p >= K: not read (their lanes of the sums are zeros)
#pragma GCC unroll 2
    for (int a = 0; a < 2; ++a) {
      __m512 s1[2][NV], s2[2][NV], p1[4], p2[4];
      for (int p = 2 * a; p < 2 * a + 2; ++p)
#pragma GCC unroll 4
        for (int c = 0; c < NV; ++c) {
          const int64_t j = o + 16 * c;
          if (p >= K) {
            s1[p - 2 * a][c] = s2[p - 2 * a][c] = zero;
            continue;
          }
          __m512 x = _mm512_loadu_ps(rw[p].dout + j);
          if (ADD) x = _mm512_add_ps(x, _mm512_loadu_ps(rw[p].dout_add + j));
          if (IGATE)
            x = gate_avx512(rw[p].in_gate + j, x);
          v[p][c] = x;
          const __m512 d = _mm512_mul_ps(x, _mm512_loadu_ps(gamma + j)), h = _mm512_loadu_ps(rw[p].yhat + j);
          const __m512 dh = _mm512_fmadd_ps(d, h, zero);
          s1[p - 2 * a][c] = d;
          s2[p - 2 * a][c] = NW == 16 ? _mm512_fmadd_ps(d, h, swap_halves_avx512(dh)) : dh;  // NW = 16: a2 upper
        }
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        p1[q] = _mm512_add_ps(NW == 16 ? halves2_avx512(s1[0][q % NV], s1[1][q % NV])
                                       : half2_avx512(s1[0][q / 2], s1[1][q / 2], q % 2), zero);
        p2[q] = NW == 16 ? uppers2_avx512(s2[0][q % NV], s2[1][q % NV])
                         : half2_avx512(s2[0][q / 2], s2[1][q / 2], q % 2);
      }
      r1[a] = 2 * a < K ? tree_pair_avx512(p1) : zero;
      r2[a] = 2 * a < K ? tree_pair_avx512(p2) : zero;
    }
    alignas(64) float m1[16], m2[16];  // broadcast by loads (spill16_avx512)
    spill16_avx512(m1, _mm512_mul_ps(tree_join_avx512(r1[0], r1[1]), inv_n));
    spill16_avx512(m2, _mm512_mul_ps(tree_join_avx512(r2[0], r2[1]), inv_n));
    for (int p = 0; p < K; ++p) {
      // the row's pointers read field by field into locals (see GnEpi)
      const float *yh = rw[p].yhat, *rs = rw[p].rstd, *gate = rw[p].out_gate, *cadd = rw[p].copy_add;
      float *dy = rw[p].dy, *copy = rw[p].copy;
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) {
        const int64_t j = o + 16 * c;
        const __m512 a = stat_vec_avx512<NW>(m1 + 4 * p, c), b = stat_vec_avx512<NW>(m2 + 4 * p, c);
        const __m512 r = stat_vec_avx512<NW>(rs + g0, c);
        // t = d - a - yhat b as gn_rows_backward_avx2 forms it
        const __m512 da = _mm512_fmsub_ps(v[p][c], _mm512_loadu_ps(gamma + j), a);
        __m512 y = _mm512_mul_ps(r, _mm512_fnmadd_ps(_mm512_loadu_ps(yh + j), b, da));
        if (OGATE) y = gate_avx512(gate + j, y);
        _mm512_storeu_ps(dy + j, y);
        if (copy) _mm512_storeu_ps(copy + j, cadd ? _mm512_add_ps(y, _mm512_loadu_ps(cadd + j)) : y);
      }
    }
  }
}

// gn_rows_backward_wide_avx512 with ADD, IGATE, OGATE from rw[0] (all K rows alike).
template <int NW, int K>
inline void gn_rows_backward_wide_any(const GnBackRow<float>* rw, const float* gamma, int64_t G) {
  const bool add = rw[0].dout_add, ig = rw[0].in_gate, og = rw[0].out_gate;
  auto run = [&](auto a, auto i) {
    constexpr bool A = decltype(a)::value, I = decltype(i)::value;
    og ? gn_rows_backward_wide_avx512<NW, K, A, I, true>(rw, gamma, G)
       : gn_rows_backward_wide_avx512<NW, K, A, I, false>(rw, gamma, G);
  };
  using t = std::true_type;
  using f = std::false_type;
  add ? (ig ? run(t(), t()) : run(t(), f())) : (ig ? run(f(), t()) : run(f(), f()));
}
#pragma GCC diagnostic pop
#endif

// GroupNorm backward of M rows, row r as row_of(r) says (a GnBackRow with its passes: in the AVX-512 kernel's
// loads and stores, else passes before and after; dy may alias dout, rows must not overlap each other), by the
// plan's kernel gn as gn_rows: gn_rows_backward_wide_avx512, gn_rows_backward_avx2 or gn_row_backward.
template <typename T, typename RowOf>
DEQFUSE_INLINE void gn_rows_backward(int gn, int64_t M, const T* gamma, int64_t D, int64_t G, const RowOf& row_of) {
#ifdef DEQFUSE_AVX512_GN
  if constexpr (std::is_same_v<T, float>) {
    if (gn == 16 || gn == 8) {
      const int nw = gn;
      return by_four_rows<GnBackRow<float>>(M, row_of, [&](const GnBackRow<float>* rw, auto k) {
        constexpr int K = decltype(k)::value;
        nw == 16 ? gn_rows_backward_wide_any<16, K>(rw, gamma, G) : gn_rows_backward_wide_any<8, K>(rw, gamma, G);
      });
    }
  }
#endif
#ifdef DEQFUSE_AVX2_GN
  if constexpr (std::is_same_v<T, float>) {
    if (gn == 1) {
      for (int64_t r = 0; r < M; ++r) gn_back_pre_row(row_of(r), D);  // here, at the row passes' width
      by_four_rows<GnBackRow<float>>(M, [&](int64_t r) DEQFUSE_LAMBDA_INLINE { return gn_back_g_row(row_of(r)); },
                                     [&](const GnBackRow<float>* rw, auto k) {
                                       gn_rows_backward_avx2_any<decltype(k)::value>(rw, gamma, D, G);
                                     });
      for (int64_t r = 0; r < M; ++r) gn_back_post_row(row_of(r), D);
      return;
    }
  }
#endif
  for (int64_t r = 0; r < M; ++r) {
    const GnBackRow<T> p = row_of(r), q = gn_back_g_row(p);
    gn_back_pre_row(p, D);
    gn_row_backward<T>(q.dout, gamma, q.yhat, q.rstd, D, G, q.dy);
    gn_back_post_row(p, D);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) { return t.data_ptr<T>(); }

constexpr int64_t kMaxBlockRows = 64;  // rows per forward_block / vjp_block call, at most

// Rows per parallel task: the whole cell runs block by block in one parallel region, each block's
// intermediates staying in cache. Blocks of at most 64 rows, their count a multiple of the thread count
// and their sizes equal (+-1 row): at::parallel_for hands each thread an equal share of blocks, so a
// batch that is not a multiple of 64 (e.g. after compaction) still splits evenly.
inline int64_t block_rows(int64_t B) {
  const int64_t t = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nblocks = t * std::max<int64_t>(1, (B + kMaxBlockRows * t - 1) / (kMaxBlockRows * t));
  return std::max<int64_t>(1, (B + nblocks - 1) / nblocks);
}

template <typename T>
DEQFUSE_INLINE void relu_inplace(T* a, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) a[j] = a[j] < 0 ? (T)0 : a[j];  // ReLU; NaN stays NaN (torch.relu)
}

// Threads of a whole solve of B samples: at most one per 8 samples, at most torch's thread count.
inline int solve_threads(int64_t B) {
  return (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (B + 7) / 8));
}

// Samples per vector of the feature-major solve (16 float lanes).
constexpr int64_t kFmLanes = 16;

// The one place the plan is chosen, for a call on B rows (B <= 0: a large batch), with what PlanForce forces.
// rows: zmm on Intel CPUs with x86-64-v4 for float with the row GroupNorm kernels (AMD's Zen 4 splits 512-bit
// operations: slower there), else ymm on x86-64-v3, else base. fm: float, a tile GEMM, AVX-512F, group width
// 16 or 8 with G % 4 == 0, and a full 16-sample vector for each solve thread (below it the row layout, which
// splits the samples across the threads, is faster). Measurements: RESULTS.md "Kernel plan".
template <typename T>
CpuPlan select_plan(int64_t D, int64_t G, int64_t B) {
  CpuPlan p;
  const PlanForce& f = plan_force();
  p.chunk = f.chunk.load(std::memory_order_relaxed);
  bool avx2_gn = false;  // the AVX2 GroupNorm row kernels apply
  if constexpr (std::is_same_v<T, float>) {
#ifdef DEQFUSE_AVX2_GN
    avx2_gn = gn_float_kernels(D, G);
#endif
    p.gemm = small_gemm_for(D);
  }
  const bool v3 = cpu_has_x86_64_v3(), v4 = cpu_has_x86_64_v4();
  const int fr = f.rows.load(std::memory_order_relaxed);  // 0, or 1 + the forced RowIsa
  const auto forced = (RowIsa)(fr - 1);
  if (fr == 0 || (forced == RowIsa::kZmm && !v4) || (forced == RowIsa::kYmm && !v3))
    p.rows = v4 && avx2_gn && cpu_is_intel() ? RowIsa::kZmm : v3 ? RowIsa::kYmm : RowIsa::kBase;
  else
    p.rows = forced;
  if constexpr (std::is_same_v<T, float>) {
    const int64_t n = D / G;
    p.gn = avx2_gn ? 1 : 0;
#ifdef DEQFUSE_AVX512_GN
    const bool wide = G % 4 == 0 && cpu_has_avx512f();
    if (wide && (n == 16 || (n == 8 && p.rows == RowIsa::kZmm))) p.gn = (int)n;  // width 8: with zmm rows only
    const int layout = f.layout.load(std::memory_order_relaxed);  // forced: 1 rows, 2 fm at any batch
    if (wide && (n == 16 || n == 8) && p.gemm != SmallGemm::kBlas && layout != 1 &&
        (layout == 2 || B <= 0 || B >= kFmLanes * solve_threads(B)))
      p.fm = (int)n;
#endif
  }
  return p;
}

inline std::string plan_name(const CpuPlan& p) {
  std::string s = std::string("gemm=") + kGemmNames[(int)p.gemm] + " rows=" + kRowsNames[(int)p.rows] +
                  " layout=" + kLayoutNames[p.fm ? 1 : 0];
  if (p.chunk) s += " chunk=" + std::to_string(p.chunk);
  return s;
}

// C[M, D] (row stride ldc) = (beta ? C : 0) + A[M, D] (row stride lda) op(W), beta 0 or 1: the cell's
// GEMMs. op(W) = W^T (a Linear's forward; Wt: its [K][Nc] copy, Cell::w1t ...) or W (the VJP; Wt = W).
// The cell's tile kernel (gemm_small) when it has kn layouts (Wt non-null), else the BLAS.
// epi: added as C is stored (gemm_small.h: GemmEpi) by the tile kernels, by a pass over C after the BLAS.
template <typename T>
DEQFUSE_INLINE void cell_gemm(const Cell<T>& c, int64_t M, const T* A, int64_t lda, const T* W, const T* Wt,
                              bool trans_w, T beta, T* C, int64_t ldc, const GemmEpi<T>& epi = {}) {
  if constexpr (std::is_same_v<T, float>) {
    if (c.kn() && Wt) return gemm_small(c.plan.gemm, M, c.D, c.D, A, lda, Wt, c.D, beta != (T)0, C, ldc, epi);
  }
  gemm_rows<T>(M, c.D, c.D, A, lda, W, trans_w, beta, C, ldc);
  if (!epi.bias) return;
  const int64_t D = c.D;
  const T* bias = epi.bias;
  for (int64_t r = 0; r < M; ++r) {
    T* cr = C + r * ldc;
    if (epi.rows) {
      const T* xr = epi.rows[r];
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) cr[j] += bias[j] + xr[j];
    } else {
      const T scale = epi.scale;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) cr[j] += scale * bias[j];
    }
  }
}

// Sample index of a block's local row r: rows[r] when the block is a gathered set of samples, else b0 + r.
DEQFUSE_INLINE int64_t sample_of(const int64_t* rows, int64_t b0, int64_t r) { return rows ? rows[r] : b0 + r; }

// Forward of M rows. zp / outp: the block's own rows (row r at zp + r ZS, contiguous block); the
// per-sample inputs x [B, N, D], xf [B, D] and the saved tensors are indexed by sample_of(rows, b0, r)
// (rows null: samples b0 .. b0 + M - 1, i.e. z / out of the op offset by b0). scratch: 5 * M * D values.
template <typename T>
void forward_block_body(const Cell<T>& c, const T* zp, const T* xp, const T* xfp, T* outp, bool save,
                                       int64_t b0, int64_t M, const int64_t* rows, T* scratch) {
  const int64_t B = c.B, N = c.N, D = c.D, G = c.G, ZS = c.ZS;
  const T *w1 = c.w1, *b1 = c.b1, *w2 = c.w2, *b2 = c.b2, *g1w = c.g1w, *g1b = c.g1b, *g2w = c.g2w, *g2b = c.g2b;
  const T *g3w = c.g3w, *g3b = c.g3b, *wg = c.wg, *bg = c.bg, *wf = c.wf, *bf = c.bf, *gfw = c.gfw, *gfb = c.gfb;
  T *yh1 = c.yh1, *rs1 = c.rs1, *g1s = c.g1s, *yh2 = c.yh2, *rs2 = c.rs2, *us = c.us, *yh3 = c.yh3, *rs3 = c.rs3;
  T *zfs = c.zfs, *gas = c.gas, *a3s = c.a3s, *yhf = c.yhf, *rsf = c.rsf;
  T *a = scratch, *h = a + M * D, *s = h + M * D, *ga = s + M * D, *t = ga + M * D;
  const T* xrows[kMaxBlockRows];  // the GEMM epilogues' per-row addends (x_i, x_f rows of the block's samples)
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(M <= kMaxBlockRows);  // block_rows and the solves' chunks (kBlock) keep to it
  // s = N z_f, then += each modality's new state
  for (int64_t r = 0; r < M; ++r) {
    const T* zf = zp + r * ZS + N * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) s[r * D + j] = (T)N * zf[j];
  }
  for (int64_t i = 0; i < N; ++i) {
    // a1 = z_i W1_i^T ; + b1, GN1 (g1 saved), h = ReLU
    cell_gemm<T>(c, M, zp + i * D, ZS, w1 + i * D * D, c.w1t ? c.w1t + i * D * D : nullptr, true, 0, a, D,
                 GemmEpi<T>{b1 + i * D});
    gn_rows<T>(c.plan.gn, M, g1w + i * D, g1b + i * D, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {  // g1 (saved), h = ReLU(g1)
      const int64_t row = i * B + sample_of(rows, b0, r);  // row of the [N, B, .] saved buffers
      return GnRow<T>{.y = a + r * D, .out = save ? g1s + row * D : h + r * D,
                      .yhat = save ? yh1 + row * D : nullptr, .rstd = save ? rs1 + row * G : nullptr,
                      .relu = h + r * D};
    });
    // a2 = h W2_i^T ; + b2 + x_i, GN2, u = . + z_i (saved), ReLU, GN3 -> out_i ; s += out_i
    for (int64_t r = 0; r < M; ++r) xrows[r] = xp + (sample_of(rows, b0, r) * N + i) * D;
    cell_gemm<T>(c, M, h, D, w2 + i * D * D, c.w2t ? c.w2t + i * D * D : nullptr, true, 0, a, D,
                 GemmEpi<T>{b2 + i * D, xrows});
    auto u_of = [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      return save ? us + (i * B + sample_of(rows, b0, r)) * D : t + r * D;
    };
    // u = GN2 + z_i, a2's row = ReLU(u)
    gn_rows<T>(c.plan.gn, M, g2w + i * D, g2b + i * D, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      const int64_t row = i * B + sample_of(rows, b0, r);
      return GnRow<T>{.y = a + r * D, .out = u_of(r), .yhat = save ? yh2 + row * D : nullptr,
                      .rstd = save ? rs2 + row * G : nullptr, .add = zp + r * ZS + i * D, .relu = a + r * D};
    });
    gn_rows<T>(c.plan.gn, M, g3w + i * D, g3b + i * D, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {  // out_i, s += out_i
      const int64_t row = i * B + sample_of(rows, b0, r);
      return GnRow<T>{.y = a + r * D, .out = outp + r * ZS + i * D, .yhat = save ? yh3 + row * D : nullptr,
                      .rstd = save ? rs3 + row * G : nullptr, .acc = s + r * D};
    });
  }
  // gate: ga = s Wg^T + N bg ; q = z_f * ga ; a3 = q Wf^T + bf + x_f (saved) ; out_f = GN_f(ReLU(a3))
  cell_gemm<T>(c, M, s, D, wg, c.wgt, true, 0, ga, D, GemmEpi<T>{bg, nullptr, (T)N});
  for (int64_t r = 0; r < M; ++r) {
    const int64_t b = sample_of(rows, b0, r);
    const T* zf = zp + r * ZS + N * D;
    T *gr = ga + r * D, *q = h + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) q[j] = zf[j] * gr[j];
    if (save) {
      std::copy(zf, zf + D, zfs + b * D);
      std::copy(gr, gr + D, gas + b * D);
    }
  }
  for (int64_t r = 0; r < M; ++r) xrows[r] = xfp + sample_of(rows, b0, r) * D;
  cell_gemm<T>(c, M, h, D, wf, c.wft, true, 0, a, D, GemmEpi<T>{bf, xrows});
  for (int64_t r = 0; r < M; ++r) {
    T* ar = a + r * D;
    if (save) std::copy(ar, ar + D, a3s + sample_of(rows, b0, r) * D);
    relu_inplace(ar, D);
  }
  gn_rows<T>(c.plan.gn, M, gfw, gfb, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
    const int64_t b = sample_of(rows, b0, r);
    return GnRow<T>{.y = a + r * D, .out = outp + r * ZS + N * D, .yhat = save ? yhf + b * D : nullptr,
                    .rstd = save ? rsf + b * G : nullptr};
  });
}

template <typename T>
DEQFUSE_INLINE void keep_row(T* dst, int64_t row, int64_t D, const T* src) {
  if (dst) std::copy(src, src + D, dst + row * D);
}

// VJP of M rows: gp / outp the block's own rows (as zp / outp of forward_block); add (null: none) and
// the saved tensors indexed by sample_of(rows, b0, r); scratch: 5 * M * D values. Keep (parameter
// backward) only with rows null.
template <typename T>
void vjp_block_body(const Cell<T>& c, const T* gp, const T* addp, T* outp, int64_t b0, int64_t M,
                                   const int64_t* rows, T* scratch, const Keep<T>& kp) {
  const int64_t B = c.B, N = c.N, D = c.D, G = c.G, ZS = c.ZS;
  const T *w1 = c.w1, *w2 = c.w2, *g1w = c.g1w, *g2w = c.g2w, *g3w = c.g3w, *wg = c.wg, *wf = c.wf, *gfw = c.gfw;
  const T *yh1 = c.yh1, *rs1 = c.rs1, *g1s = c.g1s, *yh2 = c.yh2, *rs2 = c.rs2, *us = c.us, *yh3 = c.yh3;
  const T *rs3 = c.rs3, *zfs = c.zfs, *gas = c.gas, *a3s = c.a3s, *yhf = c.yhf, *rsf = c.rsf;
  T *da = scratch, *dq = da + M * D, *ds = dq + M * D, *du = ds + M * D, *t = du + M * D;
  // fusion branch: da3 = GN_f^T(gbar_f) * (a3 > 0) ; dq = da3 Wf ; ds = (dq * z_f) Wg
  gn_rows_backward<T>(c.plan.gn, M, gfw, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
    const int64_t b = sample_of(rows, b0, r);
    return GnBackRow<T>{.dout = gp + r * ZS + N * D, .yhat = yhf + b * D, .rstd = rsf + b * G, .dy = da + r * D,
                        .out_gate = a3s + b * D};
  });
  if (kp.da3)
    for (int64_t r = 0; r < M; ++r) keep_row(kp.da3, sample_of(rows, b0, r), D, da + r * D);
  cell_gemm<T>(c, M, da, D, wf, wf, false, 0, dq, D);
  for (int64_t r = 0; r < M; ++r) {
    const int64_t b = sample_of(rows, b0, r);
    const T* zf = zfs + b * D;
    T *q = dq + r * D, *d = da + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) d[j] = q[j] * zf[j];
    keep_row(kp.dga, b, D, d);
  }
  cell_gemm<T>(c, M, da, D, wg, wg, false, 0, ds, D);
  for (int64_t r = 0; r < M; ++r) {  // dz_f = dq * ga + N ds (+ add_f)
    const int64_t b = sample_of(rows, b0, r);
    const T *q = dq + r * D, *ga = gas + b * D, *sr = ds + r * D;
    T* of = outp + r * ZS + N * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) of[j] = q[j] * ga[j] + (T)N * sr[j];
    if (addp) {
      const T* ad = addp + b * ZS + N * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) of[j] += ad[j];
    }
  }
  for (int64_t i = 0; i < N; ++i) {
    // du = GN3^T(gbar_i + ds) * (u > 0), dz_i = du (+ add_i) ; da2 = GN2^T(du)
    // the row of the [N, B, .] saved tensors
    auto row_of = [&](int64_t r) DEQFUSE_LAMBDA_INLINE { return i * B + sample_of(rows, b0, r); };
    auto gn3_row = [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      const int64_t row = row_of(r);
      const T* add_i = addp ? addp + sample_of(rows, b0, r) * ZS + i * D : nullptr;
      return GnBackRow<T>{.dout = gp + r * ZS + i * D, .yhat = yh3 + row * D, .rstd = rs3 + row * G, .dy = du + r * D,
                          .dout_add = ds + r * D, .out_gate = us + row * D, .copy = outp + r * ZS + i * D,
                          .copy_add = add_i};
    };
    if (kp.dzn)  // kept: gbar_i + ds formed first, in du (else in the GroupNorm's loads)
      for (int64_t r = 0; r < M; ++r) {
        gn_back_pre_row(gn3_row(r), D);
        keep_row(kp.dzn, row_of(r), D, du + r * D);
      }
    gn_rows_backward<T>(c.plan.gn, M, g3w + i * D, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      return kp.dzn ? gn_back_g_row(gn3_row(r)) : gn3_row(r);
    });
    if (kp.du)
      for (int64_t r = 0; r < M; ++r) keep_row(kp.du, row_of(r), D, du + r * D);
    gn_rows_backward<T>(c.plan.gn, M, g2w + i * D, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      const int64_t row = row_of(r);
      return GnBackRow<T>{.dout = du + r * D, .yhat = yh2 + row * D, .rstd = rs2 + row * G, .dy = t + r * D};
    });
    if (kp.da2)
      for (int64_t r = 0; r < M; ++r) keep_row(kp.da2, row_of(r), D, t + r * D);
    // dh = da2 W2_i * (g1 > 0) ; da1 = GN1^T(dh) ; dz_i = du + da1 W1_i
    cell_gemm<T>(c, M, t, D, w2 + i * D * D, w2 + i * D * D, false, 0, da, D);
    auto gn1_row = [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      const int64_t row = row_of(r);
      return GnBackRow<T>{.dout = da + r * D, .yhat = yh1 + row * D, .rstd = rs1 + row * G, .dy = da + r * D,
                          .in_gate = g1s + row * D};
    };
    if (kp.dg1)  // kept: the ReLU mask applied first (else in the GroupNorm's loads)
      for (int64_t r = 0; r < M; ++r) {
        gn_back_pre_row(gn1_row(r), D);
        keep_row(kp.dg1, row_of(r), D, da + r * D);
      }
    gn_rows_backward<T>(c.plan.gn, M, g1w + i * D, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      return kp.dg1 ? gn_back_g_row(gn1_row(r)) : gn1_row(r);
    });
    if (kp.da1)
      for (int64_t r = 0; r < M; ++r) keep_row(kp.da1, row_of(r), D, da + r * D);
    // dz_i (= du + add_i, written by GN3's row above) += da1 W1_i
    cell_gemm<T>(c, M, da, D, w1 + i * D * D, w1 + i * D * D, false, 1, outp + i * D, ZS);
  }
}

// Scratch values forward_block / vjp_block need for M rows of width D.
inline int64_t cell_scratch_size(int64_t M, int64_t D) { return 5 * M * D; }

// Runs fn(b0, M, scratch) over row blocks in one parallel region (scratch: 5 * block * D, uninitialised).
template <typename T, typename F>
void for_blocks(int64_t B, int64_t D, const F& fn) {
  const int64_t MB = block_rows(B);
  at::parallel_for(0, (B + MB - 1) / MB, 1, [&](int64_t k0, int64_t k1) {
    std::unique_ptr<T[]> scratch(new T[cell_scratch_size(MB, D)]);
    for (int64_t kb = k0; kb < k1; ++kb) fn(kb * MB, std::min(MB, B - kb * MB), scratch.get());
  });
}

// Parameter gradients over the whole batch (the cell's backward and its Jacobian-loss backward).

// dW rows j0 .. j0 + w of a D x D weight gradient: C [w, D] = A^T X over the batch's B rows, A = dY at column
// offset j0 (row stride lda), X [B, D] (row stride ldx), C at row stride D. The AVX2 tiles (gemm_tn_avx2)
// where the cell's own GEMMs run in tiles (float, D % 8 == 0: Cell::kn; an AVX-512 CPU has AVX2 too),
// else the BLAS.
template <typename T>
void weight_grad(const Cell<T>& c, int64_t w, const T* A, int64_t lda, const T* X, int64_t ldx, T* C) {
#ifdef DEQFUSE_AVX2_GEMM
  if constexpr (std::is_same_v<T, float>) {
    if (c.kn() && c.B > 0) return gemm_tn_avx2(w, c.D, c.B, A, lda, X, ldx, C, c.D);
  }
#endif
  gemm_tn<T>(w, c.D, c.B, A, lda, X, ldx, (T)0, C, c.D);
}

#ifdef DEQFUSE_X86_TARGETS
// column_sums for float with AVX2: 16 columns' double sums in four registers (the generic loop kept them in
// memory and split its float-to-double loads through the stack). Exactly the generic loop's values: each
// column's sum from 0 in batch order, and a product of two floats is exact in double, so fma(a, b, acc)
// rounds as acc + a * b does.
__attribute__((target("avx2,fma"))) inline void column_sums_avx2(int64_t B, int64_t w, const float* a, int64_t sa,
                                                                const float* b, int64_t sb, double* out) {
  int64_t j = 0;
  for (; j + 16 <= w; j += 16) {
    __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    for (int64_t r = 0; r < B; ++r) {
      const float* ar = a + r * sa + j;
      for (int v = 0; v < 4; ++v) {
        const __m256d x = _mm256_cvtps_pd(_mm_loadu_ps(ar + 4 * v));
        acc[v] = b ? _mm256_fmadd_pd(x, _mm256_cvtps_pd(_mm_loadu_ps(b + r * sb + j + 4 * v)), acc[v])
                   : _mm256_add_pd(acc[v], x);
      }
    }
    for (int v = 0; v < 4; ++v) _mm256_storeu_pd(out + j + 4 * v, acc[v]);
  }
  for (; j < w; ++j) {
    double s = 0;
    for (int64_t r = 0; r < B; ++r) s += b ? (double)a[r * sa + j] * (double)b[r * sb + j] : (double)a[r * sa + j];
    out[j] = s;
  }
}
#endif

// out[j] = sum over the B rows of a[r, j] (* b[r, j] when b is non-null), j < w, in double from 0 in row
// order (a at row stride sa, b at sb): the bias and GroupNorm-affine gradients, the same for any thread count.
template <typename T>
void column_sums(int64_t B, int64_t w, const T* a, int64_t sa, const T* b, int64_t sb, double* out) {
#ifdef DEQFUSE_X86_TARGETS
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma()) return column_sums_avx2(B, w, a, sa, b, sb, out);
  }
#endif
  std::fill(out, out + w, 0.0);
  for (int64_t r = 0; r < B; ++r) {
    const T* ar = a + r * sa;
    if (b) {
      const T* br = b + r * sb;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) out[j] += (double)ar[j] * (double)br[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) out[j] += (double)ar[j];
    }
  }
}

}  // namespace
}  // namespace deqfuse

#if defined(DEQFUSE_ROWS_ISA) && defined(DEQFUSE_X86_TARGETS) && __GNUC__ >= 11  // arch=x86-64-v3/v4: GCC 11
#pragma GCC pop_options
#endif
