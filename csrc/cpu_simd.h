// Runtime ISA dispatch for the C++ CPU kernels' hot loops, without building the extension for one CPU:
// a function marked DEQFUSE_SIMD_CLONES is compiled twice by GCC (AVX2+FMA, x86-64-v3, and the
// baseline) and the loader picks the clone the running CPU supports (ifunc). The loops are written for
// the compiler's vectoriser (`#pragma omp simd`, needs -fopenmp), so the wider clone is the same code.
// Only plain functions carry the attribute: a lambda inside them is compiled for the baseline, so the
// per-row work lives in such functions, not in the at::parallel_for lambdas.
#pragma once

#include <cstdlib>
#include <cstring>

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
// the baseline ISA, and left the cell's GroupNorm row lambdas (each builds a row's pointers) out of line once
// their rows grew: called per row, they took 3% of an adjoint solve's samples (perf, B=128 D=64 N=2).
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
// (x86-64-v4), which run them at full width (Emerald Rapids, B=128 D=64 N=2: the forward_block's share of a
// solve 14% -> 9%); not on AMD's, whose Zen 4 splits 512-bit operations (an x86-64-v4 forward_block measured
// 0.90x there). DEQFUSE_CPU_ROWS=zmm|ymm forces the choice (read once; zmm still needs x86-64-v4, and
// cell_cpu_kernels.h's rows_zmm takes it only where the floats stay those of the ymm variant).
#if defined(DEQFUSE_X86_TARGETS) && __GNUC__ >= 11  // target("arch=x86-64-v4")
#define DEQFUSE_ZMM_ROWS __attribute__((target("arch=x86-64-v4")))
inline bool cpu_rows_zmm() {
  static const bool v = [] {
    __builtin_cpu_init();  // x86-64-v4's AVX-512 subsets (every CPU with them has x86-64-v3)
    const bool can = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                     __builtin_cpu_supports("avx512cd");
    const char* e = std::getenv("DEQFUSE_CPU_ROWS");
    if (e && !std::strcmp(e, "zmm")) return can;
    if (e && !std::strcmp(e, "ymm")) return false;
    return can && __builtin_cpu_is("intel");
  }();
  return v;
}
#else
inline bool cpu_rows_zmm() { return false; }
#endif
}  // namespace
}  // namespace deqfuse
