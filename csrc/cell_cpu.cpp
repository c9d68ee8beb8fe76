// C++ CPU fusion cell: forward f(z, x) and its VJP J^T g, each as one op (schemas below).
// Contract: deqfuse/reference/cell.py (cell_forward / cell_vjp), float32 and float64.
//
// Layout: z, out, gbar [B, N+1, D]; x [B, N, D]; xf [B, D]; params in CellParams order
// (w1 [N, D, D], b1 [N, D], w2, b2, gn1_w, gn1_b, gn2_w, gn2_b, gn3_w, gn3_b [N, D], wg [D, D], bg [D],
// wf [D, D], bf [D], gnf_w [D], gnf_b [D]). The GEMMs run in register tiles or torch's BLAS (gemm_small.h picks
// by CPU and D); everything between two GEMMs (bias, GroupNorm, ReLU, residual, injection, the modality sum,
// the gate product) is one pass over rows per stage, in blocks of rows parallel over the batch
// (cell_cpu_kernels.h). Intermediates are modality-major [N, B, D] so every GEMM reads and writes contiguous
// blocks.
//
// Saved for the VJP (cell_forward(save=True) returns them in this order; SAVED_NAMES in deqfuse/ops.py):
//   yhat1 [N,B,D], rstd1 [N,B,G], g1 [N,B,D], yhat2, rstd2, u [N,B,D], yhat3, rstd3,
//   zf [B,D], ga [B,D], a3 [B,D], yhatf [B,D], rstdf [B,G]
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "cell_check.h"
#include "cpu/cell_cpu_kernels.h"

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
  const Cell<T> c(B, N, D, G, p, sv, /*forward=*/true);
  const T *zp = ptr<T>(z), *xp = ptr<T>(x), *xfp = ptr<T>(xf);
  T* outp = out.data_ptr<T>();
  for_blocks<T>(B, D, [&](int64_t b0, int64_t M, T* scratch) {
    c.rows->forward_block(c, zp + b0 * c.ZS, xp, xfp, outp + b0 * c.ZS, save, b0, M, nullptr, scratch);
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
  for_blocks<T>(B, D, [&](int64_t b0, int64_t M, T* scratch) { c.rows->vjp_block(c, gp + b0 * c.ZS, addp, outp + b0 * c.ZS, b0, M, nullptr, scratch, kp); });
  return out;
}

// Gradients of everything: dz (= the VJP), dx, dxf and the 16 parameter gradients, in two parallel passes
// and no ATen op besides the output allocations:
//   rows:    the VJP (vjp_block), keeping the full-batch gradients of the pre-activations (Keep), plus the
//            other per-row inputs of the weight GEMMs: h = ReLU(g1), s = N z_f + sum_i z_i+, q = z_f * ga;
//   columns: each thread owns a slice of the D output columns of every parameter gradient: its rows of
//            the weight GEMMs (dW = dY^T X over the whole batch) and its bias / GroupNorm-affine column
//            sums (accumulated in double, rows in batch order). No per-thread partial sums to reduce.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> backward_impl(
    const at::Tensor& gbar, const at::Tensor& z, const std::vector<at::Tensor>& sv, const std::vector<at::Tensor>& p,
    int64_t G) {
  const int64_t B = gbar.size(0), N = gbar.size(1) - 1, D = gbar.size(2), ZS = (N + 1) * D;
  const auto opt = gbar.options();
  auto nbd = [&] { return at::empty({N, B, D}, opt); };
  at::Tensor dg1 = nbd(), da1 = nbd(), da2 = nbd(), du = nbd(), dzn = nbd(), h = nbd();
  at::Tensor dga = at::empty({B, D}, opt), da3 = at::empty({B, D}, opt), s = at::empty({B, D}, opt);
  at::Tensor q = at::empty({B, D}, opt), dx = at::empty({B, N, D}, opt), dz = at::empty({B, N + 1, D}, opt);
  Keep<T> kp;
  kp.dg1 = dg1.data_ptr<T>(); kp.da1 = da1.data_ptr<T>(); kp.da2 = da2.data_ptr<T>(); kp.du = du.data_ptr<T>();
  kp.dzn = dzn.data_ptr<T>(); kp.dga = dga.data_ptr<T>(); kp.da3 = da3.data_ptr<T>();
  const Cell<T> c(B, N, D, G, p, sv);
  const T *gp = ptr<T>(gbar), *zp = ptr<T>(z);
  T *hp = h.data_ptr<T>(), *sp = s.data_ptr<T>(), *qp = q.data_ptr<T>(), *dxp = dx.data_ptr<T>();
  for_blocks<T>(B, D, [&](int64_t b0, int64_t M, T* scratch) {
    c.rows->vjp_block(c, gp + b0 * ZS, nullptr, dz.data_ptr<T>() + b0 * ZS, b0, M, nullptr, scratch, kp);
    for (int64_t b = b0; b < b0 + M; ++b) {
      const T *zf = c.zfs + b * D, *ga = c.gas + b * D;
      T *sr = sp + b * D, *qr = qp + b * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        sr[j] = (T)N * zf[j];
        qr[j] = zf[j] * ga[j];
      }
      for (int64_t i = 0; i < N; ++i) {
        const int64_t row = (i * B + b) * D;
        const T *g1 = c.g1s + row, *yh3 = c.yh3 + row, *w3 = c.g3w + i * D, *b3 = c.g3b + i * D;
        const T* d2 = kp.da2 + row;
        T *hr = hp + row, *dxr = dxp + (b * N + i) * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          hr[j] = g1[j] < 0 ? (T)0 : g1[j];
          sr[j] += yh3[j] * w3[j] + b3[j];  // z_i+ = GN3's output
          dxr[j] = d2[j];                   // dx_i = da2_i
        }
      }
    }
  });
  std::vector<at::Tensor> dp;
  for (int k = 0; k < kNumParams; ++k) dp.push_back(at::empty(p[k].sizes(), opt));
  auto dptr = [&](int k) { return dp[k].data_ptr<T>(); };
  const T *yh1 = c.yh1, *yh2 = c.yh2, *yh3 = c.yh3, *yhf = c.yhf;
  at::parallel_for(0, D, 8, [&](int64_t j0, int64_t j1) {
    const int64_t w = j1 - j0;
    for (int64_t i = 0; i < N; ++i) {  // dW1_i = da1_i^T z_i, dW2_i = da2_i^T h_i (rows j0..j1)
      const int64_t o = i * B * D;
      weight_grad<T>(c, w, kp.da1 + o + j0, D, zp + i * D, ZS, dptr(0) + i * D * D + j0 * D);
      weight_grad<T>(c, w, kp.da2 + o + j0, D, hp + o, D, dptr(2) + i * D * D + j0 * D);
    }
    weight_grad<T>(c, w, kp.dga + j0, D, sp, D, dptr(10) + j0 * D);  // dWg = dga^T s
    weight_grad<T>(c, w, kp.da3 + j0, D, qp, D, dptr(12) + j0 * D);  // dWf = da3^T q
    // column sums over the batch: dp[k][off + j] = scale * sum_b a[b, j] (* b[b, j] when b is given)
    struct Sum {
      int k;
      int64_t off;     // into the target's [N, D] (modality i: i D) or [D]
      const T *a, *b;  // rows of a at stride sa, of b at stride D
      int64_t sa;
      T scale;
    };
    std::vector<Sum> sums(8 * N + 4);
    size_t ns = 0;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t o = i * B * D;
      sums[ns++] = {1, i * D, kp.da1 + o, nullptr, D, 1};
      sums[ns++] = {3, i * D, kp.da2 + o, nullptr, D, 1};
      sums[ns++] = {4, i * D, kp.dg1 + o, yh1 + o, D, 1};
      sums[ns++] = {5, i * D, kp.dg1 + o, nullptr, D, 1};
      sums[ns++] = {6, i * D, kp.du + o, yh2 + o, D, 1};
      sums[ns++] = {7, i * D, kp.du + o, nullptr, D, 1};
      sums[ns++] = {8, i * D, kp.dzn + o, yh3 + o, D, 1};
      sums[ns++] = {9, i * D, kp.dzn + o, nullptr, D, 1};
    }
    sums[ns++] = {11, 0, kp.dga, nullptr, D, (T)N};
    sums[ns++] = {13, 0, kp.da3, nullptr, D, 1};
    sums[ns++] = {14, 0, gp + N * D, yhf, ZS, 1};  // gnf_w: sum gbar_f * yhat_f
    sums[ns++] = {15, 0, gp + N * D, nullptr, ZS, 1};
    std::unique_ptr<double[]> acc(new double[w]);
    for (size_t q = 0; q < ns; ++q) {
      const Sum& t = sums[q];
      column_sums<T>(B, w, t.a + j0, t.sa, t.b ? t.b + j0 : nullptr, D, acc.get());
      T* dst = dptr(t.k) + t.off + j0;
      for (int64_t j = 0; j < w; ++j) dst[j] = (T)(acc[j] * (double)t.scale);
    }
  });
  return {dz, dx, da3, dp};
}

// The GEMM floor of one cell evaluation (benchmarks/bench_small.py): the 2N + 2 D x D GEMMs of a forward
// of B rows, in the row blocks, threads and kernels the ops use (cell_gemm: the AVX-512 or AVX2 tiles of
// gemm_small.h where they apply, else the BLAS; blas forces the BLAS), with nothing else -- no GroupNorm,
// elementwise pass, Anderson step, allocation, dispatch or barrier. Each thread runs its blocks `reps`
// times in one parallel region; returns the wall seconds per evaluation. z: [B, (N+1) D] inputs (their values do not matter).
template <typename T>
double gemm_floor_impl(const at::Tensor& z, const std::vector<at::Tensor>& p, int64_t reps, bool blas) {
  const int64_t N = p[0].size(0), D = p[0].size(1), B = z.size(0);
  Cell<T> c(B, N, D, /*G=*/1, p, {}, /*forward=*/true);
  if (blas) c.plan.gemm = SmallGemm::kBlas;
  const T* zp = ptr<T>(z);
  const int64_t MB = block_rows(B), nblocks = (B + MB - 1) / MB;
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
    std::unique_ptr<T[]> scratch(new T[cell_scratch_size(MB, D)]());
    T *a = scratch.get(), *h = a + MB * D, *s = h + MB * D;
    for (int64_t rep = 0; rep < reps; ++rep) {
      for (int64_t kb = k0; kb < k1; ++kb) {
        const int64_t b0 = kb * MB, M = std::min(MB, B - b0);
        const T* zb = zp + b0 * c.ZS;
        for (int64_t i = 0; i < N; ++i) {
          cell_gemm<T>(c, M, zb + i * D, c.ZS, c.w1 + i * D * D, c.w1t ? c.w1t + i * D * D : nullptr, true, 0, h, D);
          cell_gemm<T>(c, M, h, D, c.w2 + i * D * D, c.w2t ? c.w2t + i * D * D : nullptr, true, 0, a, D);
        }
        cell_gemm<T>(c, M, a, D, c.wg, c.wgt, true, 0, s, D);
        cell_gemm<T>(c, M, s, D, c.wf, c.wft, true, 0, h, D);
      }
    }
  });
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / (double)reps;
}

}  // namespace

template <typename T>
Cell<T>::Cell(int64_t B_, int64_t N_, int64_t D_, int64_t G_, const std::vector<at::Tensor>& p,
              const std::vector<at::Tensor>& sv, bool forward)
    : B(B_), N(N_), D(D_), G(G_), ZS((N_ + 1) * D_) {
  const T** pp[kNumParams] = {&w1, &b1, &w2, &b2, &g1w, &g1b, &g2w, &g2b, &g3w, &g3b, &wg, &bg, &wf, &bf, &gfw, &gfb};
  for (int i = 0; i < kNumParams; ++i) *pp[i] = p[i].data_ptr<T>();
  T** ss[kNumSaved] = {&yh1, &rs1, &g1s, &yh2, &rs2, &us, &yh3, &rs3, &zfs, &gas, &a3s, &yhf, &rsf};
  for (int i = 0; i < kNumSaved; ++i) *ss[i] = sv.empty() ? nullptr : sv[i].data_ptr<T>();
  plan = select_plan<T>(D, G, B);
  rows = &row_kernels<T>(plan.rows);
  if (kn() && forward) {  // (2N + 2) transposed D x D weights: w1 [N], w2 [N], wg, wf
    const int64_t DD = D * D;
    wt_store.reset(new T[(2 * N + 2) * DD]);
    auto transpose = [&](const T* w, T* wt) {
#ifdef DEQFUSE_AVX2_GEMM
      if constexpr (std::is_same_v<T, float>) return transpose_avx2(w, wt, D);  // kn: AVX2, D % 8 == 0
#endif
      for (int64_t r = 0; r < D; ++r)
        for (int64_t k = 0; k < D; ++k) wt[k * D + r] = w[r * D + k];
    };
    for (int64_t i = 0; i < 2 * N; ++i) transpose((i < N ? w1 : w2) + (i % N) * DD, wt_store.get() + i * DD);
    transpose(wg, wt_store.get() + 2 * N * DD);
    transpose(wf, wt_store.get() + (2 * N + 1) * DD);
    w1t = wt_store.get();
    w2t = w1t + N * DD;
    wgt = w2t + N * DD;
    wft = wgt + DD;
  }
}
template struct Cell<float>;
template struct Cell<double>;

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
  const auto gc = gbar.contiguous(), zc = z.contiguous();  // read through raw pointers (row stride (N+1) D)
  const auto sv = contiguous_all(saved), p = contiguous_all(params);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> res;
  AT_DISPATCH_FLOATING_TYPES(gbar.scalar_type(), "cell_backward_cpu", [&] {
    res = backward_impl<scalar_t>(gc, zc, sv, p, groups);
  });
  return res;
}

double cell_gemm_floor_seconds(const at::Tensor& z, const std::vector<at::Tensor>& params, int64_t reps, bool blas) {
  TORCH_CHECK(z.dim() == 2 && params.size() == kNumParams && params[0].dim() == 3 &&
                  z.size(1) == (params[0].size(0) + 1) * params[0].size(1),
              "cell_gemm_floor_seconds: z must be [B, (N+1) D] and params the 16 CellParams tensors");
  TORCH_CHECK(reps >= 1, "cell_gemm_floor_seconds: reps must be >= 1, got ", std::to_string(reps));
  check_cell_args(z.view({z.size(0), params[0].size(0) + 1, params[0].size(1)}), at::Tensor(), at::Tensor(), params,
                  1, "cell_gemm_floor_seconds", "z");
  const auto zc = z.contiguous();
  const auto p = contiguous_all(params);
  double sec = 0;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "cell_gemm_floor", [&] { sec = gemm_floor_impl<scalar_t>(zc, p, reps, blas); });
  return sec;
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
