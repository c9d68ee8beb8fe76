// Argument checks of the anderson_step op, shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "anderson_common.h"
#include "check_util.h"

namespace deqfuse {

inline void check_anderson_args(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& X,
                                const at::Tensor& G, const at::Tensor& GG, const at::Tensor& best_x,
                                const at::Tensor& best_res, const at::Tensor& converged,
                                const at::Tensor& nstep, const at::Tensor& abs_out, const at::Tensor& rel_out,
                                int64_t k) {
  TORCH_CHECK(k >= 0, "anderson_step: the step index k must be >= 0, got ", std::to_string(k));
  TORCH_CHECK(x.dim() == 2, "anderson_step: x must be [B, L], got ", shape_str(x.sizes()));
  const auto B = x.size(0), L = x.size(1);
  TORCH_CHECK(X.dim() == 3 && X.size(0) == B && X.size(2) == L, "anderson_step: X must be [B, m, L], got ", shape_str(X.sizes()));
  const auto m = X.size(1);
  TORCH_CHECK(m >= 1 && m <= kMaxM, "anderson_step: m (X.size(1)) must be in [1, ", std::to_string(kMaxM), "], got ", std::to_string(m));
  auto same = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK(t.sizes() == shape, "anderson_step: ", name, " must have shape ", shape_str(shape), ", got ", shape_str(t.sizes()));
    TORCH_CHECK(t.device() == x.device(), "anderson_step: ", name, " is on ", t.device().str(), ", x is on ", x.device().str());
    TORCH_CHECK(t.is_contiguous(), "anderson_step: ", name, " must be contiguous");
  };
  same(x, {B, L}, "x");
  same(fx, {B, L}, "fx");
  same(X, {B, m, L}, "X");
  same(G, {B, m, L}, "G");
  same(GG, {B, m, m}, "GG");
  same(best_x, {B, L}, "best_x");
  for (auto* p : {&best_res, &converged, &nstep, &abs_out, &rel_out}) same(*p, {B}, "per-sample buffer");
  TORCH_CHECK(fx.scalar_type() == x.scalar_type() && best_x.scalar_type() == x.scalar_type(),
              "anderson_step: fx and best_x must have x's dtype ", c10::toString(x.scalar_type()));
  TORCH_CHECK(X.scalar_type() == G.scalar_type(), "anderson_step: X and G must share a dtype");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (auto* p : {&GG, &best_res, &abs_out, &rel_out})
    TORCH_CHECK(p->scalar_type() == acc, "anderson_step: GG/best_res/abs_out/rel_out must be ", c10::toString(acc), ", got ", c10::toString(p->scalar_type()));
  TORCH_CHECK(converged.scalar_type() == at::kBool, "anderson_step: converged must be bool");
  TORCH_CHECK(nstep.scalar_type() == at::kInt, "anderson_step: nstep must be int32");
}

}  // namespace deqfuse
