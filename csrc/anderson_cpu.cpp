// C++ CPU Anderson step (so the compiled path runs and is tested without a GPU) and the op schema.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "anderson_check.h"
#include "cpu_simd.h"

namespace deqfuse {

// One sample's step (the contract of reference/anderson.py). g, mixed: [L] scratch rows. Pass 1 forms
// g = f(x) - x once (norms, then the history-rounded copy the Gram row is taken from); the Gram row is
// one contiguous dot product per ring slot; pass 2 writes the new slot and mixes slot by slot into an
// accumulator row (in slot order: the sum order of the reference). Every inner loop is over a
// contiguous row (SIMD).
template <typename scalar_t, typename hist_t, typename acc_t>
DEQFUSE_SIMD_CLONES void anderson_row(scalar_t* xb, const scalar_t* fb, hist_t* Xb, hist_t* Gb, acc_t* GGb,
                                      scalar_t* bxb, acc_t* brb, bool* cb, int32_t* nb, acc_t* ab, acc_t* rb,
                                      acc_t* gp, acc_t* mp, int64_t L, int m, int slot, int n, int64_t k,
                                      acc_t beta, acc_t lam, double tol, bool stop_rel) {
  acc_t dots[kMaxM], alpha[kMaxM], A[(kMaxM + 1) * (kMaxM + 1)], rhs[kMaxM + 1];
  acc_t g2 = 0, f2 = 0, gr2 = 0;
#pragma omp simd reduction(+ : g2, f2)
  for (int64_t l = 0; l < L; ++l) {
    const acc_t fv = (acc_t)fb[l], gv = fv - (acc_t)xb[l];
    gp[l] = gv;
    g2 += gv * gv;
    f2 += fv * fv;
  }
  if constexpr (!std::is_same_v<hist_t, acc_t>) {
    for (int64_t l = 0; l < L; ++l) gp[l] = (acc_t)(hist_t)gp[l];  // what the ring will hold
#pragma omp simd reduction(+ : gr2)
    for (int64_t l = 0; l < L; ++l) gr2 += gp[l] * gp[l];
  } else {
    gr2 = g2;
  }
  for (int j = 0; j < m; ++j) {
    acc_t d = 0;
    if (j < n && j != slot) {
      const hist_t* Gj = Gb + j * L;
#pragma omp simd reduction(+ : d)
      for (int64_t l = 0; l < L; ++l) d += (acc_t)Gj[l] * gp[l];
    }
    dots[j] = d;
  }
  const int fl = record_residual<acc_t>(g2, f2, stop_rel, tol, k, ab, rb, brb, nb, cb);
  if (fl & 1) std::copy(xb, xb + L, bxb);
  if (fl & 2) return;
  dots[slot] = gr2;
  for (int j = 0; j < m; ++j) GGb[slot * m + j] = GGb[j * m + slot] = dots[j];
  bordered_solve<acc_t>(GGb, m, n, lam, A, rhs, alpha);
  hist_t* Xs = Xb + slot * L;
  hist_t* Gs = Gb + slot * L;
  for (int64_t l = 0; l < L; ++l) {
    Xs[l] = (hist_t)xb[l];
    Gs[l] = (hist_t)gp[l];
  }
  for (int j = 0; j < n; ++j) {
    const acc_t a = alpha[j];
    const hist_t* Xj = Xb + j * L;
    const hist_t* Gj = Gb + j * L;
    if (j == 0) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) mp[l] = a * ((acc_t)Xj[l] + beta * (acc_t)Gj[l]);
    } else {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) mp[l] += a * ((acc_t)Xj[l] + beta * (acc_t)Gj[l]);
    }
  }
  for (int64_t l = 0; l < L; ++l) xb[l] = (scalar_t)mp[l];
}

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
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> g(L), mixed(L);
    for (int64_t b = b0; b < b1; ++b) {
      if (cp[b]) continue;  // frozen
      anderson_row<scalar_t, hist_t, acc_t>(xp + b * L, fp + b * L, Xp + b * m * L, Gp + b * m * L, GGp + b * m * m,
                                            bxp + b * L, brp + b, cp + b, np + b, ap + b, rp + b, g.data(),
                                            mixed.data(), L, (int)m, slot, n, k, (acc_t)beta, (acc_t)lam, tol,
                                            stop_rel);
    }
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
