// Launcher and op registration of the CUDA Anderson step (kernel: anderson_kernel.cuh).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "anderson_kernel.cuh"

#include "../anderson_check.h"

namespace deqfuse {
namespace {
template <typename x_t, typename hist_t>
void launch(at::Tensor& x, const at::Tensor& fx, at::Tensor& X, at::Tensor& G, at::Tensor& GG, at::Tensor& best_x,
            at::Tensor& best_res, at::Tensor& converged, at::Tensor& nstep, at::Tensor& abs_out, at::Tensor& rel_out,
            int64_t k, double beta, double lam, double tol, bool stop_rel) {
  using acc_t = acc_of<x_t>;
  const int64_t B = x.size(0), L = x.size(1);
  const int m = (int)X.size(1);
  if (B == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
#define DF_ARGS                                                                                                  \
  x.data_ptr<x_t>(), fx.data_ptr<x_t>(), X.data_ptr<hist_t>(), G.data_ptr<hist_t>(), GG.data_ptr<acc_t>(),     \
      best_x.data_ptr<x_t>(), best_res.data_ptr<acc_t>(), converged.data_ptr<bool>(), nstep.data_ptr<int32_t>(), \
      abs_out.data_ptr<acc_t>(), rel_out.data_ptr<acc_t>(), L, m, (int)k, beta, lam, tol, stop_rel
  const dim3 grid((unsigned)B);
  if (L % 4 != 0)  // rare: scalar loads, one ring size
    anderson_step_kernel<x_t, hist_t, 1, kMaxM><<<grid, kStepThreads, 0, stream>>>(DF_ARGS);
  else if (m <= 2)  // contiguous buffers from the caching allocator: every row/slot is 4-element aligned
    anderson_step_kernel<x_t, hist_t, 4, 2><<<grid, kStepThreads, 0, stream>>>(DF_ARGS);
  else if (m <= 4)
    anderson_step_kernel<x_t, hist_t, 4, 4><<<grid, kStepThreads, 0, stream>>>(DF_ARGS);
  else if (m <= 6)
    anderson_step_kernel<x_t, hist_t, 4, 6><<<grid, kStepThreads, 0, stream>>>(DF_ARGS);
  else
    anderson_step_kernel<x_t, hist_t, 4, kMaxM><<<grid, kStepThreads, 0, stream>>>(DF_ARGS);
#undef DF_ARGS
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void anderson_step_cuda(at::Tensor x, at::Tensor fx, at::Tensor X, at::Tensor G, at::Tensor GG, at::Tensor best_x,
                        at::Tensor best_res, at::Tensor converged, at::Tensor nstep, at::Tensor abs_out,
                        at::Tensor rel_out, int64_t k, double beta, double lam, double tol, bool stop_rel) {
  check_anderson_args(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out, k);
  TORCH_CHECK(x.is_cuda(), "anderson_step (CUDA): x must be a CUDA tensor");
  TORCH_CHECK(k >= 0, "anderson_step: k must be >= 0, got ", std::to_string(k));
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anderson_step_cuda", [&] {
    using x_t = scalar_t;
    if (X.scalar_type() == x.scalar_type())
      launch<x_t, x_t>(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out, k, beta, lam, tol, stop_rel);
    else if (X.scalar_type() == at::kBFloat16)
      launch<x_t, at::BFloat16>(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out, k, beta, lam, tol, stop_rel);
    else if (X.scalar_type() == at::kHalf)
      launch<x_t, at::Half>(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out, k, beta, lam, tol, stop_rel);
    else
      TORCH_CHECK(false, "anderson_step: history dtype ", c10::toString(X.scalar_type()), " must be x's dtype, bf16 or fp16");
  });
}

}  // namespace deqfuse

TORCH_LIBRARY_IMPL(deqfuse, CUDA, m) { m.impl("anderson_step", &deqfuse::anderson_step_cuda); }
