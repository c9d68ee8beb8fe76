"""Fused-GEMM path of the fusion cell forward: 4 Triton GEMM launches whose epilogues do the bias,
GroupNorm, ReLU, residual and input injection in registers (kernels/cell.py instead runs cuBLAS GEMMs
followed by row kernels: 8 launches, and every pre-norm activation makes a round trip through memory).

A GEMM program owns a [BM rows, one GroupNorm group] output tile, so the group statistics are complete
in its accumulator: BN = next_pow2(D / groups) columns (masked), hence D / groups <= MAX_GROUP_WIDTH.
  L1  grid (B/BM, G, N): h_i = ReLU(GN1_i(z_i W1_i^T + b1_i))                  -> h [N, B, D]
  L2  grid (B/BM, G)   : for i < N: a2 = h_i W2_i^T + b2_i + x_i, u = GN2_i(a2) + z_i,
                         z_i+ = GN3_i(ReLU(u)) -> out[:, i]; s = sum_i z_i+ + N z_f  -> s [B, D]
  GATE grid (B/BM, D/BN): q = z_f * (s W_g^T + N b_g)                          -> q [B, D]
  FUSE grid (B/BM, G)  : z_f+ = GN_f(ReLU(q W_f^T + b_f + x_f))               -> out[:, N]
With save=True the kernels also write what cell_vjp_triton reads (same dict as cell_forward_triton).
Matmul inputs in the input dtype (fp32: tf32 when torch.backends.cuda.matmul.allow_tf32), fp32
accumulation (fp64 for fp64 inputs); epilogues in the accumulator dtype.
"""
import os

import torch
import triton
import triton.language as tl

from deqfuse.reference.groupnorm import EPS

from .cell import _check, _gn_fwd

MAX_GROUP_WIDTH = 256  # a [BM, 256] fp32 accumulator already fills a warpgroup's registers at BM=128


@triton.jit
def _mm(a_ptr, lda, w_ptr, rows, rmask, cols, cmask, K,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """acc[BM, BN] = A[rows, :K] @ W[cols, :K]^T; A row r at a_ptr + r * lda, W row-major [*, K].
    PREC: 'tf32' | 'ieee' for tl.dot; 'fma' = broadcast multiply + sum (fp64: Triton's tl.dot has no
    fp64 path on NVIDIA GPUs); 'upcast' feeds bf16 operands to tl.dot as fp32 (exact products, same
    result: the CPU interpreter of Triton 3.9 returns garbage for a bf16 tl.dot)."""
    acc = tl.zeros([BM, BN], ACC)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < K
        a = tl.load(a_ptr + rows[:, None] * lda + ks[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=cmask[None, :] & km[:, None], other=0.0)
        if PREC == "fma":
            acc += tl.sum(a[:, :, None].to(ACC) * w[None, :, :].to(ACC), 1)
        elif PREC == "upcast":
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee", out_dtype=ACC)
        else:
            acc = tl.dot(a, w, acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _tile_rows(B, BM: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    return rows, rows < B


@triton.jit
def _group_cols(DG, BN: tl.constexpr):
    """Columns of the group this program owns (program_id(1)) and their mask."""
    c = tl.arange(0, BN)
    return tl.program_id(1).to(tl.int64) * DG + c, c < DG


@triton.jit
def _store_tile_stats(st_ptr, srow, rmask, g, G, mean, rstd):
    """GN stats [rows, G, 2] for rows `srow` [BM] of group g."""
    tl.store(st_ptr + (srow * G + g) * 2, mean, mask=rmask)
    tl.store(st_ptr + (srow * G + g) * 2 + 1, rstd, mask=rmask)


@triton.jit
def _l1_kernel(z_ptr, w1_ptr, b1_ptr, gw_ptr, gb_ptr, h_ptr, a1_ptr, st_ptr, B, N, D, DG, G, eps,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
               ACC: tl.constexpr, SAVE: tl.constexpr):
    rows, rmask = _tile_rows(B, BM)
    cols, cmask = _group_cols(DG, BN)
    n = tl.program_id(2)
    acc = _mm(z_ptr + n * D, (N + 1) * D, w1_ptr + n * D * D, rows, rmask, cols, cmask, D, BM, BN, BK, PREC, ACC)
    a1 = acc + tl.load(b1_ptr + n * D + cols, mask=cmask, other=0.0)[None, :]
    yh, mean, rstd = _gn_fwd(a1, cmask[None, :], DG, eps)
    h = yh * tl.load(gw_ptr + n * D + cols, mask=cmask)[None, :] + tl.load(gb_ptr + n * D + cols, mask=cmask)[None, :]
    srow = n * B + rows                                  # row of the [N, B, D] intermediates
    offs = srow[:, None] * D + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    tl.store(h_ptr + offs, tl.maximum(h, 0.0).to(h_ptr.dtype.element_ty), mask=m2)
    if SAVE:
        tl.store(a1_ptr + offs, a1.to(a1_ptr.dtype.element_ty), mask=m2)
        _store_tile_stats(st_ptr, srow, rmask, tl.program_id(1), G, mean, rstd)


@triton.jit
def _l2_kernel(h_ptr, w2_ptr, b2_ptr, x_ptr, z_ptr, g2w_ptr, g2b_ptr, g3w_ptr, g3b_ptr, out_ptr, s_ptr,
               a2_ptr, u_ptr, st2_ptr, st3_ptr, B, N, D, DG, G, eps,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
               ACC: tl.constexpr, SAVE: tl.constexpr):
    rows, rmask = _tile_rows(B, BM)
    cols, cmask = _group_cols(DG, BN)
    m2 = rmask[:, None] & cmask[None, :]
    zrow = z_ptr + rows[:, None] * (N + 1) * D + cols[None, :]
    s = tl.zeros([BM, BN], ACC)
    for i in range(N):
        srow = i * B + rows
        acc = _mm(h_ptr + i * B * D, D, w2_ptr + i * D * D, rows, rmask, cols, cmask, D, BM, BN, BK, PREC, ACC)
        a2 = acc + tl.load(b2_ptr + i * D + cols, mask=cmask, other=0.0)[None, :]
        a2 += tl.load(x_ptr + (rows[:, None] * N + i) * D + cols[None, :], mask=m2, other=0.0).to(ACC)
        yh2, mean2, rstd2 = _gn_fwd(a2, cmask[None, :], DG, eps)
        u = yh2 * tl.load(g2w_ptr + i * D + cols, mask=cmask)[None, :] + tl.load(g2b_ptr + i * D + cols, mask=cmask)[None, :]
        u += tl.load(zrow + i * D, mask=m2, other=0.0).to(ACC)
        yh3, mean3, rstd3 = _gn_fwd(tl.maximum(u, 0.0), cmask[None, :], DG, eps)
        zn = yh3 * tl.load(g3w_ptr + i * D + cols, mask=cmask)[None, :] + tl.load(g3b_ptr + i * D + cols, mask=cmask)[None, :]
        tl.store(out_ptr + rows[:, None] * (N + 1) * D + i * D + cols[None, :], zn.to(out_ptr.dtype.element_ty), mask=m2)
        s += zn
        if SAVE:
            offs = srow[:, None] * D + cols[None, :]
            tl.store(a2_ptr + offs, a2.to(a2_ptr.dtype.element_ty), mask=m2)
            tl.store(u_ptr + offs, u.to(u_ptr.dtype.element_ty), mask=m2)
            _store_tile_stats(st2_ptr, srow, rmask, tl.program_id(1), G, mean2, rstd2)
            _store_tile_stats(st3_ptr, srow, rmask, tl.program_id(1), G, mean3, rstd3)
    s += N * tl.load(zrow + N * D, mask=m2, other=0.0).to(ACC)
    tl.store(s_ptr + rows[:, None] * D + cols[None, :], s.to(s_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gate_kernel(s_ptr, wg_ptr, bg_ptr, z_ptr, q_ptr, ga_ptr, B, N, D,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                 ACC: tl.constexpr, SAVE: tl.constexpr):
    rows, rmask = _tile_rows(B, BM)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    acc = _mm(s_ptr, D, wg_ptr, rows, rmask, cols, cmask, D, BM, BN, BK, PREC, ACC)
    ga = acc + N * tl.load(bg_ptr + cols, mask=cmask, other=0.0)[None, :]
    zf = tl.load(z_ptr + rows[:, None] * (N + 1) * D + N * D + cols[None, :], mask=m2, other=0.0).to(ACC)
    offs = rows[:, None] * D + cols[None, :]
    tl.store(q_ptr + offs, (zf * ga).to(q_ptr.dtype.element_ty), mask=m2)
    if SAVE:
        tl.store(ga_ptr + offs, ga.to(ga_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _fusion_kernel(q_ptr, wf_ptr, bf_ptr, xf_ptr, gw_ptr, gb_ptr, out_ptr, a3_ptr, st_ptr, B, N, D, DG, G, eps,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                   ACC: tl.constexpr, SAVE: tl.constexpr):
    rows, rmask = _tile_rows(B, BM)
    cols, cmask = _group_cols(DG, BN)
    m2 = rmask[:, None] & cmask[None, :]
    acc = _mm(q_ptr, D, wf_ptr, rows, rmask, cols, cmask, D, BM, BN, BK, PREC, ACC)
    offs = rows[:, None] * D + cols[None, :]
    a3 = acc + tl.load(bf_ptr + cols, mask=cmask, other=0.0)[None, :]
    a3 += tl.load(xf_ptr + offs, mask=m2, other=0.0).to(ACC)
    yh, mean, rstd = _gn_fwd(tl.maximum(a3, 0.0), cmask[None, :], DG, eps)
    zf = yh * tl.load(gw_ptr + cols, mask=cmask)[None, :] + tl.load(gb_ptr + cols, mask=cmask)[None, :]
    tl.store(out_ptr + rows[:, None] * (N + 1) * D + N * D + cols[None, :], zf.to(out_ptr.dtype.element_ty), mask=m2)
    if SAVE:
        tl.store(a3_ptr + offs, a3.to(a3_ptr.dtype.element_ty), mask=m2)
        _store_tile_stats(st_ptr, rows, rmask, tl.program_id(1), G, mean, rstd)


def _interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs(bn):
    """Autotuning candidates (GPU). BN is fixed by the group width; register use grows with BM * BN."""
    cands = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (64, 64, 8, 4), (32, 64, 4, 4)]
    return [triton.Config(dict(BM=bm, BK=bk), num_warps=w, num_stages=st)
            for bm, bk, w, st in cands if bm * bn <= 128 * 256]


def _fixed_config(prec):
    """The config when not autotuning: the interpreter (timing it would be meaningless), the fp64 FMA
    path (a test path: a [BM, BK, BN] product per step, so small tiles), or DEQFUSE_AUTOTUNE=0 (the
    GPU tests: dozens of tiny shapes, each would be tuned)."""
    if _interpreted():
        return dict(BM=32, BK=32)
    if prec == "fma":
        return dict(BM=16, BK=8, num_warps=4)
    return dict(BM=64, BK=32, num_warps=4, num_stages=3)


_TUNED = {}


def _launch(kernel, grid, bn, *args, **meta):
    """Launch with a config picked by triton.autotune on a GPU (cached per shape key), else a fixed one."""
    if _interpreted() or meta["PREC"] == "fma" or os.environ.get("DEQFUSE_AUTOTUNE", "1") == "0":
        cfg = _fixed_config(meta["PREC"])
        kernel[grid(cfg)](*args, BN=bn, **cfg, **meta)
        return
    key = (kernel, bn)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(_configs(bn), key=["B", "D", "N", "SAVE"])(kernel)
    _TUNED[key][grid](*args, BN=bn, **meta)


def fused_supported(D: int, groups: int) -> bool:
    return D % groups == 0 and D // groups <= MAX_GROUP_WIDTH


def cell_forward_fused(z, x, xf, p, groups: int = 4, save: bool = False):
    """f(z) with the GEMM epilogues fused (no autograd graph). Same contract and saved dict as
    kernels.cell.cell_forward_triton. z: [B, N+1, D], x: [B, N, D], xf: [B, D] -> [B, N+1, D]."""
    _check(z, x, xf, groups)
    B, N1, D = z.shape
    N, DG = N1 - 1, D // groups
    if not fused_supported(D, groups):
        raise ValueError(f"cell_forward_fused: D / groups = {DG} exceeds {MAX_GROUP_WIDTH}; use cell_forward_triton")
    z, x, xf = z.contiguous(), x.contiguous(), xf.contiguous()
    dt = z.dtype
    w1, w2, wg, wf = (w.to(dt).contiguous() for w in (p.w1, p.w2, p.wg, p.wf))
    acc = tl.float64 if dt == torch.float64 else tl.float32
    prec = "tf32" if dt == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and z.is_cuda else "ieee"
    if dt == torch.float64:
        prec = "fma"
    elif _interpreted() and dt in (torch.bfloat16, torch.float16):
        prec = "upcast"
    meta = dict(PREC=prec, ACC=acc, SAVE=bool(save))
    bn = max(16, triton.next_power_of_2(DG))            # tl.dot needs >= 16
    st_kw = dict(dtype=torch.float64 if dt == torch.float64 else torch.float32, device=z.device)
    h = torch.empty(N, B, D, dtype=dt, device=z.device)
    out = torch.empty_like(z)
    s = torch.empty(B, D, dtype=dt, device=z.device)
    q = torch.empty(B, D, dtype=dt, device=z.device)
    if save:
        a1, a2, u = (torch.empty(N, B, D, dtype=dt, device=z.device) for _ in range(3))
        ga, a3 = torch.empty_like(q), torch.empty_like(q)
        st1, st2, st3 = (torch.empty(N * B, groups, 2, **st_kw) for _ in range(3))
        stf = torch.empty(B, groups, 2, **st_kw)
    else:  # never written (SAVE=False); any valid pointer will do
        a1 = a2 = u = ga = a3 = st1 = st2 = st3 = stf = q
    rows = lambda M: triton.cdiv(B, M["BM"])  # noqa: E731
    _launch(_l1_kernel, lambda M: (rows(M), groups, N), bn, z, w1, p.b1, p.gn1_w, p.gn1_b, h, a1, st1,
            B, N, D, DG, groups, EPS, **meta)
    _launch(_l2_kernel, lambda M: (rows(M), groups), bn, h, w2, p.b2, x, z, p.gn2_w, p.gn2_b, p.gn3_w, p.gn3_b,
            out, s, a2, u, st2, st3, B, N, D, DG, groups, EPS, **meta)
    bn_gate = min(128, max(16, triton.next_power_of_2(D)))
    _launch(_gate_kernel, lambda M: (rows(M), triton.cdiv(D, bn_gate)), bn_gate, s, wg, p.bg, z, q, ga, B, N, D, **meta)
    _launch(_fusion_kernel, lambda M: (rows(M), groups), bn, q, wf, p.bf, xf, p.gnf_w, p.gnf_b, out, a3, stf,
            B, N, D, DG, groups, EPS, **meta)
    if not save:
        return out
    return out, dict(triton=True, a1=a1, st1=st1, a2=a2, u=u, st2=st2, st3=st3, zf=z[:, N], ga=ga, a3=a3, stf=stf)
