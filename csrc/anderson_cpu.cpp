// C++ CPU Anderson step (so the compiled path runs and is tested without a GPU) and the op schema.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "anderson_check.h"

namespace deqfuse {

template <typename scalar_t, typename hist_t>
void anderson_step_cpu_impl(at::Tensor& x, const at::Tensor& fx, at::Tensor& X, at::Tensor& G, at::Tensor& GG,
                            at::Tensor& best_x, at::Tensor& best_res, at::Tensor& converged, at::Tensor& nstep,
                            at::Tensor& abs_out, at::Tensor& rel_out, int64_t k, double beta, double lam,
                            double tol, bool stop_rel) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = x.size(0), L = x.size(1), m = X.size(1);
  const int64_t slot = k % m, n = std::min<int64_t>(k + 1, m);
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
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    acc_t dots[kMaxM], alpha[kMaxM], A[(kMaxM + 1) * (kMaxM + 1)], rhs[kMaxM + 1];
    for (int64_t b = b0; b < b1; ++b) {
      if (cp[b]) continue;
      scalar_t* xb = xp + b * L;
      const scalar_t* fb = fp + b * L;
      hist_t* Xb = Xp + b * m * L;
      hist_t* Gb = Gp + b * m * L;
      acc_t g2 = 0, f2 = 0, gr2 = 0;
      for (int j = 0; j < m; ++j) dots[j] = 0;
      for (int64_t l = 0; l < L; ++l) {
        const acc_t xv = xb[l], fv = fb[l], g = fv - xv, gr = (acc_t)(hist_t)g;
        g2 += g * g;
        f2 += fv * fv;
        gr2 += gr * gr;
        for (int j = 0; j < n; ++j)
          if (j != slot) dots[j] += (acc_t)Gb[j * L + l] * gr;
      }
      const int fl = record_residual<acc_t>(g2, f2, stop_rel, tol, k, ap + b, rp + b, brp + b, np + b, cp + b);
      if (fl & 1) std::copy(xb, xb + L, bxp + b * L);
      if (fl & 2) continue;
      dots[slot] = gr2;
      acc_t* GGb = GGp + b * m * m;
      for (int j = 0; j < m; ++j) GGb[slot * m + j] = GGb[j * m + slot] = dots[j];
      bordered_solve<acc_t>(GGb, (int)m, (int)n, (acc_t)lam, A, rhs, alpha);
      for (int64_t l = 0; l < L; ++l) {
        const acc_t xv = xb[l], g = (acc_t)fb[l] - xv;
        Xb[slot * L + l] = (hist_t)xv;
        Gb[slot * L + l] = (hist_t)g;
        acc_t v = 0;
        for (int j = 0; j < n; ++j) v += alpha[j] * ((acc_t)Xb[j * L + l] + (acc_t)beta * (acc_t)Gb[j * L + l]);
        xb[l] = (scalar_t)v;
      }
    }
  });
}

void anderson_step_cpu(at::Tensor x, at::Tensor fx, at::Tensor X, at::Tensor G, at::Tensor GG, at::Tensor best_x,
                       at::Tensor best_res, at::Tensor converged, at::Tensor nstep, at::Tensor abs_out,
                       at::Tensor rel_out, int64_t k, double beta, double lam, double tol, bool stop_rel) {
  check_anderson_args(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out);
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
  m.def("modality_epilogue(Tensor a2, Tensor x, Tensor z, Tensor b2, Tensor gn2_w, Tensor gn2_b, "
        "Tensor gn3_w, Tensor gn3_b, int groups) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deqfuse, CPU, m) { m.impl("anderson_step", &deqfuse::anderson_step_cpu); }
