// Small float GEMMs with AVX2 + FMA for the cell's hot loop on CPUs without AVX-512: the contract of gemm_avx512.h,
//   C[M, Nc] (row stride ldc) = (accumulate ? C : 0) + A[M, K] (row stride lda) . Bk[K, Nc] (row stride ldb)
// row-major, here with Nc a multiple of 8. For each output the K products are added in order with one FMA
// each, starting from 0 or C -- the same operations as gemm_avx512's, so the two kernels give the same
// values bit for bit, and a row's result depends on neither the other rows nor M.
// Register tiles of 6 rows x 16 columns (12 accumulators, 2 weight vectors, 1 broadcast: 15 of the 16 ymm
// registers), the weight read in place as 16-column panels (K x 16 values, 4 KB at K = 64) from L1. Why not
// the BLAS: at the cell's sizes (row blocks of <= 64 rows, K = Nc = D) MKL packs both operands on every call,
// and a block's 6 small GEMMs run back to back on the same few KB (RESULTS.md, 2026-12-03 afternoon).
#pragma once
#include <cstdint>

#include "cpu_simd.h"

#ifdef DEQFUSE_X86_TARGETS
#define DEQFUSE_AVX2_GEMM 1
#include <immintrin.h>

namespace deqfuse {
namespace {

// R rows x V 8-column vectors of C. TA: A is stored transposed, [K, M] at row stride lda (A^T Bk: gemm_tn_avx2).
// bias / rows / col: the store's epilogue, as gemm_tile_avx512's.
template <int R, int V, bool TA = false>
__attribute__((target("avx2,fma"))) inline void gemm_tile_avx2(int64_t K, const float* A, int64_t lda, const float* Bk,
                                                              int64_t ldb, bool accumulate, float* C, int64_t ldc,
                                                              const float* bias, const float* const* rows,
                                                              int64_t col, float scale) {
  __m256 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
  int64_t k = 0;
  do {  // K >= 1 (the caller's D); a loop that may run zero times made GCC 12 spill the accumulators every trip
    __m256 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm256_loadu_ps(Bk + k * ldb + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(TA ? A + k * lda + r : A + r * lda + k);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  } while (++k < K);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      __m256 c = acc[r][v];
      if (bias) {  // the epilogue, as gemm_tile_avx512's
        const __m256 b = _mm256_loadu_ps(bias + 8 * v);
        c = rows ? _mm256_add_ps(c, _mm256_add_ps(b, _mm256_loadu_ps(rows[r] + col + 8 * v)))
                 : _mm256_fmadd_ps(_mm256_set1_ps(scale), b, c);
      }
      _mm256_storeu_ps(C + r * ldc + 8 * v, c);
    }
}

template <int V, bool TA>
__attribute__((target("avx2,fma"))) inline void gemm_cols_avx2(int64_t M, int64_t K, const float* A, int64_t lda,
                                                              const float* Bk, int64_t ldb, bool accumulate, float* C,
                                                              int64_t ldc, const float* bias, const float* const* rows,
                                                              int64_t col, float scale) {
  int64_t r = 0;
  const int64_t ra = TA ? 1 : lda;  // A's stride between rows of C
  auto rw = [&](int64_t q) { return rows ? rows + q : nullptr; };
  for (; r + 6 <= M; r += 6)
    gemm_tile_avx2<6, V, TA>(K, A + r * ra, lda, Bk, ldb, accumulate, C + r * ldc, ldc, bias, rw(r), col, scale);
  A += r * ra;
  C += r * ldc;
  const float* const* rr = rw(r);
  switch (M - r) {
    case 5: return gemm_tile_avx2<5, V, TA>(K, A, lda, Bk, ldb, accumulate, C, ldc, bias, rr, col, scale);
    case 4: return gemm_tile_avx2<4, V, TA>(K, A, lda, Bk, ldb, accumulate, C, ldc, bias, rr, col, scale);
    case 3: return gemm_tile_avx2<3, V, TA>(K, A, lda, Bk, ldb, accumulate, C, ldc, bias, rr, col, scale);
    case 2: return gemm_tile_avx2<2, V, TA>(K, A, lda, Bk, ldb, accumulate, C, ldc, bias, rr, col, scale);
    case 1: return gemm_tile_avx2<1, V, TA>(K, A, lda, Bk, ldb, accumulate, C, ldc, bias, rr, col, scale);
    default: return;
  }
}

// The GEMM of the module comment (Nc % 8 == 0): 16-column panels, an 8-column one last where Nc % 16 == 8.
template <bool TA = false>
__attribute__((target("avx2,fma"))) inline void gemm_avx2(int64_t M, int64_t Nc, int64_t K, const float* A,
                                                         int64_t lda, const float* Bk, int64_t ldb, bool accumulate,
                                                         float* C, int64_t ldc, const float* bias = nullptr,
                                                         const float* const* rows = nullptr, float scale = 1.0f) {
  int64_t n0 = 0;
  auto bn = [&](int64_t c) { return bias ? bias + c : nullptr; };
  for (; n0 + 16 <= Nc; n0 += 16)
    gemm_cols_avx2<2, TA>(M, K, A, lda, Bk + n0, ldb, accumulate, C + n0, ldc, bn(n0), rows, n0, scale);
  if (n0 < Nc) gemm_cols_avx2<1, TA>(M, K, A, lda, Bk + n0, ldb, accumulate, C + n0, ldc, bn(n0), rows, n0, scale);
}

// C[M, Nc] = A^T Bk (Nc % 8 == 0, K >= 1) with A stored [K, M] at row stride lda and Bk [K, Nc] at row stride
// ldb: a Linear's weight gradient over K batch rows (dW = dY^T X), or the rows of it that A's column offset
// selects. The tiles of gemm_avx2 with A's element (r, k) broadcast from A + k lda + r: each output is the K
// products added in batch order by one FMA each from 0, so it depends on neither the thread count nor the
// slice of rows a thread computes. Why not the BLAS: called per thread on a column slice inside the backward's
// parallel region, MKL goes through its OpenMP driver and copies both operands on every call.
__attribute__((target("avx2,fma"))) inline void gemm_tn_avx2(int64_t M, int64_t Nc, int64_t K, const float* A,
                                                            int64_t lda, const float* Bk, int64_t ldb, float* C,
                                                            int64_t ldc) {
  gemm_avx2<true>(M, Nc, K, A, lda, Bk, ldb, false, C, ldc);
}

// wt = w^T for a D x D row-major float matrix, D % 8 == 0, in 8 x 8 blocks (unpack / shuffle / lane
// permute): the [K][Nc] weight copies the tile kernels read in a Linear's forward (Cell's constructor, once
// per op call); an element-wise loop's strided stores dominated a small cell_forward call.
__attribute__((target("avx2,fma"))) inline void transpose_avx2(const float* w, float* wt, int64_t D) {
  for (int64_t r0 = 0; r0 < D; r0 += 8) {
    for (int64_t c0 = 0; c0 < D; c0 += 8) {
      __m256 v[8], t[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(w + (r0 + i) * D + c0);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        v[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        v[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        v[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        v[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      // v[0..3]: columns 0, 1, 2, 3 of rows 0-3 (low lane) / columns 4-7 (high lane); v[4..7]: rows 4-7
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(wt + (c0 + i) * D + r0, _mm256_permute2f128_ps(v[i], v[i + 4], 0x20));
        _mm256_storeu_ps(wt + (c0 + i + 4) * D + r0, _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
      }
    }
  }
}

}  // namespace
}  // namespace deqfuse
#endif
