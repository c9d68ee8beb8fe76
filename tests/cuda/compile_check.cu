// Stand-alone translation unit: instantiates every kernel template of csrc/cuda/*.cuh for each dtype
// the launchers dispatch to, so nvcc checks them without torch's CUDA headers (see tests/nvcc_compile.py).
#include "../../csrc/cuda/anderson_kernel.cuh"
#include "../../csrc/cuda/routing_kernel.cuh"

namespace deqfuse {
#define DF_STEP1(X, H, V, MT)                                                                            \
  template __global__ void anderson_step_kernel<X, H, V, MT>(X*, const X*, H*, H*, acc_of<X>*, X*, acc_of<X>*,   \
                                                              bool*, int32_t*, acc_of<X>*, acc_of<X>*, int64_t, \
                                                              int, int, double, double, double, bool);
// the launcher's instances: V = 4 with ring sizes 2, 4, 6, 8; V = 1 with 8
#define DF_STEP(X, H) DF_STEP1(X, H, 4, 2) DF_STEP1(X, H, 4, 4) DF_STEP1(X, H, 4, 6) DF_STEP1(X, H, 4, 8) \
  DF_STEP1(X, H, 1, 8)
DF_STEP(float, float)
DF_STEP(double, double)
DF_STEP(float, c10::BFloat16)
DF_STEP(float, c10::Half)
DF_STEP(double, c10::BFloat16)
DF_STEP(c10::BFloat16, c10::BFloat16)
DF_STEP(c10::Half, c10::Half)
#undef DF_STEP
#undef DF_STEP1
template __global__ void group_by_choice_kernel<int64_t>(const int64_t*, int64_t, int, int64_t*, int32_t*);
template __global__ void group_by_choice_kernel<int32_t>(const int32_t*, int64_t, int, int64_t*, int32_t*);
template __global__ void move_rows_kernel<true>(RowMoves, const int64_t*, int64_t);
template __global__ void move_rows_kernel<false>(RowMoves, const int64_t*, int64_t);
}  // namespace deqfuse
