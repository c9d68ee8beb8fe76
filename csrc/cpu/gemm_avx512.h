// Small float GEMMs with AVX-512 for the cell's hot loop (cell_cpu_kernels.h: cell_gemm):
//   C[M, Nc] (row stride ldc) = (accumulate ? C : 0) + A[M, K] (row stride lda) . Bk[K, Nc] (row stride ldb)
// all row-major, Nc a multiple of 16. Register tiles of 4 rows x 64 columns (16 accumulators); for each
// output the K products are added in order with one FMA each, so a row's result depends on neither the
// other rows nor M (a sample's value is the same whatever block it is evaluated in).
// Why not the BLAS: at the cell's sizes (M <= 64 rows, K = Nc = D ~ 64) torch's MKL sgemm spends about a
// fifth of its time copying the activations into its packed layout, on every call; the weights here are
// read in place from L1 (Bk: the weight in [K][Nc] layout -- its transpose, made once per op call, for a
// Linear's forward; the weight itself for the VJP).
// Compiled with the AVX-512F target attribute and used only where the CPU has it and D suits it
// (gemm_small.h: small_gemm_for).
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu_simd.h"

#ifdef DEQFUSE_X86_TARGETS
#define DEQFUSE_AVX512_GEMM 1
#include <immintrin.h>

namespace deqfuse {
namespace {

// The widest D gemm_small.h's auto choice gives this kernel. Each 4-row tile streams a 64-column panel of
// the weight (D x 64 values) from L1 and has no K blocking: up to D = 64 (a 16 KB panel) it beats the BLAS;
// from D = 128 the BLAS, which blocks for the cache, is faster (RESULTS.md, 2026-11-23 night).
constexpr int64_t kAvx512GemmMaxD = 64;

// R rows x V 16-column vectors of C. bias / rows: the store's epilogue (gemm_small.h: GemmEpi), bias offset to
// the tile's first column, rows to its first row, col the tile's first column within rows[r].
template <int R, int V>
__attribute__((target("avx512f"))) inline void gemm_tile_avx512(int64_t K, const float* A, int64_t lda,
                                                                const float* Bk, int64_t ldb, bool accumulate,
                                                                float* C, int64_t ldc, const float* bias,
                                                                const float* const* rows, int64_t col, float scale) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(Bk + k * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      __m512 c = acc[r][v];
      if (bias) {
        const __m512 b = _mm512_loadu_ps(bias + 16 * v);
        c = rows ? _mm512_add_ps(c, _mm512_add_ps(b, _mm512_loadu_ps(rows[r] + col + 16 * v)))
                 : _mm512_fmadd_ps(_mm512_set1_ps(scale), b, c);
      }
      _mm512_storeu_ps(C + r * ldc + 16 * v, c);
    }
}

template <int V>
__attribute__((target("avx512f"))) inline void gemm_cols_avx512(int64_t M, int64_t K, const float* A, int64_t lda,
                                                                const float* Bk, int64_t ldb, bool accumulate,
                                                                float* C, int64_t ldc, const float* bias,
                                                                const float* const* rows, int64_t col, float scale) {
  int64_t r = 0;
  auto rw = [&](int64_t q) { return rows ? rows + q : nullptr; };
  for (; r + 4 <= M; r += 4)
    gemm_tile_avx512<4, V>(K, A + r * lda, lda, Bk, ldb, accumulate, C + r * ldc, ldc, bias, rw(r), col, scale);
  A += r * lda;
  C += r * ldc;
  const float* const* rr = rw(r);
  switch (M - r) {
    case 3: return gemm_tile_avx512<3, V>(K, A, lda, Bk, ldb, accumulate, C, ldc, bias, rr, col, scale);
    case 2: return gemm_tile_avx512<2, V>(K, A, lda, Bk, ldb, accumulate, C, ldc, bias, rr, col, scale);
    case 1: return gemm_tile_avx512<1, V>(K, A, lda, Bk, ldb, accumulate, C, ldc, bias, rr, col, scale);
    default: return;
  }
}

// The GEMM of the module comment (Nc % 16 == 0), with the store epilogue (bias, rows) of gemm_small.h's GemmEpi.
__attribute__((target("avx512f"))) inline void gemm_avx512(int64_t M, int64_t Nc, int64_t K, const float* A,
                                                           int64_t lda, const float* Bk, int64_t ldb, bool accumulate,
                                                           float* C, int64_t ldc, const float* bias = nullptr,
                                                           const float* const* rows = nullptr, float scale = 1.0f) {
  for (int64_t n0 = 0; n0 < Nc; n0 += 64) {
    const float* B = Bk + n0;
    float* Cn = C + n0;
    const float* bn = bias ? bias + n0 : nullptr;
    switch (std::min<int64_t>(4, (Nc - n0) / 16)) {
      case 4: gemm_cols_avx512<4>(M, K, A, lda, B, ldb, accumulate, Cn, ldc, bn, rows, n0, scale); break;
      case 3: gemm_cols_avx512<3>(M, K, A, lda, B, ldb, accumulate, Cn, ldc, bn, rows, n0, scale); break;
      case 2: gemm_cols_avx512<2>(M, K, A, lda, B, ldb, accumulate, Cn, ldc, bn, rows, n0, scale); break;
      default: gemm_cols_avx512<1>(M, K, A, lda, B, ldb, accumulate, Cn, ldc, bn, rows, n0, scale); break;
    }
  }
}

}  // namespace
}  // namespace deqfuse
#endif
