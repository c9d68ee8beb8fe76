// Runtime ISA dispatch for the C++ CPU kernels' hot loops, without building the extension for one CPU:
// a function marked DEQFUSE_SIMD_CLONES is compiled twice by GCC (AVX2+FMA, x86-64-v3, and the
// baseline) and the loader picks the clone the running CPU supports (ifunc). The loops are written for
// the compiler's vectoriser (`#pragma omp simd`, needs -fopenmp), so the wider clone is the same code.
// Only plain functions carry the attribute: a lambda inside them is compiled for the baseline, so the
// per-row work lives in such functions, not in the at::parallel_for lambdas.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && !defined(DEQFUSE_NO_CLONES)
#define DEQFUSE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DEQFUSE_SIMD_CLONES
#endif

// Helpers called from a DEQFUSE_SIMD_CLONES function are forced inline so that they are compiled into
// each clone (a helper left out of line is compiled once, for the baseline ISA).
#if defined(__GNUC__)
#define DEQFUSE_INLINE inline __attribute__((always_inline))
#else
#define DEQFUSE_INLINE inline
#endif

// The same for a lambda, written after its parameter list: GCC compiles a lambda as a function of its own, for
// the baseline ISA, and may leave the cell's GroupNorm row lambdas (each builds a row's pointers, called per
// row) out of line.
#if defined(__GNUC__)
#define DEQFUSE_LAMBDA_INLINE __attribute__((always_inline))
#else
#define DEQFUSE_LAMBDA_INLINE
#endif

// x86-64 builds with GCC's target attributes (DEQFUSE_X86_TARGETS): kernels written with AVX2 + FMA or
// AVX-512F intrinsics (the GEMM tiles, GroupNorm, the Anderson step's dot products and mixing), each called
// only where the running CPU has its ISA; in other builds there are none and both checks say false.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DEQFUSE_NO_CLONES)
#define DEQFUSE_X86_TARGETS 1
#endif
namespace deqfuse {
// The choices of the CPU kernel plan that a caller forced (deqfuse.force_cpu_plan -> _C.set_cpu_plan):
// process-wide, read at each call; 0 = the plan's own choice. gemm: 1 + SmallGemm (gemm_small.h); rows: 1 zmm,
// 2 ymm; layout: 1 rows, 2 fm (solve_cpu.cpp); chunk: samples per chunk of the whole solves. A forced choice
// the CPU or the shape does not allow falls back to the plan's own. Defined in bindings.cpp.
struct PlanForce {
  std::atomic<int> gemm{0}, rows{0}, layout{0};
  std::atomic<int64_t> chunk{0};
};
PlanForce& plan_force();

namespace {
#ifdef DEQFUSE_X86_TARGETS
inline bool cpu_has_avx2_fma() {
  static const bool v = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  return v;
}
inline bool cpu_has_avx512f() {
  static const bool v = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
  return v;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
inline bool cpu_has_avx512f() { return false; }
#endif

// The cell's row passes (forward_block, vjp_block) in 512-bit vectors: on Intel CPUs with AVX-512
// (x86-64-v4), which run them at full width; not on AMD's, whose Zen 4 splits 512-bit operations (slower there:
// RESULTS.md, 2026-12-06). PlanForce::rows forces the choice (zmm still needs x86-64-v4, and cell_cpu_kernels.h's
// rows_zmm takes it only where the floats stay those of the ymm variant).
#if defined(DEQFUSE_X86_TARGETS) && __GNUC__ >= 11  // target("arch=x86-64-v4")
#define DEQFUSE_ZMM_ROWS __attribute__((target("arch=x86-64-v4")))
inline bool cpu_has_x86_64_v4() {
  static const bool v = [] {
    __builtin_cpu_init();  // x86-64-v4's AVX-512 subsets (every CPU with them has x86-64-v3)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512cd");
  }();
  return v;
}
inline bool cpu_rows_zmm() {
  static const bool intel = (__builtin_cpu_init(), __builtin_cpu_is("intel"));
  const int f = plan_force().rows.load(std::memory_order_relaxed);
  return cpu_has_x86_64_v4() && (f == 1 || (f == 0 && intel));
}
#else
inline bool cpu_rows_zmm() { return false; }
#endif
}  // namespace
}  // namespace deqfuse
