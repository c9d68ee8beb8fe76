// C++ CPU fusion cell: forward f(z, x) and its VJP J^T g, each as one op (schemas below).
// Contract: deqfuse/reference/cell.py (cell_forward / cell_vjp), float32 and float64.
//
// Layout: z, out, gbar [B, N+1, D]; x [B, N, D]; xf [B, D]; params in CellParams order
// (w1 [N, D, D], b1 [N, D], w2, b2, gn1_w, gn1_b, gn2_w, gn2_b, gn3_w, gn3_b [N, D], wg [D, D], bg [D],
// wf [D, D], bf [D], gnf_w [D], gnf_b [D]). GEMMs go through ATen (BLAS); everything between two
// GEMMs (bias, GroupNorm, ReLU, residual, injection, the modality sum, the gate product) is one pass
// over rows per stage, parallel over the batch. Intermediates are modality-major [N, B, D] so every
// GEMM reads and writes contiguous blocks.
//
// Saved for the VJP (cell_forward(save=True) returns them in this order; SAVED_NAMES in deqfuse/ops.py):
//   yhat1 [N,B,D], rstd1 [N,B,G], g1 [N,B,D], yhat2, rstd2, u [N,B,D], yhat3, rstd3,
//   zf [B,D], ga [B,D], a3 [B,D], yhatf [B,D], rstdf [B,G]
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "cell_check.h"
#include "cell_cpu_kernels.h"

namespace deqfuse {
namespace {

template <typename T>
std::tuple<at::Tensor, std::vector<at::Tensor>> forward_impl(const at::Tensor& z, const at::Tensor& x,
                                                             const at::Tensor& xf, const std::vector<at::Tensor>& p,
                                                             int64_t G, bool save) {
  const int64_t B = z.size(0), N = z.size(1) - 1, D = z.size(2);
  const auto opt = z.options();
  at::Tensor out = at::empty({B, N + 1, D}, opt);
  std::vector<at::Tensor> sv;
  if (save) {
    for (auto shape : std::vector<std::vector<int64_t>>{{N, B, D}, {N, B, G}, {N, B, D}, {N, B, D}, {N, B, G},
                                                        {N, B, D}, {N, B, D}, {N, B, G}, {B, D}, {B, D}, {B, D},
                                                        {B, D}, {B, G}})
      sv.push_back(at::empty(shape, opt));
  }
  const Cell<T> c(B, N, D, G, p, sv);
  const T *zp = ptr<T>(z), *xp = ptr<T>(x), *xfp = ptr<T>(xf);
  T* outp = out.data_ptr<T>();
  for_blocks<T>(B, D, [&](int64_t b0, int64_t M, T* scratch) {
    forward_block<T>(c, zp + b0 * c.ZS, xp, xfp, outp + b0 * c.ZS, save, b0, M, nullptr, scratch);
  });
  return {out, sv};
}

template <typename T>
at::Tensor vjp_impl(const at::Tensor& gbar, const std::vector<at::Tensor>& sv, const std::vector<at::Tensor>& p,
                    int64_t G, const at::Tensor& add, const Keep<T>& kp = Keep<T>()) {
  const int64_t B = gbar.size(0), N = gbar.size(1) - 1, D = gbar.size(2);
  at::Tensor out = at::empty({B, N + 1, D}, gbar.options());
  const Cell<T> c(B, N, D, G, p, sv);
  const T* gp = ptr<T>(gbar);
  T* outp = out.data_ptr<T>();
  const T* addp = add.defined() ? ptr<T>(add) : nullptr;
  for_blocks<T>(B, D, [&](int64_t b0, int64_t M, T* scratch) { vjp_block<T>(c, gp + b0 * c.ZS, addp, outp + b0 * c.ZS, b0, M, nullptr, scratch, kp); });
  return out;
}

// Gradients of everything: dz (= the VJP), dx, dxf and the 16 parameter gradients, from the VJP pass
// (which keeps the full-batch intermediate gradients) plus full-batch GEMMs and column sums (ATen).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> backward_impl(
    const at::Tensor& gbar, const at::Tensor& z, const std::vector<at::Tensor>& sv, const std::vector<at::Tensor>& p,
    int64_t G) {
  const int64_t B = gbar.size(0), N = gbar.size(1) - 1, D = gbar.size(2);
  const auto opt = gbar.options();
  at::Tensor dg1 = at::empty({N, B, D}, opt), da1 = at::empty({N, B, D}, opt), da2 = at::empty({N, B, D}, opt);
  at::Tensor du = at::empty({N, B, D}, opt), dzn = at::empty({N, B, D}, opt);
  at::Tensor dga = at::empty({B, D}, opt), da3 = at::empty({B, D}, opt);
  Keep<T> kp;
  kp.dg1 = dg1.data_ptr<T>(); kp.da1 = da1.data_ptr<T>(); kp.da2 = da2.data_ptr<T>(); kp.du = du.data_ptr<T>();
  kp.dzn = dzn.data_ptr<T>(); kp.dga = dga.data_ptr<T>(); kp.da3 = da3.data_ptr<T>();
  at::Tensor dz = vjp_impl<T>(gbar, sv, p, G, at::Tensor(), kp);
  const at::Tensor &yh1 = sv[0], &g1 = sv[2], &yh2 = sv[3], &yh3 = sv[6], &zf = sv[8], &ga = sv[9], &yhf = sv[11];
  at::Tensor zm = z.narrow(1, 0, N).transpose(0, 1);          // [N, B, D] view of the modality states
  at::Tensor h = at::relu(g1);
  at::Tensor s = (yh3 * p[8].unsqueeze(1) + p[9].unsqueeze(1)).sum(0) + zf * (double)N;  // sum_i z_i+ + N z_f
  at::Tensor gf = gbar.select(1, N);
  std::vector<at::Tensor> dp = {
      at::bmm(da1.transpose(1, 2), zm),                  // w1  [N, D, D]
      da1.sum(1),                                        // b1
      at::bmm(da2.transpose(1, 2), h),                   // w2
      da2.sum(1),                                        // b2
      (dg1 * yh1).sum(1), dg1.sum(1),                    // gn1_w, gn1_b
      (du * yh2).sum(1), du.sum(1),                      // gn2_w, gn2_b
      (dzn * yh3).sum(1), dzn.sum(1),                    // gn3_w, gn3_b
      at::mm(dga.t(), s), dga.sum(0) * (double)N,        // wg, bg
      at::mm(da3.t(), zf * ga), da3.sum(0),              // wf, bf
      (gf * yhf).sum(0), gf.sum(0)};                     // gnf_w, gnf_b
  return {dz, da2.transpose(0, 1).contiguous(), da3, dp};
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> cell_forward_cpu(const at::Tensor& z, const at::Tensor& x,
                                                                 const at::Tensor& xf,
                                                                 const std::vector<at::Tensor>& params,
                                                                 int64_t groups, bool save) {
  check_cell_args(z, x, xf, params, groups, "cell_forward", "z");
  const auto zc = z.contiguous(), xc = x.contiguous(), xfc = xf.contiguous();
  const auto p = contiguous_all(params);
  std::tuple<at::Tensor, std::vector<at::Tensor>> res;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "cell_forward_cpu", [&] {
    res = forward_impl<scalar_t>(zc, xc, xfc, p, groups, save);
  });
  return res;
}

// J^T gbar (+ add, when given: the adjoint fixed-point map g -> J^T g + grad in one pass).
at::Tensor cell_vjp_cpu(const at::Tensor& gbar, const std::vector<at::Tensor>& saved,
                        const std::vector<at::Tensor>& params, int64_t groups, const c10::optional<at::Tensor>& add) {
  check_saved(gbar, saved, params, groups, "cell_vjp");
  const int64_t G = groups;
  const auto gc = gbar.contiguous();
  const auto sv = contiguous_all(saved), p = contiguous_all(params);
  at::Tensor out;
  at::Tensor ac;
  if (add.has_value() && add->defined()) {
    TORCH_CHECK(add->sizes() == gbar.sizes() && add->scalar_type() == gbar.scalar_type() && add->device().is_cpu(),
                "cell_vjp: add must be a CPU tensor of gbar's shape ", shape_str(gbar.sizes()), " and dtype, got ",
                shape_str(add->sizes()), " ", c10::toString(add->scalar_type()));
    ac = add->contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(gbar.scalar_type(), "cell_vjp_cpu", [&] { out = vjp_impl<scalar_t>(gc, sv, p, G, ac); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> cell_backward_cpu(
    const at::Tensor& gbar, const at::Tensor& z, const std::vector<at::Tensor>& saved,
    const std::vector<at::Tensor>& params, int64_t groups) {
  check_saved(gbar, saved, params, groups, "cell_backward");
  TORCH_CHECK(z.sizes() == gbar.sizes() && z.scalar_type() == gbar.scalar_type() && z.device().is_cpu(),
              "cell_backward: z (the forward's input state) must be a CPU tensor of gbar's shape ",
              shape_str(gbar.sizes()), " and dtype, got ", shape_str(z.sizes()));
  const auto gc = gbar.contiguous();
  const auto sv = contiguous_all(saved), p = contiguous_all(params);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> res;
  AT_DISPATCH_FLOATING_TYPES(gbar.scalar_type(), "cell_backward_cpu", [&] {
    res = backward_impl<scalar_t>(gc, z, sv, p, groups);
  });
  return res;
}

}  // namespace deqfuse

TORCH_LIBRARY_FRAGMENT(deqfuse, m) {
  m.def("cell_forward(Tensor z, Tensor x, Tensor xf, Tensor[] params, int groups, bool save) -> (Tensor, Tensor[])");
  m.def("cell_vjp(Tensor gbar, Tensor[] saved, Tensor[] params, int groups, Tensor? add=None) -> Tensor");
  m.def("cell_backward(Tensor gout, Tensor z, Tensor[] saved, Tensor[] params, int groups) "
        "-> (Tensor dz, Tensor dx, Tensor dxf, Tensor[] dparams)");
}

TORCH_LIBRARY_IMPL(deqfuse, CPU, m) {
  m.impl("cell_forward", &deqfuse::cell_forward_cpu);
  m.impl("cell_vjp", &deqfuse::cell_vjp_cpu);
  m.impl("cell_backward", &deqfuse::cell_backward_cpu);
}

// Not differentiable (the layers call them with grad disabled): with grad enabled they still run, and a
// backward through their outputs raises instead of silently giving no gradient.
TORCH_LIBRARY_IMPL(deqfuse, Autograd, m) {
  m.impl("cell_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("cell_vjp", torch::autograd::autogradNotImplementedFallback());
  m.impl("cell_backward", torch::autograd::autogradNotImplementedFallback());
}
