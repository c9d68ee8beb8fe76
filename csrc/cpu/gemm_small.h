// Which kernel runs the cell's D x D float GEMMs on this CPU (cell_cpu_kernels.h: CpuPlan::gemm, cell_gemm):
//   kAvx512  gemm_avx512 (gemm_avx512.h): AVX-512F, D % 16 == 0, D <= kAvx512GemmMaxD
//   kAvx2    gemm_avx2 (gemm_avx2.h): AVX2 + FMA without AVX-512F, D % 8 == 0, D <= kAvx2GemmMaxD (where
//            AVX-512 is there the BLAS's wider kernels keep the other widths)
//   kBlas    torch's BLAS (cpu_blas.h): float64, other widths, other CPUs
// The two tile kernels do the same FMA chain per output, and a row's result depends on neither the other rows
// nor M (the solves' results repeat across chunk sizes and compaction); the tests hold each kernel to the
// reference's tolerance only. PlanForce::gemm (plan.h) forces one where the CPU and D allow it, whatever D's
// size (tests: both tile kernels on one machine; benchmarks: the crossover with the BLAS); 0: the rules above.
// Kept over ATen's cpublas::brgemm (the same values): with the bias as a pass after it, brgemm took 1.02-1.11x
// these tiles' time at D <= 64, where they run (RESULTS.md).
#pragma once
#include <cstdint>

#include "gemm_avx2.h"
#include "gemm_avx512.h"
#include "plan.h"

namespace deqfuse {
namespace {

// Up to D = 128 a 16-column weight panel (8 KB) stays in L1 and the tiles beat the BLAS; past it the BLAS,
// which blocks for the cache, wins (RESULTS.md, 2026-12-03 afternoon).
constexpr int64_t kAvx2GemmMaxD = 128;

// 0: auto, else 1 + the SmallGemm forced (PlanForce::gemm).
inline int small_gemm_forced() { return plan_force().gemm.load(std::memory_order_relaxed); }

inline bool small_gemm_fits(SmallGemm k, int64_t D, bool any_size) {
  switch (k) {
#ifdef DEQFUSE_AVX512_GEMM
    case SmallGemm::kAvx512: return D > 0 && D % 16 == 0 && (any_size || D <= kAvx512GemmMaxD) && cpu_has_avx512f();
#endif
#ifdef DEQFUSE_AVX2_GEMM
    case SmallGemm::kAvx2: return D > 0 && D % 8 == 0 && (any_size || D <= kAvx2GemmMaxD) && cpu_has_avx2_fma();
#endif
    default: return false;
  }
}

// The kernel for float D x D GEMMs (kBlas for float64: call it only for float).
inline SmallGemm small_gemm_for(int64_t D) {
  const int f = small_gemm_forced();
  if (f) {
    const auto k = (SmallGemm)(f - 1);
    return small_gemm_fits(k, D, true) ? k : SmallGemm::kBlas;
  }
  if (small_gemm_fits(SmallGemm::kAvx512, D, false)) return SmallGemm::kAvx512;
  if (!cpu_has_avx512f() && small_gemm_fits(SmallGemm::kAvx2, D, false)) return SmallGemm::kAvx2;
  return SmallGemm::kBlas;
}

// C[M, Nc] = (accumulate ? C : 0) + A[M, K] Bk[K, Nc] (+ epi) with a tile kernel (k != kBlas, as small_gemm_for
// chose).
DEQFUSE_INLINE void gemm_small(SmallGemm k, int64_t M, int64_t Nc, int64_t K, const float* A, int64_t lda, const float* Bk,
                       int64_t ldb, bool accumulate, float* C, int64_t ldc, const GemmEpi<float>& epi = {}) {
#ifdef DEQFUSE_AVX512_GEMM
  if (k == SmallGemm::kAvx512)
    return gemm_avx512(M, Nc, K, A, lda, Bk, ldb, accumulate, C, ldc, epi.bias, epi.rows, epi.scale);
#endif
#ifdef DEQFUSE_AVX2_GEMM
  if (k == SmallGemm::kAvx2)
    return gemm_avx2(M, Nc, K, A, lda, Bk, ldb, accumulate, C, ldc, epi.bias, epi.rows, epi.scale);
#endif
  (void)k, (void)M, (void)Nc, (void)K, (void)A, (void)lda, (void)Bk, (void)ldb, (void)accumulate, (void)C, (void)ldc,
      (void)epi;
}

}  // namespace
}  // namespace deqfuse
