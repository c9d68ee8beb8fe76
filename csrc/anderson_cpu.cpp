// C++ CPU Anderson step (so the compiled path runs and is tested without a GPU) and the op schema.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "anderson_check.h"
#include "cpu/anderson_cpu_kernels.h"

namespace deqfuse {

template <typename scalar_t, typename hist_t>
void anderson_step_cpu_impl(at::Tensor& x, const at::Tensor& fx, at::Tensor& X, at::Tensor& G, at::Tensor& GG,
                            at::Tensor& best_x, at::Tensor& best_res, at::Tensor& converged, at::Tensor& nstep,
                            at::Tensor& abs_out, at::Tensor& rel_out, int64_t k, double beta, double lam,
                            double tol, bool stop_rel) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = x.size(0), L = x.size(1), m = X.size(1);
  const int slot = (int)(k % m), n = (int)std::min<int64_t>(k + 1, m);
  scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* fp = fx.data_ptr<scalar_t>();
  hist_t* Xp = X.data_ptr<hist_t>();
  hist_t* Gp = G.data_ptr<hist_t>();
  acc_t* GGp = GG.data_ptr<acc_t>();
  scalar_t* bxp = best_x.data_ptr<scalar_t>();
  acc_t* brp = best_res.data_ptr<acc_t>();
  bool* cp = converged.data_ptr<bool>();
  int32_t* np = nstep.data_ptr<int32_t>();
  acc_t* ap = abs_out.data_ptr<acc_t>();
  acc_t* rp = rel_out.data_ptr<acc_t>();
  const StepConst<acc_t> c{L, (int)m, slot, n, k, (acc_t)beta, (acc_t)lam, tol, stop_rel};
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> g(kStepRows * L);
    AndersonRow<scalar_t, hist_t, acc_t> rows[kStepRows];
    int R = 0;
    for (int64_t b = b0; b < b1; ++b) {
      if (cp[b]) continue;  // frozen
      rows[R++] = {xp + b * L, fp + b * L, Xp + b * m * L, Gp + b * m * L, GGp + b * m * m,
                   bxp + b * L, brp + b, cp + b, np + b, ap + b, rp + b};
      if (R == kStepRows) {
        anderson_rows<scalar_t, hist_t, acc_t>(rows, R, c, g.data());
        R = 0;
      }
    }
    if (R) anderson_rows<scalar_t, hist_t, acc_t>(rows, R, c, g.data());
  });
}

void anderson_step_cpu(at::Tensor x, at::Tensor fx, at::Tensor X, at::Tensor G, at::Tensor GG, at::Tensor best_x,
                       at::Tensor best_res, at::Tensor converged, at::Tensor nstep, at::Tensor abs_out,
                       at::Tensor rel_out, int64_t k, double beta, double lam, double tol, bool stop_rel) {
  check_anderson_args(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out, k);
  TORCH_CHECK(x.device().is_cpu(), "anderson_step (CPU): x must be a CPU tensor");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "anderson_step_cpu", [&] {
    using x_t = scalar_t;
    if (X.scalar_type() == x.scalar_type()) {
      anderson_step_cpu_impl<x_t, x_t>(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out, k,
                                       beta, lam, tol, stop_rel);
    } else if (X.scalar_type() == at::kBFloat16) {
      anderson_step_cpu_impl<x_t, at::BFloat16>(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out,
                                                rel_out, k, beta, lam, tol, stop_rel);
    } else if (X.scalar_type() == at::kHalf) {
      anderson_step_cpu_impl<x_t, at::Half>(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out,
                                            rel_out, k, beta, lam, tol, stop_rel);
    } else {
      TORCH_CHECK(false, "anderson_step: history dtype ", c10::toString(X.scalar_type()), " must be x's dtype, bf16 or fp16");
    }
  });
}

}  // namespace deqfuse

TORCH_LIBRARY(deqfuse, m) {
  m.def("anderson_step(Tensor(a!) x, Tensor fx, Tensor(b!) X, Tensor(c!) G, Tensor(d!) GG, Tensor(e!) best_x, "
        "Tensor(f!) best_res, Tensor(g!) converged, Tensor(h!) nstep, Tensor(i!) abs_out, Tensor(j!) rel_out, "
        "int k, float beta, float lam, float tol, bool stop_rel) -> ()");
}

TORCH_LIBRARY_IMPL(deqfuse, CPU, m) { m.impl("anderson_step", &deqfuse::anderson_step_cpu); }
