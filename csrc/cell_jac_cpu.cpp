// C++ CPU backward of the cell's Jacobian-loss term: the gradients of <wbar, J^T v> with respect to the
// cell's inputs z, x, xf and its 16 parameters, J = df/dz at the point a cell_forward(save=True) saw.
// Contract: deqfuse/reference/cell.py (cell_jac_backward: autograd through the reference cell_vjp, the
// ReLU masks held fixed, as autograd differentiates them). The Hutchinson Jacobian loss ||J^T v||^2
// (deqfuse/implicit.py) has the gradient 2 (dL) <J^T v, d(J^T v)> = this op with wbar = 2 dL J^T v, so a
// Jacobian-regularised training step needs no double backward through a graph of small ops.
//
// The math, per sample (modality i; bars: cotangents; the VJP's intermediates as in vjp_block):
//   VJP:     da3 = GNf^T(v_f) * [a3 > 0] ; dq = da3 Wf ; p = dq * zf ; ds = p Wg ; w_f = dq * ga + N ds
//            t_i = v_i + ds ; du_i = GN3^T(t_i) * [u > 0] ; da2_i = GN2^T(du_i) ; dh_i = da2_i W2 * [g1 > 0]
//            da1_i = GN1^T(dh_i) ; w_i = du_i + da1_i W1
//   reverse of the VJP (wbar given): cotangents of its inputs -- the weights, the GroupNorm scales, and the
//            saved values it reads (yhat and rstd of every GroupNorm, zf, ga);
//   reverse of the forward: those cotangents injected where the forward made the saved values, down to z,
//            x, xf and the parameters (a GroupNorm's input gets its yhat's and its rstd's cotangent).
// GroupNorm pieces (per group of n values, sums in T; yh, rs saved; GN^T(d) = rs (d~ - mean d~ - yh mean(d~ yh)),
// d~ = d * gamma):
//   reverse of GN^T with output cotangent y~: d~bar = GN^T_1(y~) (the projection is symmetric; gamma = 1),
//            dbar = d~bar * gamma, gammabar += d~bar * d, rsbar = sum y~ (d~ - mean d~ - yh mean(d~ yh)),
//            yhbar = -rs (y~ mean(d~ yh) + d~ mean(y~ yh));
//   reverse of the forward's yh = (y - mean) rs, rs = (var + eps)^-1/2:
//            ybar = GN^T_1(yhbar) - rsbar rs^2 yh / n.
// Layout as cell_cpu.cpp (modality-major [N, B, D] intermediates). Two passes: rows (blocks of samples
// in parallel; every cotangent the parameter gradients need goes to a full-batch buffer), then columns
// (each thread owns a slice of every parameter gradient's columns: its rows of the weight GEMMs, its
// column sums in double in batch order -- the same for any thread count), as cell_backward.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cell_check.h"
#include "cpu/cell_cpu_kernels.h"

namespace deqfuse {
namespace {

// Reverse of one row's GN^T (see the top): d (GN^T's input, before gamma), ybar (its output's cotangent).
// Writes dbar (= d~bar * gamma; may be null), pg (= d~bar * d: this row's gamma-gradient term), rsbar [G],
// yhbar [D]. dbar may alias ybar.
template <typename T>
DEQFUSE_INLINE void gn_bwd_reverse_row(const T* d, const T* gamma, const T* yh, const T* rs, const T* ybar, int64_t D,
                                       int64_t G, T* dbar, T* pg, T* rsbar, T* yhbar) {
  const int64_t n = D / G;
  const T inv = (T)1 / (T)n;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * n;
    T md = 0, mdy = 0, my = 0, myy = 0;
#pragma omp simd reduction(+ : md, mdy, my, myy)
    for (int64_t k = o; k < o + n; ++k) {
      const T dt = d[k] * gamma[k];
      md += dt;
      mdy += dt * yh[k];
      my += ybar[k];
      myy += ybar[k] * yh[k];
    }
    md *= inv; mdy *= inv; my *= inv; myy *= inv;
    const T r = rs[g];
    T rsb = 0;
#pragma omp simd reduction(+ : rsb)
    for (int64_t k = o; k < o + n; ++k) {
      const T dt = d[k] * gamma[k], y = yh[k], yb = ybar[k];
      const T dtb = r * (yb - my - y * myy);
      rsb += yb * (dt - md - y * mdy);
      yhbar[k] = -r * (yb * mdy + dt * myy);
      pg[k] = dtb * d[k];
      if (dbar) dbar[k] = dtb * gamma[k];
    }
    rsbar[g] = rsb;
  }
}

// Reverse of one row's forward GroupNorm statistics: ybar = GN^T_1(yhbar) - rsbar rs^2 yh / n (see the top).
template <typename T>
DEQFUSE_INLINE void gn_fwd_reverse_row(const T* yhbar, const T* rsbar, const T* yh, const T* rs, int64_t D, int64_t G,
                                       T* ybar) {
  const int64_t n = D / G;
  const T inv = (T)1 / (T)n;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * n;
    T m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
    for (int64_t k = o; k < o + n; ++k) {
      m1 += yhbar[k];
      m2 += yhbar[k] * yh[k];
    }
    m1 *= inv; m2 *= inv;
    const T r = rs[g], c = rsbar[g] * r * r * inv;
#pragma omp simd
    for (int64_t k = o; k < o + n; ++k) ybar[k] = r * (yhbar[k] - m1 - yh[k] * m2) - c * yh[k];
  }
}

// v where the ReLU's input was positive, else 0 (its derivative: the mask autograd uses). Both operands are
// read unconditionally, so the loops around it if-convert into vector selects.
template <typename T>
DEQFUSE_INLINE T masked(T gate, T v) { return gate > (T)0 ? v : (T)0; }

// Full-batch buffers the row pass fills for the column pass: [N, B, D] per modality (or [B, D]).
template <typename T>
struct JacKeep {
  T *da1, *a1b, *da2, *rdh0, *a2b, *h, *pg1, *g1b, *pg2, *ub, *pg3;  // [N, B, D]
  T *pf, *rds, *gab, *s, *da3, *rdq, *a3b, *q, *pgf, *sb;            // [B, D]
};

// Scratch values per row of a block (jac_block's layout): 5 vectors of the fusion branch (dq, ds, rds, rga,
// rzf) and 7 temporaries (t0 .. t6), per modality 3 yhat cotangents and 3 G rstd cotangents, and G for GNf's.
inline int64_t jac_scratch_size(int64_t M, int64_t N, int64_t D, int64_t G) {
  return M * ((12 + 3 * N) * D + 3 * N * G + G);
}

// The row pass for M samples b0 .. b0 + M - 1: v, wbar, z [B, N+1, D] at the op's offsets, dz / dx the
// outputs (dxf is kp.a3b). See the top for the math; the step names follow it.
template <typename T>
void jac_block(const Cell<T>& c, const T* vp, const T* wp, const T* zp, T* dzp, T* dxp, int64_t b0, int64_t M,
               T* scratch, const JacKeep<T>& kp) {
  const int64_t B = c.B, N = c.N, D = c.D, G = c.G, ZS = c.ZS, MD = M * D;
  T *dq = scratch, *ds = dq + MD, *rds = ds + MD, *rga = rds + MD, *rzf = rga + MD, *t0 = rzf + MD;
  T *t1 = t0 + MD, *t2 = t1 + MD, *t3 = t2 + MD, *t4 = t3 + MD, *t5 = t4 + MD, *t6 = t5 + MD;
  T* ryh = t6 + MD;                   // [N][3][M, D]: yhat cotangents of GN1, GN2, GN3 of modality i
  T* rrs = ryh + 3 * N * MD;          // [N][3][M, G]: their rstd cotangents
  T* rrsf = rrs + 3 * N * M * G;      // [M, G]
  auto RYH = [&](int64_t i, int k) { return ryh + (i * 3 + k) * MD; };
  auto RRS = [&](int64_t i, int k) { return rrs + (i * 3 + k) * M * G; };
  const int64_t nd = b0 * D, ng = b0 * G;  // offsets of this block's rows in the [B, .] saved tensors

  // -- VJP, fusion branch: da3 (kept), dq, p (kept), ds
  T* da3 = kp.da3 + nd;
  gn_rows_backward<T>(c.plan.gn, M, c.gfw, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
    return GnBackRow<T>{vp + r * ZS + N * D, c.yhf + nd + r * D, c.rsf + ng + r * G, da3 + r * D};
  });
#pragma omp simd
  for (int64_t e = 0; e < MD; ++e) da3[e] = masked(c.a3s[nd + e], da3[e]);
  cell_gemm<T>(c, M, da3, D, c.wf, c.wf, false, 0, dq, D);
  T* pf = kp.pf + nd;
#pragma omp simd
  for (int64_t e = 0; e < MD; ++e) pf[e] = dq[e] * c.zfs[nd + e];
  cell_gemm<T>(c, M, pf, D, c.wg, c.wg, false, 0, ds, D);
  // rds = N wbar_f (from w_f = ... + N ds), plus every modality's t-cotangent below
  for (int64_t r = 0; r < M; ++r)
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) rds[r * D + j] = (T)N * wp[r * ZS + N * D + j];

  for (int64_t i = 0; i < N; ++i) {
    const int64_t row0 = i * B + b0, od = row0 * D, og = row0 * G;  // this block in the [N, B, .] saved
    const T *yh1 = c.yh1 + od, *yh2 = c.yh2 + od, *yh3 = c.yh3 + od, *rs1 = c.rs1 + og, *rs2 = c.rs2 + og;
    const T *rs3 = c.rs3 + og, *g1 = c.g1s + od, *u = c.us + od;
    const T *g1w = c.g1w + i * D, *g2w = c.g2w + i * D, *g3w = c.g3w + i * D;
    const T *w1 = c.w1 + i * D * D, *w2 = c.w2 + i * D * D;
    const T *w1t = c.w1t ? c.w1t + i * D * D : nullptr, *w2t = c.w2t ? c.w2t + i * D * D : nullptr;
    T *t = t0, *du = t1, *dh = t2, *da2 = kp.da2 + od, *da1 = kp.da1 + od;
    // -- VJP, modality i: t, du, da2 (kept), dh, da1 (kept)
    for (int64_t r = 0; r < M; ++r) {
      const T *vi = vp + r * ZS + i * D, *dsr = ds + r * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) t[r * D + j] = vi[j] + dsr[j];
    }
    gn_rows_backward<T>(c.plan.gn, M, g3w, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      return GnBackRow<T>{t + r * D, yh3 + r * D, rs3 + r * G, du + r * D};
    });
#pragma omp simd
    for (int64_t e = 0; e < MD; ++e) du[e] = masked(u[e], du[e]);
    gn_rows_backward<T>(c.plan.gn, M, g2w, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      return GnBackRow<T>{du + r * D, yh2 + r * D, rs2 + r * G, da2 + r * D};
    });
    cell_gemm<T>(c, M, da2, D, w2, w2, false, 0, dh, D);
#pragma omp simd
    for (int64_t e = 0; e < MD; ++e) dh[e] = masked(g1[e], dh[e]);
    gn_rows_backward<T>(c.plan.gn, M, g1w, D, G, [&](int64_t r) DEQFUSE_LAMBDA_INLINE {
      return GnBackRow<T>{dh + r * D, yh1 + r * D, rs1 + r * G, da1 + r * D};
    });
    // -- reverse of the VJP, modality i. w_i = du + da1 W1: rda1 = wbar_i W1^T; rdu = wbar_i
    T *rda1 = t3, *rdh = t4, *rdu = t5, *rc = t6;
    cell_gemm<T>(c, M, wp + i * D, ZS, w1, w1t, true, 0, rda1, D);
    T *rdh0 = kp.rdh0 + od, *pg1 = kp.pg1 + od, *pg2 = kp.pg2 + od, *pg3 = kp.pg3 + od;
    for (int64_t r = 0; r < M; ++r) {
      gn_bwd_reverse_row<T>(dh + r * D, g1w, yh1 + r * D, rs1 + r * G, rda1 + r * D, D, G, rdh + r * D, pg1 + r * D,
                            RRS(i, 0) + r * G, RYH(i, 0) + r * D);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) rdh0[r * D + j] = masked(g1[r * D + j], rdh[r * D + j]);
    }
    T* rda2 = t3;  // dh0 = da2 W2: rda2 = rdh0 W2^T
    cell_gemm<T>(c, M, rdh0, D, w2, w2t, true, 0, rda2, D);
    for (int64_t r = 0; r < M; ++r) {
      T* rdr = rdu + r * D;
      gn_bwd_reverse_row<T>(du + r * D, g2w, yh2 + r * D, rs2 + r * G, rda2 + r * D, D, G, rdr, pg2 + r * D,
                            RRS(i, 1) + r * G, RYH(i, 1) + r * D);
      const T* wi = wp + r * ZS + i * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        const T sum = rdr[j] + wi[j];
        rc[r * D + j] = masked(u[r * D + j], sum);
      }
      T* rt = rdh + r * D;  // (rdh is free again)
      gn_bwd_reverse_row<T>(t + r * D, g3w, yh3 + r * D, rs3 + r * G, rc + r * D, D, G, rt, pg3 + r * D,
                            RRS(i, 2) + r * G, RYH(i, 2) + r * D);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) rds[r * D + j] += rt[j];
    }
  }

  // -- reverse of the VJP, fusion branch. w_f = dq * ga + N ds; ds = p Wg; p = dq * zf; dq = da3 Wf
  std::copy(rds, rds + MD, kp.rds + nd);
  T *rp = t0, *rdq = kp.rdq + nd;
  cell_gemm<T>(c, M, rds, D, c.wg, c.wgt, true, 0, rp, D);
  for (int64_t r = 0; r < M; ++r) {
    const T *wf_ = wp + r * ZS + N * D, *ga = c.gas + nd + r * D, *zf = c.zfs + nd + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      const int64_t e = r * D + j;
      rga[e] = wf_[j] * dq[e];
      rdq[e] = wf_[j] * ga[j] + rp[e] * zf[j];
      rzf[e] = rp[e] * dq[e];
    }
  }
  T* rda3 = t1;
  cell_gemm<T>(c, M, rdq, D, c.wf, c.wft, true, 0, rda3, D);
  T *ybar = t2, *pgf = kp.pgf + nd;
  for (int64_t r = 0; r < M; ++r) {
    const T* a3 = c.a3s + nd + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) rda3[r * D + j] = masked(a3[j], rda3[r * D + j]);
    gn_bwd_reverse_row<T>(vp + r * ZS + N * D, c.gfw, c.yhf + nd + r * D, c.rsf + ng + r * G, rda3 + r * D, D, G,
                          nullptr, pgf + r * D, rrsf + r * G, ybar + r * D);  // ybar: yhf's cotangent
  }

  // -- reverse of the forward, fusion branch: zf+ = GNf(ReLU(a3)); a3 = Wf q + bf + xf; q = zf * ga;
  //    ga = Wg s + N bg; s = sum_i z_i+ + N zf
  T* a3b = kp.a3b + nd;
  for (int64_t r = 0; r < M; ++r) {
    gn_fwd_reverse_row<T>(ybar + r * D, rrsf + r * G, c.yhf + nd + r * D, c.rsf + ng + r * G, D, G, a3b + r * D);
    const T* a3 = c.a3s + nd + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) a3b[r * D + j] = masked(a3[j], a3b[r * D + j]);
  }
  T* qb = t3;
  cell_gemm<T>(c, M, a3b, D, c.wf, c.wf, false, 0, qb, D);
  T *gab = kp.gab + nd, *q = kp.q + nd, *s = kp.s + nd, *sb = kp.sb + nd;
#pragma omp simd
  for (int64_t e = 0; e < MD; ++e) {
    gab[e] = rga[e] + qb[e] * c.zfs[nd + e];
    q[e] = c.zfs[nd + e] * c.gas[nd + e];
  }
  cell_gemm<T>(c, M, gab, D, c.wg, c.wg, false, 0, sb, D);
  for (int64_t r = 0; r < M; ++r) {
    T* dzf = dzp + r * ZS + N * D;
    const T *ga = c.gas + nd + r * D, *zf = c.zfs + nd + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      const int64_t e = r * D + j;
      dzf[j] = rzf[e] + qb[e] * ga[j] + (T)N * sb[e];
      s[e] = (T)N * zf[j];
    }
  }

  // -- reverse of the forward, modality i: z_i+ = GN3(ReLU(u)); u = GN2(a2) + z_i; a2 = W2 h + b2 + x_i;
  //    h = ReLU(GN1(a1)); a1 = W1 z_i + b1
  for (int64_t i = 0; i < N; ++i) {
    const int64_t row0 = i * B + b0, od = row0 * D, og = row0 * G;
    const T *yh1 = c.yh1 + od, *yh2 = c.yh2 + od, *yh3 = c.yh3 + od, *rs1 = c.rs1 + og, *rs2 = c.rs2 + og;
    const T *rs3 = c.rs3 + og, *g1 = c.g1s + od, *u = c.us + od;
    const T *g1w = c.g1w + i * D, *g2w = c.g2w + i * D, *g3w = c.g3w + i * D, *g3b = c.g3b + i * D;
    const T *w1 = c.w1 + i * D * D, *w2 = c.w2 + i * D * D;
    T *yb = t0, *ub = kp.ub + od, *a2b = kp.a2b + od, *g1b = kp.g1b + od, *a1b = kp.a1b + od, *h = kp.h + od;
    T *pg1 = kp.pg1 + od, *pg2 = kp.pg2 + od, *pg3 = kp.pg3 + od;
    for (int64_t r = 0; r < M; ++r) {
      const int64_t e0 = r * D;
      T* ry3 = RYH(i, 2) + e0;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        ry3[j] += sb[e0 + j] * g3w[j];          // z_i+ = yh3 gamma3 + beta3 feeds s
        pg3[e0 + j] += sb[e0 + j] * yh3[e0 + j];
        s[e0 + j] += yh3[e0 + j] * g3w[j] + g3b[j];
      }
      gn_fwd_reverse_row<T>(ry3, RRS(i, 2) + r * G, yh3 + e0, rs3 + r * G, D, G, ub + e0);
      T* ry2 = RYH(i, 1) + e0;
      T* dzi = dzp + r * ZS + i * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        const T ubj = masked(u[e0 + j], ub[e0 + j]);
        ub[e0 + j] = ubj;
        dzi[j] = ubj;                            // u = g2 + z_i
        pg2[e0 + j] += ubj * yh2[e0 + j];
        ry2[j] += ubj * g2w[j];
      }
      gn_fwd_reverse_row<T>(ry2, RRS(i, 1) + r * G, yh2 + e0, rs2 + r * G, D, G, a2b + e0);
      T* dxi = dxp + (b0 + r) * N * D + i * D;
      std::copy(a2b + e0, a2b + e0 + D, dxi);   // a2 = ... + x_i
    }
    cell_gemm<T>(c, M, a2b, D, w2, w2, false, 0, yb, D);  // hbar = a2bar W2
    for (int64_t r = 0; r < M; ++r) {
      const int64_t e0 = r * D;
      T* ry1 = RYH(i, 0) + e0;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        const T gb = masked(g1[e0 + j], yb[e0 + j]);
        g1b[e0 + j] = gb;
        pg1[e0 + j] += gb * yh1[e0 + j];
        ry1[j] += gb * g1w[j];
        h[e0 + j] = masked(g1[e0 + j], g1[e0 + j]);
      }
      gn_fwd_reverse_row<T>(ry1, RRS(i, 0) + r * G, yh1 + e0, rs1 + r * G, D, G, a1b + e0);
    }
    cell_gemm<T>(c, M, a1b, D, w1, w1, false, 1, dzp + i * D, ZS);  // dz_i += a1bar W1
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> jac_backward_impl(
    const at::Tensor& v, const at::Tensor& wbar, const at::Tensor& z, const std::vector<at::Tensor>& sv,
    const std::vector<at::Tensor>& p, int64_t G) {
  const int64_t B = v.size(0), N = v.size(1) - 1, D = v.size(2), ZS = (N + 1) * D;
  const auto opt = v.options();
  at::Tensor dz = at::empty({B, N + 1, D}, opt), dx = at::empty({B, N, D}, opt);
  at::Tensor dxf = at::empty({B, D}, opt);  // = a3bar (a3 = ... + xf)
  at::Tensor nbd = at::empty({11, N, B, D}, opt), bd = at::empty({9, B, D}, opt);
  T *n0 = nbd.data_ptr<T>(), *m0 = bd.data_ptr<T>();
  const int64_t NBD = N * B * D, BD = B * D;
  JacKeep<T> kp;
  T** nk[11] = {&kp.da1, &kp.a1b, &kp.da2, &kp.rdh0, &kp.a2b, &kp.h, &kp.pg1, &kp.g1b, &kp.pg2, &kp.ub, &kp.pg3};
  for (int k = 0; k < 11; ++k) *nk[k] = n0 + k * NBD;
  T** bk[9] = {&kp.pf, &kp.rds, &kp.gab, &kp.s, &kp.da3, &kp.rdq, &kp.q, &kp.pgf, &kp.sb};
  for (int k = 0; k < 9; ++k) *bk[k] = m0 + k * BD;
  kp.a3b = dxf.data_ptr<T>();
  const Cell<T> c(B, N, D, G, p, sv, /*forward=*/true);
  const T *vp = ptr<T>(v), *wp = ptr<T>(wbar), *zp = ptr<T>(z);
  T *dzp = dz.data_ptr<T>(), *dxp = dx.data_ptr<T>();
  const int64_t MB = block_rows(B);
  at::parallel_for(0, (B + MB - 1) / MB, 1, [&](int64_t k0, int64_t k1) {
    std::unique_ptr<T[]> scratch(new T[jac_scratch_size(MB, N, D, G)]);
    for (int64_t kb = k0; kb < k1; ++kb) {
      const int64_t b0 = kb * MB, M = std::min(MB, B - b0);
      jac_block<T>(c, vp + b0 * ZS, wp + b0 * ZS, zp + b0 * ZS, dzp + b0 * ZS, dxp, b0, M, scratch.get(), kp);
    }
  });
  std::vector<at::Tensor> dp;
  for (int k = 0; k < kNumParams; ++k) dp.push_back(at::empty(p[k].sizes(), opt));
  dp[15].zero_();  // gnf_b: the VJP does not depend on it
  auto dptr = [&](int k) { return dp[k].data_ptr<T>(); };
  at::parallel_for(0, D, 8, [&](int64_t j0, int64_t j1) {
    const int64_t w = j1 - j0;
    std::unique_ptr<T[]> tmp(new T[w * D]);
    // dW = A1^T X1 + A2^T X2 over the batch (rows j0 .. j1 of the gradient)
    auto wgrad = [&](const T* a1, const T* x1, int64_t ld1, const T* a2, const T* x2, int64_t ld2, T* dst) {
      weight_grad<T>(c, w, a1 + j0, D, x1, ld1, dst + j0 * D);
      weight_grad<T>(c, w, a2 + j0, D, x2, ld2, tmp.get());
      for (int64_t e = 0; e < w * D; ++e) dst[j0 * D + e] += tmp[e];
    };
    for (int64_t i = 0; i < N; ++i) {
      const int64_t o = i * NBD / N;
      wgrad(kp.da1 + o, wp + i * D, ZS, kp.a1b + o, zp + i * D, ZS, dptr(0) + i * D * D);
      wgrad(kp.da2 + o, kp.rdh0 + o, D, kp.a2b + o, kp.h + o, D, dptr(2) + i * D * D);
    }
    wgrad(kp.pf, kp.rds, D, kp.gab, kp.s, D, dptr(10));
    wgrad(kp.da3, kp.rdq, D, kp.a3b, kp.q, D, dptr(12));
    std::unique_ptr<double[]> acc(new double[w]);
    auto colsum = [&](int k, int64_t off, const T* a, T scale) {
      column_sums<T>(B, w, a + j0, D, nullptr, D, acc.get());
      T* dst = dptr(k) + off + j0;
      for (int64_t j = 0; j < w; ++j) dst[j] = (T)(acc[j] * (double)scale);
    };
    for (int64_t i = 0; i < N; ++i) {
      const int64_t o = i * NBD / N;
      colsum(1, i * D, kp.a1b + o, 1);  // b1
      colsum(3, i * D, kp.a2b + o, 1);  // b2
      colsum(4, i * D, kp.pg1 + o, 1);  // gn1_w
      colsum(5, i * D, kp.g1b + o, 1);  // gn1_b
      colsum(6, i * D, kp.pg2 + o, 1);  // gn2_w
      colsum(7, i * D, kp.ub + o, 1);   // gn2_b
      colsum(8, i * D, kp.pg3 + o, 1);  // gn3_w
      colsum(9, i * D, kp.sb, 1);       // gn3_b: z_i+ feeds s (every modality alike)
    }
    colsum(11, 0, kp.gab, (T)N);  // bg: ga = Wg s + N bg
    colsum(13, 0, kp.a3b, 1);     // bf
    colsum(14, 0, kp.pgf, 1);     // gnf_w
  });
  return {dz, dx, dxf, dp};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> cell_jac_backward_cpu(
    const at::Tensor& v, const at::Tensor& wbar, const at::Tensor& z, const std::vector<at::Tensor>& saved,
    const std::vector<at::Tensor>& params, int64_t groups) {
  const char* op = "cell_jac_backward";
  check_saved(v, saved, params, groups, op, "v");
  auto like_v = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == v.sizes() && t.scalar_type() == v.scalar_type() && t.device().is_cpu(), op, ": ", name,
                " must be a CPU tensor of v's shape ", shape_str(v.sizes()), " and dtype, got ", shape_str(t.sizes()),
                " ", c10::toString(t.scalar_type()));
  };
  like_v(wbar, "wbar");
  like_v(z, "z");
  const auto vc = v.contiguous(), wc = wbar.contiguous(), zc = z.contiguous();
  const auto sv = contiguous_all(saved), p = contiguous_all(params);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> res;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "cell_jac_backward_cpu", [&] {
    res = jac_backward_impl<scalar_t>(vc, wc, zc, sv, p, groups);
  });
  return res;
}

}  // namespace deqfuse

TORCH_LIBRARY_FRAGMENT(deqfuse, m) {
  m.def("cell_jac_backward(Tensor v, Tensor wbar, Tensor z, Tensor[] saved, Tensor[] params, int groups) "
        "-> (Tensor dz, Tensor dx, Tensor dxf, Tensor[] dparams)");
}

TORCH_LIBRARY_IMPL(deqfuse, CPU, m) { m.impl("cell_jac_backward", &deqfuse::cell_jac_backward_cpu); }

TORCH_LIBRARY_IMPL(deqfuse, Autograd, m) {
  m.impl("cell_jac_backward", torch::autograd::autogradNotImplementedFallback());
}
