// Instruction-set helpers of the C++ CPU kernels. The cell's row passes are compiled once per instruction
// set (rows_*.cpp, plan.h: RowKernels); the Anderson step's generic row loops (anderson_cpu_kernels.h) are
// DEQFUSE_SIMD_CLONES functions instead: GCC compiles them twice (x86-64-v3 and the baseline) and the loader
// picks the clone the CPU runs (ifunc). The loops are written for the compiler's vectoriser (`#pragma omp
// simd`, needs -fopenmp).
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && !defined(DEQFUSE_NO_CLONES)
#define DEQFUSE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DEQFUSE_SIMD_CLONES
#endif

// Helpers forced inline into their callers, so that they are compiled for the caller's instruction set (a
// clone, or a row file's target; a helper left out of line is compiled for its own).
#if defined(__GNUC__)
#define DEQFUSE_INLINE inline __attribute__((always_inline))
#else
#define DEQFUSE_INLINE inline
#endif

// The same for a lambda, written after its parameter list: the cell's GroupNorm row lambdas (each builds a
// row's pointers, called per row) are otherwise left out of line.
#if defined(__GNUC__)
#define DEQFUSE_LAMBDA_INLINE __attribute__((always_inline))
#else
#define DEQFUSE_LAMBDA_INLINE
#endif

// x86-64 builds with GCC's target attributes (DEQFUSE_X86_TARGETS): kernels written with AVX2 + FMA or
// AVX-512F intrinsics (the GEMM tiles, GroupNorm, the Anderson step's dot products and mixing) and the row
// files, each called only where the running CPU has its instruction set; in other builds there are none and
// every check below says false.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DEQFUSE_NO_CLONES)
#define DEQFUSE_X86_TARGETS 1
#endif
namespace deqfuse {
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
// The instruction-set levels the row files are compiled for (rows_ymm.cpp, rows_zmm.cpp; GCC 11 and later:
// before, those files are the baseline's and both say false). GCC 11 cannot ask for a level: there, the
// features that every CPU with them has the rest of the level with.
#if __GNUC__ < 11
inline bool cpu_has_x86_64_v3() { return false; }
inline bool cpu_has_x86_64_v4() { return false; }
#elif __GNUC__ >= 12
inline bool cpu_has_x86_64_v3() {
  static const bool v = (__builtin_cpu_init(), __builtin_cpu_supports("x86-64-v3"));
  return v;
}
inline bool cpu_has_x86_64_v4() {
  static const bool v = (__builtin_cpu_init(), __builtin_cpu_supports("x86-64-v4"));
  return v;
}
#else
inline bool cpu_has_x86_64_v3() {
  static const bool v = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                                   __builtin_cpu_supports("bmi2"));
  return v;
}
inline bool cpu_has_x86_64_v4() {
  static const bool v = (__builtin_cpu_init(), cpu_has_x86_64_v3() && __builtin_cpu_supports("avx512f") &&
                                                   __builtin_cpu_supports("avx512bw") &&
                                                   __builtin_cpu_supports("avx512dq") &&
                                                   __builtin_cpu_supports("avx512vl"));
  return v;
}
#endif
inline bool cpu_is_intel() {
  static const bool v = (__builtin_cpu_init(), __builtin_cpu_is("intel"));
  return v;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
inline bool cpu_has_avx512f() { return false; }
inline bool cpu_has_x86_64_v3() { return false; }
inline bool cpu_has_x86_64_v4() { return false; }
inline bool cpu_is_intel() { return false; }
#endif
}  // namespace
}  // namespace deqfuse
