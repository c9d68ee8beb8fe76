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

#include "check_util.h"
#include "cpu_blas.h"
#include "cpu_simd.h"

namespace deqfuse {
namespace {

constexpr double kGnEps = 1e-5;  // nn.GroupNorm's default (reference/groupnorm.py EPS)
constexpr int kNumParams = 16;
constexpr int kNumSaved = 13;

// GroupNorm statistics of one group of n values: mean and 1/sqrt(var + eps) (two passes, in cache).
template <typename T, int64_t NC>  // NC > 0: the group width as a compile-time constant (unrolled)
DEQFUSE_INLINE void group_stats(const T* y, int64_t n_rt, T& mean, T& rstd) {
  const int64_t n = NC > 0 ? NC : n_rt;
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += y[j];
  mean = s / (T)n;
  T v = 0;
  const T m = mean;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < n; ++j) v += (y[j] - m) * (y[j] - m);
  rstd = (T)1 / std::sqrt(v / (T)n + (T)kGnEps);
}

template <typename T, int64_t NC>
DEQFUSE_INLINE void gn_row_n(const T* y, const T* gamma, const T* beta, int64_t D, int64_t G, T* out, T* yhat, T* rstd) {
  const int64_t n = NC > 0 ? NC : D / G;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * n;
    T mean, r;
    group_stats<T, NC>(y + o, n, mean, r);
    if (rstd) rstd[g] = r;
    const T *yo = y + o, *go = gamma + o, *bo = beta + o;
    T* oo = out + o;
    if (yhat) {
      T* ho = yhat + o;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const T h = (yo[j] - mean) * r;
        ho[j] = h;
        oo[j] = h * go[j] + bo[j];
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) oo[j] = (yo[j] - mean) * r * go[j] + bo[j];
    }
  }
}

// GroupNorm of one row y [D] (G groups): yhat = (y - mean) * rstd, out = yhat * gamma + beta.
// yhat / rstd [G] are written when non-null (saved for the VJP); out may alias y.
template <typename T>
DEQFUSE_INLINE void gn_row(const T* y, const T* gamma, const T* beta, int64_t D, int64_t G, T* out, T* yhat, T* rstd) {
  switch (D / G) {  // common group widths get fully unrolled loops (short groups: loop overhead dominates)
    case 8: return gn_row_n<T, 8>(y, gamma, beta, D, G, out, yhat, rstd);
    case 16: return gn_row_n<T, 16>(y, gamma, beta, D, G, out, yhat, rstd);
    case 32: return gn_row_n<T, 32>(y, gamma, beta, D, G, out, yhat, rstd);
    case 64: return gn_row_n<T, 64>(y, gamma, beta, D, G, out, yhat, rstd);
    default: return gn_row_n<T, 0>(y, gamma, beta, D, G, out, yhat, rstd);
  }
}

// GroupNorm backward of one row: dy = rstd * (d - mean(d) - yhat * mean(d * yhat)), d = dout * gamma.
// dy may alias dout.
template <typename T, int64_t NC>
DEQFUSE_INLINE void gn_row_backward_n(const T* dout, const T* gamma, const T* yhat, const T* rstd, int64_t D, int64_t G,
                              T* dy) {
  const int64_t n = NC > 0 ? NC : D / G;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * n;
    const T *d0 = dout + o, *g0 = gamma + o, *h0 = yhat + o;
    T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = 0; j < n; ++j) {
      const T d = d0[j] * g0[j];
      s1 += d;
      s2 += d * h0[j];
    }
    const T m1 = s1 / (T)n, m2 = s2 / (T)n, r = rstd[g];
    T* y0 = dy + o;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y0[j] = r * (d0[j] * g0[j] - m1 - h0[j] * m2);
  }
}

template <typename T>
DEQFUSE_INLINE void gn_row_backward(const T* dout, const T* gamma, const T* yhat, const T* rstd, int64_t D, int64_t G, T* dy) {
  switch (D / G) {
    case 8: return gn_row_backward_n<T, 8>(dout, gamma, yhat, rstd, D, G, dy);
    case 16: return gn_row_backward_n<T, 16>(dout, gamma, yhat, rstd, D, G, dy);
    case 32: return gn_row_backward_n<T, 32>(dout, gamma, yhat, rstd, D, G, dy);
    case 64: return gn_row_backward_n<T, 64>(dout, gamma, yhat, rstd, D, G, dy);
    default: return gn_row_backward_n<T, 0>(dout, gamma, yhat, rstd, D, G, dy);
  }
}

// z: the state (or gbar for the VJP, named by zname); x / xf undefined for the VJP. Messages are built
// only on failure (TORCH_CHECK evaluates them lazily): the checks cost ~nothing per solver iteration.
void check_cell_args(const at::Tensor& z, const at::Tensor& x, const at::Tensor& xf,
                     const std::vector<at::Tensor>& p, int64_t groups, const char* op, const char* zname) {
  TORCH_CHECK(z.dim() == 3, op, ": ", zname, " must be [B, N+1, D], got ", shape_str(z.sizes()));
  const int64_t B = z.size(0), N = z.size(1) - 1, D = z.size(2);
  TORCH_CHECK(N >= 1, op, ": ", zname, " must hold N >= 1 modality states and the fused state, got ",
              shape_str(z.sizes()));
  TORCH_CHECK(B < (int64_t(1) << 31) && D < (int64_t(1) << 31), op, ": ", zname, " too large for the BLAS ints");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op, ": ", zname,
              " must be float32 or float64, got ", c10::toString(z.scalar_type()));
  TORCH_CHECK(z.device().is_cpu(), op, ": ", zname, " must be a CPU tensor (this is the C++ CPU op)");
  TORCH_CHECK(groups >= 1 && D % groups == 0, op, ": groups (", std::to_string(groups), ") must divide D (",
              std::to_string(D), ")");
  auto like = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name, int idx) {
    const std::string nm = idx < 0 ? std::string(name) : "params[" + std::to_string(idx) + "] (" + name + ")";
    TORCH_CHECK(t.sizes() == shape, op, ": ", idx < 0 ? name : nm.c_str(), " must have shape ", shape_str(shape),
                ", got ", shape_str(t.sizes()));
    TORCH_CHECK(t.scalar_type() == z.scalar_type(), op, ": ", nm, " must have ", zname, "'s dtype ",
                c10::toString(z.scalar_type()), ", got ", c10::toString(t.scalar_type()));
    TORCH_CHECK(t.device().is_cpu(), op, ": ", nm, " must be a CPU tensor");
  };
  auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name, int idx) {
    if (t.sizes() != shape || t.scalar_type() != z.scalar_type() || !t.device().is_cpu()) like(t, shape, name, idx);
  };
  if (x.defined()) check(x, {B, N, D}, "x", -1);
  if (xf.defined()) check(xf, {B, D}, "xf", -1);
  TORCH_CHECK((int64_t)p.size() == kNumParams, op, ": params must hold the 16 CellParams tensors, got ",
              std::to_string(p.size()));
  static const char* names[kNumParams] = {"w1", "b1", "w2", "b2", "gn1_w", "gn1_b", "gn2_w", "gn2_b",
                                          "gn3_w", "gn3_b", "wg", "bg", "wf", "bf", "gnf_w", "gnf_b"};
  for (int i = 0; i < kNumParams; ++i) {
    if (i == 0 || i == 2) check(p[i], {N, D, D}, names[i], i);
    else if (i < 10) check(p[i], {N, D}, names[i], i);
    else if (i == 10 || i == 12) check(p[i], {D, D}, names[i], i);
    else check(p[i], {D}, names[i], i);
  }
}

// gbar [B, N+1, D] and the 13 tensors a cell_forward(save=True) of the same batch returned.
void check_saved(const at::Tensor& gbar, const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& params,
                 int64_t groups, const char* op) {
  check_cell_args(gbar, at::Tensor(), at::Tensor(), params, groups, op, "gbar");
  const int64_t B = gbar.size(0), N = gbar.size(1) - 1, D = gbar.size(2), G = groups;
  TORCH_CHECK((int64_t)saved.size() == kNumSaved, op, ": saved must hold the 13 tensors cell_forward(save=True) "
              "returns, got ", std::to_string(saved.size()));
  for (int i = 0; i < kNumSaved; ++i) {
    const int64_t last = (i == 1 || i == 4 || i == 7 || i == 12) ? G : D;
    const bool ok = i < 8 ? saved[i].sizes() == at::IntArrayRef({N, B, last}) : saved[i].sizes() == at::IntArrayRef({B, last});
    if (!ok) {
      const std::vector<int64_t> want = i < 8 ? std::vector<int64_t>{N, B, last} : std::vector<int64_t>{B, last};
      TORCH_CHECK(false, op, ": saved[", std::to_string(i), "] must have shape ", shape_str(want),
                  " (from a forward of the same batch), got ", shape_str(saved[i].sizes()));
    }
    TORCH_CHECK(saved[i].scalar_type() == gbar.scalar_type() && saved[i].device().is_cpu(), op, ": saved[",
                std::to_string(i), "] must be a CPU tensor of gbar's dtype");
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) { return t.data_ptr<T>(); }

// Rows per parallel task: the whole cell runs block by block in one parallel region, each block's
// intermediates staying in cache. Blocks of at most 64 rows, their count a multiple of the thread count
// and their sizes equal (+-1 row): at::parallel_for hands each thread an equal share of blocks, so a
// batch that is not a multiple of 64 (e.g. after compaction) still splits evenly.
inline int64_t block_rows(int64_t B) {
  const int64_t t = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nblocks = t * std::max<int64_t>(1, (B + 64 * t - 1) / (64 * t));
  return std::max<int64_t>(1, (B + nblocks - 1) / nblocks);
}

template <typename T>
DEQFUSE_INLINE void relu_inplace(T* a, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) a[j] = a[j] < 0 ? (T)0 : a[j];  // ReLU; NaN stays NaN (torch.relu)
}

// Raw pointers and sizes of one call: parameters, and the saved tensors (written by a forward with
// save=true, read by the VJP; null in a forward without save).
template <typename T>
struct Cell {
  int64_t B, N, D, G, ZS;  // ZS = (N+1) D: row stride of z / out / gbar
  const T *w1, *b1, *w2, *b2, *g1w, *g1b, *g2w, *g2b, *g3w, *g3b, *wg, *bg, *wf, *bf, *gfw, *gfb;
  T *yh1, *rs1, *g1s, *yh2, *rs2, *us, *yh3, *rs3, *zfs, *gas, *a3s, *yhf, *rsf;

  Cell(int64_t B_, int64_t N_, int64_t D_, int64_t G_, const std::vector<at::Tensor>& p,
       const std::vector<at::Tensor>& sv)
      : B(B_), N(N_), D(D_), G(G_), ZS((N_ + 1) * D_) {
    const T** pp[kNumParams] = {&w1, &b1, &w2, &b2, &g1w, &g1b, &g2w, &g2b, &g3w, &g3b, &wg, &bg, &wf, &bf, &gfw, &gfb};
    for (int i = 0; i < kNumParams; ++i) *pp[i] = p[i].data_ptr<T>();
    T** ss[kNumSaved] = {&yh1, &rs1, &g1s, &yh2, &rs2, &us, &yh3, &rs3, &zfs, &gas, &a3s, &yhf, &rsf};
    for (int i = 0; i < kNumSaved; ++i) *ss[i] = sv.empty() ? nullptr : sv[i].data_ptr<T>();
  }
};

// Forward of rows [b0, b0 + M): z, x, xf, out as in the op; scratch: 5 * M * D values.
template <typename T>
DEQFUSE_SIMD_CLONES void forward_block(const Cell<T>& c, const T* zp, const T* xp, const T* xfp, T* outp, bool save,
                                       int64_t b0, int64_t M, T* scratch) {
  const int64_t B = c.B, N = c.N, D = c.D, G = c.G, ZS = c.ZS;
  const T *w1 = c.w1, *b1 = c.b1, *w2 = c.w2, *b2 = c.b2, *g1w = c.g1w, *g1b = c.g1b, *g2w = c.g2w, *g2b = c.g2b;
  const T *g3w = c.g3w, *g3b = c.g3b, *wg = c.wg, *bg = c.bg, *wf = c.wf, *bf = c.bf, *gfw = c.gfw, *gfb = c.gfb;
  T *yh1 = c.yh1, *rs1 = c.rs1, *g1s = c.g1s, *yh2 = c.yh2, *rs2 = c.rs2, *us = c.us, *yh3 = c.yh3, *rs3 = c.rs3;
  T *zfs = c.zfs, *gas = c.gas, *a3s = c.a3s, *yhf = c.yhf, *rsf = c.rsf;
  T *a = scratch, *h = a + M * D, *s = h + M * D, *ga = s + M * D, *t = ga + M * D;
  // s = N z_f, then += each modality's new state
  for (int64_t r = 0; r < M; ++r) {
    const T* zf = zp + (b0 + r) * ZS + N * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) s[r * D + j] = (T)N * zf[j];
  }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = i * B + b0;  // row of [N, B, .] buffers
    // a1 = z_i W1_i^T ; + b1, GN1 (g1 saved), h = ReLU
    gemm_rows<T>(M, D, D, zp + b0 * ZS + i * D, ZS, w1 + i * D * D, true, 0, a, D);
    for (int64_t r = 0; r < M; ++r) {
      T* ar = a + r * D;
      const T* bi = b1 + i * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) ar[j] += bi[j];
      T* hr = h + r * D;
      T* g = save ? g1s + (base + r) * D : hr;
      gn_row<T>(ar, g1w + i * D, g1b + i * D, D, G, g, save ? yh1 + (base + r) * D : nullptr,
                save ? rs1 + (base + r) * G : nullptr);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) hr[j] = g[j] < 0 ? (T)0 : g[j];
    }
    // a2 = h W2_i^T ; + b2 + x_i, GN2, u = . + z_i (saved), ReLU, GN3 -> out_i ; s += out_i
    gemm_rows<T>(M, D, D, h, D, w2 + i * D * D, true, 0, a, D);
    for (int64_t r = 0; r < M; ++r) {
      const int64_t b = b0 + r;
      T* ar = a + r * D;
      const T *bi = b2 + i * D, *xi = xp + (b * N + i) * D, *zi = zp + b * ZS + i * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) ar[j] += bi[j] + xi[j];
      T* u = save ? us + (base + r) * D : t + r * D;
      gn_row<T>(ar, g2w + i * D, g2b + i * D, D, G, u, save ? yh2 + (base + r) * D : nullptr,
                save ? rs2 + (base + r) * G : nullptr);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        u[j] += zi[j];
        ar[j] = u[j] < 0 ? (T)0 : u[j];  // ReLU(u) (NaN stays NaN), reusing a2's row
      }
      T* o = outp + b * ZS + i * D;
      gn_row<T>(ar, g3w + i * D, g3b + i * D, D, G, o, save ? yh3 + (base + r) * D : nullptr,
                save ? rs3 + (base + r) * G : nullptr);
      T* sr = s + r * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) sr[j] += o[j];
    }
  }
  // gate: ga = s Wg^T + N bg ; q = z_f * ga ; a3 = q Wf^T + bf + x_f (saved) ; out_f = GN_f(ReLU(a3))
  gemm_rows<T>(M, D, D, s, D, wg, true, 0, ga, D);
  for (int64_t r = 0; r < M; ++r) {
    const int64_t b = b0 + r;
    const T* zf = zp + b * ZS + N * D;
    T *gr = ga + r * D, *q = h + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      gr[j] += (T)N * bg[j];
      q[j] = zf[j] * gr[j];
    }
    if (save) {
      std::copy(zf, zf + D, zfs + b * D);
      std::copy(gr, gr + D, gas + b * D);
    }
  }
  gemm_rows<T>(M, D, D, h, D, wf, true, 0, a, D);
  for (int64_t r = 0; r < M; ++r) {
    const int64_t b = b0 + r;
    T* ar = a + r * D;
    const T* xr = xfp + b * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) ar[j] += bf[j] + xr[j];
    if (save) std::copy(ar, ar + D, a3s + b * D);
    relu_inplace(ar, D);
    gn_row<T>(ar, gfw, gfb, D, G, outp + b * ZS + N * D, save ? yhf + b * D : nullptr,
              save ? rsf + b * G : nullptr);
  }
}

// Full-batch gradients the parameter backward needs, kept by vjp_block when given (else all null):
// the grads w.r.t. pre-activations/normalised outputs, [N, B, D] (modality-major) or [B, D].
template <typename T>
struct Keep {
  T* dg1 = nullptr;   // d GN1 output (after the ReLU mask)   [N, B, D]
  T* da1 = nullptr;   // d a1 (GN1 input)                     [N, B, D]
  T* da2 = nullptr;   // d a2 (= d x_i)                        [N, B, D]
  T* du = nullptr;    // d u (= d GN2 output)                  [N, B, D]
  T* dzn = nullptr;   // d z_i+ (= d GN3 output)               [N, B, D]
  T* dga = nullptr;   // d ga                                  [B, D]
  T* da3 = nullptr;   // d a3 (= d x_f)                        [B, D]
};

template <typename T>
DEQFUSE_INLINE void keep_row(T* dst, int64_t row, int64_t D, const T* src) {
  if (dst) std::copy(src, src + D, dst + row * D);
}

// VJP of rows [b0, b0 + M): gbar, out, add (null: none) as in the op; scratch: 5 * M * D values.
template <typename T>
DEQFUSE_SIMD_CLONES void vjp_block(const Cell<T>& c, const T* gp, const T* addp, T* outp, int64_t b0, int64_t M,
                                   T* scratch, const Keep<T>& kp) {
  const int64_t B = c.B, N = c.N, D = c.D, G = c.G, ZS = c.ZS;
  const T *w1 = c.w1, *w2 = c.w2, *g1w = c.g1w, *g2w = c.g2w, *g3w = c.g3w, *wg = c.wg, *wf = c.wf, *gfw = c.gfw;
  const T *yh1 = c.yh1, *rs1 = c.rs1, *g1s = c.g1s, *yh2 = c.yh2, *rs2 = c.rs2, *us = c.us, *yh3 = c.yh3;
  const T *rs3 = c.rs3, *zfs = c.zfs, *gas = c.gas, *a3s = c.a3s, *yhf = c.yhf, *rsf = c.rsf;
  T *da = scratch, *dq = da + M * D, *ds = dq + M * D, *du = ds + M * D, *t = du + M * D;
  // fusion branch: da3 = GN_f^T(gbar_f) * (a3 > 0) ; dq = da3 Wf ; ds = (dq * z_f) Wg
  for (int64_t r = 0; r < M; ++r) {
    const int64_t b = b0 + r;
    T* d = da + r * D;
    gn_row_backward<T>(gp + b * ZS + N * D, gfw, yhf + b * D, rsf + b * G, D, G, d);
    const T* a3 = a3s + b * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) d[j] = a3[j] > 0 ? d[j] : (T)0;
    keep_row(kp.da3, b, D, d);
  }
  gemm_rows<T>(M, D, D, da, D, wf, false, 0, dq, D);
  for (int64_t r = 0; r < M; ++r) {
    const T* zf = zfs + (b0 + r) * D;
    T *q = dq + r * D, *d = da + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) d[j] = q[j] * zf[j];
    keep_row(kp.dga, b0 + r, D, d);
  }
  gemm_rows<T>(M, D, D, da, D, wg, false, 0, ds, D);
  for (int64_t r = 0; r < M; ++r) {  // dz_f = dq * ga + N ds (+ add_f)
    const int64_t b = b0 + r;
    const T *q = dq + r * D, *ga = gas + b * D, *sr = ds + r * D;
    T* of = outp + b * ZS + N * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) of[j] = q[j] * ga[j] + (T)N * sr[j];
    if (addp) {
      const T* ad = addp + b * ZS + N * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) of[j] += ad[j];
    }
  }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = i * B + b0;
    // du = GN3^T(gbar_i + ds) * (u > 0) ; da2 = GN2^T(du)
    for (int64_t r = 0; r < M; ++r) {
      const int64_t b = b0 + r, row = base + r;
      const T *gi = gp + b * ZS + i * D, *sr = ds + r * D, *u = us + row * D;
      T *tr = t + r * D, *d = du + r * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) tr[j] = gi[j] + sr[j];
      keep_row(kp.dzn, row, D, tr);
      gn_row_backward<T>(tr, g3w + i * D, yh3 + row * D, rs3 + row * G, D, G, d);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) d[j] = u[j] > 0 ? d[j] : (T)0;
      keep_row(kp.du, row, D, d);
      gn_row_backward<T>(d, g2w + i * D, yh2 + row * D, rs2 + row * G, D, G, tr);
      keep_row(kp.da2, row, D, tr);
    }
    // dh = da2 W2_i * (g1 > 0) ; da1 = GN1^T(dh) ; dz_i = du + da1 W1_i
    gemm_rows<T>(M, D, D, t, D, w2 + i * D * D, false, 0, da, D);
    for (int64_t r = 0; r < M; ++r) {
      const int64_t row = base + r;
      T* d = da + r * D;
      const T* g1 = g1s + row * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) d[j] = g1[j] > 0 ? d[j] : (T)0;
      keep_row(kp.dg1, row, D, d);
      gn_row_backward<T>(d, g1w + i * D, yh1 + row * D, rs1 + row * G, D, G, d);
      keep_row(kp.da1, row, D, d);
      T* o = outp + (b0 + r) * ZS + i * D;  // dz_i = du (+ add_i), then += da1 W1_i below
      const T* dr = du + r * D;
      if (addp) {
        const T* ad = addp + (b0 + r) * ZS + i * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) o[j] = dr[j] + ad[j];
      } else {
        std::copy(dr, dr + D, o);
      }
    }
    gemm_rows<T>(M, D, D, da, D, w1 + i * D * D, false, 1, outp + b0 * ZS + i * D, ZS);
  }
}

// Runs fn(b0, M, scratch) over row blocks in one parallel region (scratch: 5 * block * D, uninitialised).
template <typename T, typename F>
void for_blocks(int64_t B, int64_t D, const F& fn) {
  const int64_t MB = block_rows(B);
  at::parallel_for(0, (B + MB - 1) / MB, 1, [&](int64_t k0, int64_t k1) {
    std::unique_ptr<T[]> scratch(new T[5 * MB * D]);
    for (int64_t kb = k0; kb < k1; ++kb) fn(kb * MB, std::min(MB, B - kb * MB), scratch.get());
  });
}

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
    forward_block<T>(c, zp, xp, xfp, outp, save, b0, M, scratch);
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
  for_blocks<T>(B, D, [&](int64_t b0, int64_t M, T* scratch) { vjp_block<T>(c, gp, addp, outp, b0, M, scratch, kp); });
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

std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
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
