// Feature-major ("fm") float kernels with AVX-512 for the whole solves, forward and adjoint (solve_cpu.cpp:
// solve_loop_fm): a chunk's samples sit in the SIMD lanes. Every array holds rows of V 16-lane vectors (16 V
// samples), row r being feature r: the iterate and f(x) [L], each ring slot [L], the inputs (x [N D], xf [D]; or
// the saved tensors and add), the cell's intermediates [D]. The kernels take the row stride S and the vector
// stride P: lane s of row r at r S + (s / 16) P + s % 16 (solve_loop_fm: panels, S = 16, P = 16 (L + 1)).
// Below, "[D][S]" names such an array of D rows.
//
// Why: in the row layout a GroupNorm group of 16 (or 8) features is one register whose sums are horizontal --
// shuffle trees, and about 100 instructions per row and GroupNorm (cell_cpu_kernels.h: gn_rows_wide_avx512),
// and the Anderson step's dot products end in horizontal
// sums too. Here a group's sums are vertical adds of its feature rows, the dot products are vertical FMA
// chains, and the GEMMs are the tiles with the roles of the weight and the activations swapped.
//
// Values: each kernel does per lane what its row kernel does per sample (the GEMM tiles' FMA chains, the AVX2
// GroupNorm's partial sums and tree, the Gram row's 8-lane chains, the mixing with the solve's own rings), so a
// sample's floats are the row layout's today; the tests hold the two layouts to the solve's tolerance only
// (tests/test_fused_solve.py), and either may change its summation order.
// In force (select_plan): float, tile GEMMs (Cell::kn), AVX-512F, GroupNorm widths 16 or 8 with G % 4 == 0, so
// L % 8 == 0.
#pragma once

#include "anderson_cpu_kernels.h"
#include "cell_cpu_kernels.h"

#if defined(DEQFUSE_AVX512_GN)
#define DEQFUSE_FM_SOLVE 1
#include <immintrin.h>

#define DEQFUSE_FM __attribute__((target("avx512f,avx2,fma")))
// The GEMM tiles inlined into the cell's fm bodies whatever the translation unit's size (left to GCC's unit-growth
// limit, they were not once solve_cpu.cpp grew: the adjoint solve ran 7% slower).
#define DEQFUSE_FM_INLINE __attribute__((target("avx512f,avx2,fma"), always_inline)) inline

namespace deqfuse {
namespace {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's AVX-512 intrinsics (_mm512_undefined_ps)

// C rows j0 .. j0 + R - 1: C[j][:] = sum_k W[j][k] A[k][:] over K, V vectors per row, then the store epilogue
// (gemm_small.h: GemmEpi): acc + (bias[j] + addT[j][:]) when addT, else fma(scale, bias[j], acc).
template <int R, int V>
DEQFUSE_FM_INLINE void gemm_fm_tile(int64_t K, const float* W, int64_t ldw, const float* A, int64_t S, int64_t P,
                                    float* C, const float* bias, const float* addT, float scale, bool accumulate) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(C + r * S + v * P) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(A + k * S + v * P);
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(W[r * ldw + k]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(w, b[v], acc[r][v]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r) {
    const __m512 bb = _mm512_set1_ps(bias ? bias[r] : 0.0f);
    for (int v = 0; v < V; ++v) {
      __m512 c = acc[r][v];
      if (bias)
        c = addT ? _mm512_add_ps(c, _mm512_add_ps(bb, _mm512_loadu_ps(addT + r * S + v * P)))
                 : _mm512_fmadd_ps(sc, bb, c);
      _mm512_storeu_ps(C + r * S + v * P, c);
    }
  }
}

// C [D][S] = (accumulate ? C : 0) + W [D][D] applied to A [D][S] (W row-major [out][in]: a Linear's weight as
// stored for the forward, its transpose -- Cell::w1t ... -- for the VJP), with bias [D] (null: none) and the
// epilogue of gemm_fm_tile (addT [D][S] or null). D % 8 == 0; V = 1 .. 4.
// Tiles of R = 8 output rows for V <= 3 (24 accumulators at most), 4 for V = 4: per k, V loads and R broadcasts
// feed R V FMAs (R = 4 at V = 3 left the adjoint's 48-sample chunks a third of the FMAs per load of V = 4).
template <int V>
DEQFUSE_FM_INLINE void gemm_fm_v(int64_t D, const float* W, const float* A, int64_t S, int64_t P, float* C,
                                 const float* bias, const float* addT, float scale, bool accumulate) {
  constexpr int R = V <= 3 ? 8 : 4;  // D % 32 == 0
  for (int64_t j = 0; j < D; j += R)
    gemm_fm_tile<R, V>(D, W + j * D, D, A, S, P, C + j * S, bias ? bias + j : nullptr, addT ? addT + j * S : nullptr,
                       scale, accumulate);
}

DEQFUSE_FM_INLINE void gemm_fm(int V, int64_t D, const float* W, const float* A, int64_t S, int64_t P, float* C,
                               const float* bias, const float* addT = nullptr, float scale = 1.0f,
                               bool accumulate = false) {
  switch (V) {
    case 4: return gemm_fm_v<4>(D, W, A, S, P, C, bias, addT, scale, accumulate);
    case 3: return gemm_fm_v<3>(D, W, A, S, P, C, bias, addT, scale, accumulate);
    case 2: return gemm_fm_v<2>(D, W, A, S, P, C, bias, addT, scale, accumulate);
    default: return gemm_fm_v<1>(D, W, A, S, P, C, bias, addT, scale, accumulate);
  }
}

// v as it is, hidden from the optimiser: a product that feeds an add is not contracted into an FMA with it (GCC's
// -ffp-contract=fast would, where the row kernels' shuffles between the two keep them apart).
DEQFUSE_FM inline __m512 opaque_fm(__m512 v) {
  asm("" : "+v"(v));
  return v;
}

// ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)): hsum4_avx2's tree of a group's 8 partials
DEQFUSE_FM inline __m512 tree8_fm(const __m512 (&p)[8]) {
  return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3])),
                       _mm512_add_ps(_mm512_add_ps(p[4], p[5]), _mm512_add_ps(p[6], p[7])));
}

// GroupNorm of y [D][S] (D = G NW) with the epilogue e (GnRow's, on [D][S] arrays: gn_store_avx512), V vectors
// per row; RELU_IN: of ReLU(y) (the fusion cell's GroupNorm of ReLU(a3), without a pass of its own). y may be
// e.relu (a group's rows are all loaded before its stores).
template <int NW, bool RELU_IN>
DEQFUSE_FM inline void gn_fm(const float* y, const float* gamma, const float* beta, int64_t G, int64_t S, int64_t P,
                             int V, const GnEpi& e) {
  static_assert(NW == 16 || NW == 8, "gn_fm: group widths 16 and 8");
  const __m512 inv_n = _mm512_set1_ps(1.0f / NW), eps = _mm512_set1_ps((float)kGnEps), one = _mm512_set1_ps(1.0f);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t r0 = g * NW;
    for (int v = 0; v < V; ++v) {
      const int64_t o = r0 * S + v * P;
      __m512 d[NW], p[8];
#pragma GCC unroll 16
      for (int i = 0; i < NW; ++i) {
        d[i] = _mm512_loadu_ps(y + o + i * S);
        if (RELU_IN) d[i] = relu_avx512(d[i]);
      }
#pragma GCC unroll 8
      for (int l = 0; l < 8; ++l) p[l] = NW == 16 ? _mm512_add_ps(d[l], d[l + 8]) : d[l];
      const __m512 mean = opaque_fm(_mm512_mul_ps(tree8_fm(p), inv_n));  // rounded, as the row kernels' (spilled)
#pragma GCC unroll 16
      for (int i = 0; i < NW; ++i) d[i] = _mm512_sub_ps(d[i], mean);
      // d_l^2 as fma(d_l, d_l, 0), the AVX2 chain's first step: a product written as a multiply that fed the
      // tree's adds directly (width 8) was contracted by GCC (-ffp-contract=fast) into them -- other roundings
      const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int l = 0; l < 8; ++l) {
        const __m512 sq = _mm512_fmadd_ps(d[l], d[l], zero);
        p[l] = NW == 16 ? _mm512_fmadd_ps(d[l + 8], d[l + 8], sq) : sq;
      }
      const __m512 var = _mm512_add_ps(_mm512_mul_ps(tree8_fm(p), inv_n), eps);
      const __m512 r = _mm512_div_ps(one, _mm512_sqrt_ps(var));
#pragma GCC unroll 16
      for (int i = 0; i < NW; ++i) {
        const int64_t j = o + i * S;
        const __m512 h = _mm512_mul_ps(d[i], r);
        gn_store_avx512(e, j, _mm512_fmadd_ps(h, _mm512_set1_ps(gamma[r0 + i]), _mm512_set1_ps(beta[r0 + i])));
      }
    }
  }
}

// The cell's forward (forward_block_body without saved tensors) on V vectors of lanes: zT [L][S] -> fT [L][S],
// inputs inT [N D][S] (x_i's rows at i D) and xfT [D][S]; scr: 4 [D][S] arrays. Group width NW.
template <int NW>
DEQFUSE_FM void cell_forward_fm(const Cell<float>& c, const float* zT, const float* inT, const float* xfT, float* fT,
                                float* const* scr, int64_t S, int64_t P, int V) {
  const int64_t N = c.N, D = c.D, G = c.G, DS = D * S;
  float *a = scr[0], *h = scr[1], *s = scr[2], *ga = scr[3];
  const float* zf = zT + N * DS;
  const __m512 nf = _mm512_set1_ps((float)N);
  for (int64_t j = 0; j < D; ++j)  // s = N z_f, then += each modality's new state
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(s + j * S + v * P, _mm512_mul_ps(nf, _mm512_loadu_ps(zf + j * S + v * P)));
  for (int64_t i = 0; i < N; ++i) {
    const float* zi = zT + i * DS;
    gemm_fm(V, D, c.w1 + i * D * D, zi, S, P, a, c.b1 + i * D);  // a1 = W1_i z_i + b1
    // h = ReLU(GN1(a1))
    gn_fm<NW, false>(a, c.g1w + i * D, c.g1b + i * D, G, S, P, V, GnEpi{.out = h, .relu = h, .store_out = false});
    gemm_fm(V, D, c.w2 + i * D * D, h, S, P, a, c.b2 + i * D, inT + i * DS);  // a2 = W2_i h + (b2 + x_i)
    // u = GN2(a2) + z_i (not kept: no saved tensors), a = ReLU(u)
    gn_fm<NW, false>(a, c.g2w + i * D, c.g2b + i * D, G, S, P, V, GnEpi{.add = zi, .relu = a, .store_out = false});
    // out_i = GN3(a), s += out_i
    gn_fm<NW, false>(a, c.g3w + i * D, c.g3b + i * D, G, S, P, V,
                     GnEpi{.out = fT + i * DS, .acc = s, .store_out = true});
  }
  gemm_fm(V, D, c.wg, s, S, P, ga, c.bg, nullptr, (float)N);  // ga = Wg s + N bg
  for (int64_t j = 0; j < D; ++j)  // q = z_f * ga (into h)
    for (int v = 0; v < V; ++v) {
      const int64_t o = j * S + v * P;
      _mm512_storeu_ps(h + o, _mm512_mul_ps(_mm512_loadu_ps(zf + o), _mm512_loadu_ps(ga + o)));
    }
  gemm_fm(V, D, c.wf, h, S, P, a, c.bf, xfT);  // a3 = Wf q + (bf + x_f)
  // out_f = GN_f(ReLU(a3))
  gn_fm<NW, true>(a, c.gfw, c.gfb, G, S, P, V, GnEpi{.out = fT + N * DS, .store_out = true});
}

// x gamma, rounded, kept apart from the adds it feeds (opaque_fm)
DEQFUSE_FM inline __m512 prod_fm(__m512 x, float gamma) { return opaque_fm(_mm512_mul_ps(x, _mm512_set1_ps(gamma))); }

// gn_back_fm's operands: cell_cpu_kernels.h's GnBackRow on [D][S] arrays (rstd [G][S]): x = dout (+ dout_add),
// 0 where in_gate is not > 0; dy = GN^T(x) with yhat, rstd and gamma; 0 where out_gate is not > 0; copy = dy
// (+ copy_add). dy may be dout.
using FmBack = GnBackRow<float>;

// The GroupNorm backward of gn_rows_backward_wide_avx512 (= gn_rows_backward_avx2) per lane: d = x gamma; the
// partials a1_l = (d_l + d_{l+8}) + 0 and a2_l = fma(d_{l+8}, yhat_{l+8}, fma(d_l, yhat_l, 0)) (width 16) or d_l + 0
// and fma(d_l, yhat_l, 0) (width 8); hsum4_avx2's tree; the products with 1/n; dy = rstd (fmsub(x, gamma, m1) -
// yhat m2) as fnmadd.
template <int NW>
DEQFUSE_FM inline void gn_back_fm(const FmBack& p, const float* gamma, int64_t G, int64_t S, int64_t P, int V) {
  const __m512 inv_n = _mm512_set1_ps(1.0f / NW), zero = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t r0 = g * NW;
    for (int v = 0; v < V; ++v) {
      const int64_t o = r0 * S + v * P;
      __m512 x[NW], s[8];
#pragma GCC unroll 16
      for (int i = 0; i < NW; ++i) {
        const int64_t j = o + i * S;
        x[i] = _mm512_loadu_ps(p.dout + j);
        if (p.dout_add) x[i] = _mm512_add_ps(x[i], _mm512_loadu_ps(p.dout_add + j));
        if (p.in_gate) x[i] = gate_avx512(p.in_gate + j, x[i]);
      }
#pragma GCC unroll 8
      for (int l = 0; l < 8; ++l) {  // d = x gamma: recomputed below (kept, with x, it took more registers)
        const __m512 d = prod_fm(x[l], gamma[r0 + l]);
        s[l] = _mm512_add_ps(NW == 16 ? _mm512_add_ps(d, prod_fm(x[l + 8], gamma[r0 + l + 8])) : d, zero);
      }
      const __m512 m1 = _mm512_mul_ps(tree8_fm(s), inv_n);
#pragma GCC unroll 8
      for (int l = 0; l < 8; ++l) {
        const __m512 lo = _mm512_fmadd_ps(prod_fm(x[l], gamma[r0 + l]), _mm512_loadu_ps(p.yhat + o + l * S), zero);
        const __m512 hi = NW == 16 ? prod_fm(x[l + 8], gamma[r0 + l + 8]) : zero;
        s[l] = NW == 16 ? _mm512_fmadd_ps(hi, _mm512_loadu_ps(p.yhat + o + (l + 8) * S), lo) : lo;
      }
      const __m512 m2 = _mm512_mul_ps(tree8_fm(s), inv_n);
      const __m512 r = _mm512_loadu_ps(p.rstd + g * S + v * P);
#pragma GCC unroll 16
      for (int i = 0; i < NW; ++i) {
        const int64_t j = o + i * S;
        const __m512 da = _mm512_fmsub_ps(x[i], _mm512_set1_ps(gamma[r0 + i]), m1);
        __m512 y = opaque_fm(_mm512_mul_ps(r, _mm512_fnmadd_ps(_mm512_loadu_ps(p.yhat + j), m2, da)));
        if (p.out_gate) y = gate_avx512(p.out_gate + j, y);
        _mm512_storeu_ps(p.dy + j, y);
        if (p.copy) _mm512_storeu_ps(p.copy + j, p.copy_add ? _mm512_add_ps(y, _mm512_loadu_ps(p.copy_add + j)) : y);
      }
    }
  }
}

// The saved tensors of cell_forward(save=True) as feature-major arrays (kNumSaved, in its order: yh1 [N D], rs1
// [N G], g1s, yh2 [N D], rs2 [N G], us, yh3 [N D], rs3 [N G], zfs, gas, a3s, yhf [D], rsf [G] rows), then add [L].
constexpr int kFmVjpInputs = kNumSaved + 1;

// The cell's VJP (vjp_block_body without Keep: out = J^T g + add) on V vectors of lanes: gT [L][S] -> oT [L][S];
// in: the kFmVjpInputs arrays; scr: 5 [D][S] arrays. Group width NW. The cell's transposed weights (c.w1t ...:
// the VJP multiplies by W, whose rows are W^T's columns).
template <int NW>
DEQFUSE_FM void cell_vjp_fm(const Cell<float>& c, const float* gT, const float* const* in, float* oT,
                            float* const* scr, int64_t S, int64_t P, int V) {
  const int64_t N = c.N, D = c.D, G = c.G, DS = D * S, GS = G * S;
  const float *yh1 = in[0], *rs1 = in[1], *g1s = in[2], *yh2 = in[3], *rs2 = in[4], *us = in[5], *yh3 = in[6];
  const float *rs3 = in[7], *zfs = in[8], *gas = in[9], *a3s = in[10], *yhf = in[11], *rsf = in[12], *add = in[13];
  float *da = scr[0], *dq = scr[1], *ds = scr[2], *du = scr[3], *t = scr[4];
  // fusion branch: da3 = GN_f^T(gbar_f) * (a3 > 0) ; dq = da3 Wf ; ds = (dq * z_f) Wg
  FmBack bf{gT + N * DS, yhf, rsf, da};
  bf.out_gate = a3s;
  gn_back_fm<NW>(bf, c.gfw, G, S, P, V);
  gemm_fm(V, D, c.wft, da, S, P, dq, nullptr);
  for (int64_t j = 0; j < D; ++j)
    for (int v = 0; v < V; ++v) {
      const int64_t o = j * S + v * P;
      _mm512_storeu_ps(da + o, _mm512_mul_ps(_mm512_loadu_ps(dq + o), _mm512_loadu_ps(zfs + o)));
    }
  gemm_fm(V, D, c.wgt, da, S, P, ds, nullptr);
  const __m512 nf = _mm512_set1_ps((float)N);
  for (int64_t j = 0; j < D; ++j)  // dz_f = dq * ga + N ds (+ add_f), as GCC contracts the row pass
    for (int v = 0; v < V; ++v) {
      const int64_t o = j * S + v * P, of = N * DS + o;
      __m512 w = _mm512_fmadd_ps(_mm512_loadu_ps(dq + o), _mm512_loadu_ps(gas + o),
                                 _mm512_mul_ps(nf, _mm512_loadu_ps(ds + o)));
      w = _mm512_add_ps(opaque_fm(w), _mm512_loadu_ps(add + of));
      _mm512_storeu_ps(oT + of, w);
    }
  for (int64_t i = 0; i < N; ++i) {
    // du = GN3^T(gbar_i + ds) * (u > 0), dz_i = du + add_i ; da2 = GN2^T(du)
    FmBack b3{gT + i * DS, yh3 + i * DS, rs3 + i * GS, du};
    b3.dout_add = ds;
    b3.out_gate = us + i * DS;
    b3.copy = oT + i * DS;
    b3.copy_add = add + i * DS;
    gn_back_fm<NW>(b3, c.g3w + i * D, G, S, P, V);
    gn_back_fm<NW>(FmBack{du, yh2 + i * DS, rs2 + i * GS, t}, c.g2w + i * D, G, S, P, V);
    // dh = da2 W2_i * (g1 > 0) ; da1 = GN1^T(dh) ; dz_i += da1 W1_i
    gemm_fm(V, D, c.w2t + i * D * D, t, S, P, da, nullptr);
    FmBack b1{da, yh1 + i * DS, rs1 + i * GS, da};
    b1.in_gate = g1s + i * DS;
    gn_back_fm<NW>(b1, c.g1w + i * D, G, S, P, V);
    gemm_fm(V, D, c.w1t + i * D * D, da, S, P, oT + i * DS, nullptr, nullptr, 1.0f, true);
  }
}

// Pass 1 of the Anderson step (gram_row_avx2) for the 16 lanes of vector v: gT = fT - xT, and per lane the sums
// tot[0] = |g|^2, tot[1] = |f(x)|^2, tot[2 + i] = <G_i, g> (Gi: ND ring slots [L][S]).
template <int ND>
DEQFUSE_FM inline void gram_fm_v(const float* xT, const float* fT, const float* const* Gi, float* gT, int64_t L,
                                 int64_t S, int64_t P, int v, __m512* tot) {
  const float* Gl[ND > 0 ? ND : 1];
  for (int i = 0; i < ND; ++i) Gl[i] = Gi[i] + v * P;
  const float *x = xT + v * P, *f = fT + v * P;
  float* gp = gT + v * P;
  for (int i = 0; i < ND + 2; ++i) tot[i] = _mm512_setzero_ps();
  // the row kernel's lanes q and q + 1 side by side (each the chain over the elements l = q mod 8 in order): one
  // class at a time left each FMA waiting on the previous one of its chain
  for (int64_t q = 0; q < 8; q += 2) {
    __m512 acc[2][ND + 2];
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < ND + 2; ++i) acc[c][i] = _mm512_setzero_ps();
    for (int64_t l = q; l < L; l += 8) {
      for (int c = 0; c < 2; ++c) {
        const int64_t o = (l + c) * S;
        const __m512 fv = _mm512_loadu_ps(f + o), g = _mm512_sub_ps(fv, _mm512_loadu_ps(x + o));
        _mm512_storeu_ps(gp + o, g);
        acc[c][0] = _mm512_fmadd_ps(g, g, acc[c][0]);
        acc[c][1] = _mm512_fmadd_ps(fv, fv, acc[c][1]);
        for (int i = 0; i < ND; ++i) acc[c][2 + i] = _mm512_fmadd_ps(_mm512_loadu_ps(Gl[i] + o), g, acc[c][2 + i]);
      }
    }
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < ND + 2; ++i) tot[i] = _mm512_add_ps(tot[i], acc[c][i]);  // from 0, in lane order
  }
}

// gram_row_sums_avx2 for the lanes of vector v: sums[lane][0..2] = |g|^2, |f(x)|^2, |g|^2, sums[lane][3 + j] =
// <G_j, g> for the filled slots j != slot, 0 elsewhere (GT: ring G [m][L][S]).
DEQFUSE_FM inline void gram_fm(const float* xT, const float* fT, const float* GT, int64_t RS, float* gT, int64_t L,
                               int64_t S, int64_t P, int v, int m, int slot, int n, float (*sums)[3 + kMaxM]) {
  const float* Gi[kMaxM];
  int js[kMaxM], nd = 0;
  for (int j = 0; j < n; ++j)
    if (j != slot) {
      js[nd] = j;
      Gi[nd++] = GT + j * RS;
    }
  __m512 tot[kMaxM + 1];
  switch (nd) {
    case 0: gram_fm_v<0>(xT, fT, Gi, gT, L, S, P, v, tot); break;
    case 1: gram_fm_v<1>(xT, fT, Gi, gT, L, S, P, v, tot); break;
    case 2: gram_fm_v<2>(xT, fT, Gi, gT, L, S, P, v, tot); break;
    case 3: gram_fm_v<3>(xT, fT, Gi, gT, L, S, P, v, tot); break;
    case 4: gram_fm_v<4>(xT, fT, Gi, gT, L, S, P, v, tot); break;
    case 5: gram_fm_v<5>(xT, fT, Gi, gT, L, S, P, v, tot); break;
    case 6: gram_fm_v<6>(xT, fT, Gi, gT, L, S, P, v, tot); break;
    default: gram_fm_v<7>(xT, fT, Gi, gT, L, S, P, v, tot); break;  // nd <= kMaxM - 1 = 7
  }
  static_assert(kMaxM == 8, "gram_fm dispatches 0..7 slots");
  alignas(64) float t[kMaxM + 1][16];
  for (int i = 0; i < nd + 2; ++i) _mm512_store_ps(t[i], tot[i]);
  for (int q = 0; q < 16; ++q) {
    float* s = sums[16 * v + q];
    s[0] = t[0][q];
    s[1] = t[1][q];
    s[2] = t[0][q];
    for (int j = 0; j < m; ++j) s[3 + j] = 0;
    for (int i = 0; i < nd; ++i) s[3 + js[i]] = t[2 + i][q];
  }
}

// Pass 3 (mix_tile_avx512 with MIXED rings) for the lanes of vector v: ring slot `slot` = (t = fma(beta, g, x),
// g), then x = sum_j alpha_j t_j in slot order from 0 (A[j]: each lane's alpha_j), stored to the lanes of `live`
// only (the others are frozen, converged or padding: their x stays; their ring slot is written, never read).
DEQFUSE_FM inline void mix_fm(float* xT, float* XT, float* GT, int64_t LS, const float* gT, const __m512* A,
                              __mmask16 live, int64_t L, int64_t S, int64_t P, int v, int slot, int n, float beta) {
  const __m512 bv = _mm512_set1_ps(beta);
  constexpr int U = 4;  // rows side by side: each row's sum is a chain of n dependent FMAs
  for (int64_t l0 = 0; l0 < L; l0 += U) {
    const int u = (int)std::min<int64_t>(U, L - l0);
    __m512 acc[U];
    for (int r = 0; r < U; ++r) acc[r] = _mm512_setzero_ps();
    for (int j = 0; j < n; ++j)
      for (int r = 0; r < U; ++r) {
        if (r >= u) break;
        const int64_t o = (l0 + r) * S + v * P;
        __m512 t;
        if (j == slot) {
          const __m512 xv = _mm512_loadu_ps(xT + o), gv = _mm512_loadu_ps(gT + o);
          t = _mm512_fmadd_ps(bv, gv, xv);
          _mm512_storeu_ps(XT + j * LS + o, t);
          _mm512_storeu_ps(GT + j * LS + o, gv);
        } else {
          t = _mm512_loadu_ps(XT + j * LS + o);
        }
        acc[r] = _mm512_fmadd_ps(A[j], t, acc[r]);
      }
    for (int r = 0; r < u; ++r) _mm512_mask_storeu_ps(xT + (l0 + r) * S + v * P, live, acc[r]);
  }
}

// mix_fm over the V vectors that hold live lanes; alpha[j][lane]: the lanes' weights (kMaxM x 64).
DEQFUSE_FM inline void mix_fm_all(float* xT, float* XT, float* GT, int64_t RS, const float* gT,
                                  const float (*alpha)[64], const __mmask16* live, int64_t L, int64_t S, int64_t P,
                                  int V, int slot, int n, float beta) {
  for (int v = 0; v < V; ++v) {
    if (!live[v]) continue;
    __m512 A[kMaxM];
    for (int j = 0; j < n; ++j) A[j] = _mm512_loadu_ps(alpha[j] + 16 * v);
    mix_fm(xT, XT, GT, RS, gT, A, live[v], L, S, P, v, slot, n, beta);
  }
}

// dst's lanes of `mask` = src's, over R rows of V vectors ([R][S] arrays)
DEQFUSE_FM inline void blend_rows_fm(float* dst, const float* src, const __mmask16* mask, int64_t R, int64_t S,
                                     int64_t P, int V) {
  for (int v = 0; v < V; ++v)
    if (mask[v])
      for (int64_t r = 0; r < R; ++r) {
        const int64_t o = r * S + v * P;
        _mm512_mask_storeu_ps(dst + o, mask[v], _mm512_loadu_ps(src + o));
      }
}

#pragma GCC diagnostic pop
}  // namespace
}  // namespace deqfuse
#endif
