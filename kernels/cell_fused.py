"""Fused-GEMM path of the fusion cell: Triton GEMMs whose epilogues do the bias, GroupNorm, ReLU,
residual and input injection in registers, so no pre-norm activation makes a round trip through
memory (kernels/cell.py instead runs cuBLAS GEMMs followed by row kernels). Forward: 5 launches
(kernels/cell.py: 8); VJP: 6 (kernels/cell.py: ~12).

A GEMM program owns a [BM rows, one GroupNorm group] output tile, so the group statistics are complete
in its accumulator: BN = next_pow2(D / groups) columns (masked), hence D / groups <= MAX_GROUP_WIDTH.
One modality per program (keeps the sm_90 register use spill-free at D / groups = 256; tests/triton_aot.py
reads it from the cubin).
  L1   grid (B/BM, G, N): h_i = ReLU(GN1_i(z_i W1_i^T + b1_i))                       -> h [N, B, D]
  L2   grid (B/BM, G, N): a2 = h_i W2_i^T + b2_i + x_i, u = GN2_i(a2) + z_i,
                          z_i+ = GN3_i(ReLU(u))                                       -> out[:, i]
  S    grid (B)         : s = sum_i z_i+ + N z_f                                      -> s [B, D]
  GATE grid (B/BM, D/BN): q = z_f * (s W_g^T + N b_g)                                -> q [B, D]
  FUSE grid (B/BM, G)   : z_f+ = GN_f(ReLU(q W_f^T + b_f + x_f))                     -> out[:, N]
With save=True the kernels also write what the VJPs read (same dict as cell_forward_triton).
VJP (cell_vjp_fused), with gbar [B, N+1, D] and the weights transposed once (K-major operands):
  row  da3 = GN_f^T(gbar_f) * (a3 > 0)                    (kernels/cell.py's row kernel)
  Q    grid (B/BM, D/BN): dq = da3 W_f; dga = dq * z_f; of = dq * ga
  S    grid (B/BM, D/BN): ds = dga W_g; out[:, N] = of + N ds
  row  du_i = GN3_i^T(gbar_i + ds) * (u > 0), da2_i = GN2_i^T(du_i)   (kernels/cell.py's row kernel)
  H    grid (B/BM, G, N): da1_i = GN1_i^T(da2_i W2_i * (GN1_i(a1) > 0))
  Z    grid (B/BM, D/BN, N): out[:, i] = du_i + da1_i W1_i
Matmul inputs in the input dtype (fp32: tf32 when torch.backends.cuda.matmul.allow_tf32), fp32
accumulation (fp64 for fp64 inputs); epilogues in the accumulator dtype.
"""
import os
import time

import torch
from .. import backend as _backend
import triton
import triton.testing
import triton.language as tl

from deqfuse.cell import FUSED_MAX_GROUP_WIDTH
from deqfuse.reference.groupnorm import EPS

from .cell import _check, _fusion_bwd_kernel, _gn_bwd, _gn_fwd, _meta, _modality_bwd_kernel
from deqfuse.flops import cell_macs, hint

# a [BM, 256] fp32 accumulator already fills a warpgroup's registers at BM=128 (constant kept in deqfuse/cell.py)
MAX_GROUP_WIDTH = FUSED_MAX_GROUP_WIDTH


@triton.jit
def _mm(a_ptr, lda, w_ptr, rows, rmask, cols, cmask, K,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """acc[BM, BN] = A[rows, :K] @ W[cols, :K]^T; A row r at a_ptr + r * lda, W row-major [*, K].
    Both operands K-major (what Hopper's tf32 wgmma needs): the VJP passes transposed weight copies.
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
def _block_cols(D, BN: tl.constexpr):
    """Columns of the BN-wide block this program owns (program_id(1)) and their mask."""
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    return cols, cols < D


@triton.jit
def _store_tile_stats(st_ptr, srow, rmask, g, G, mean, rstd):
    """GN stats [rows, G, 2] for rows `srow` [BM] of group g."""
    tl.store(st_ptr + (srow * G + g) * 2, mean, mask=rmask)
    tl.store(st_ptr + (srow * G + g) * 2 + 1, rstd, mask=rmask)


@triton.jit
def _l1_kernel(z_ptr, w1_ptr, b1_ptr, gw_ptr, gb_ptr, h_ptr, a1_ptr, st_ptr, B, N, D, DG, G, eps,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
               ACC: tl.constexpr, SAVE: tl.constexpr):
    """Modality n = program_id(2), group program_id(1): h_n = ReLU(GN1_n(z_n W1_n^T + b1_n))."""
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
def _l2_kernel(h_ptr, w2_ptr, b2_ptr, x_ptr, z_ptr, g2w_ptr, g2b_ptr, g3w_ptr, g3b_ptr, out_ptr,
               a2_ptr, u_ptr, st2_ptr, st3_ptr, B, N, D, DG, G, eps,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
               ACC: tl.constexpr, SAVE: tl.constexpr):
    """Modality i = program_id(2): a2 = h_i W2_i^T + b2_i + x_i, u = GN2_i(a2) + z_i,
    z_i+ = GN3_i(ReLU(u)) -> out[:, i]. (One modality per program: a loop over the modalities that
    also carried s = sum_i z_i+ spilled registers at D / groups = 256.)"""
    rows, rmask = _tile_rows(B, BM)
    cols, cmask = _group_cols(DG, BN)
    i = tl.program_id(2)
    m2 = rmask[:, None] & cmask[None, :]
    srow = i * B + rows
    acc = _mm(h_ptr + i * B * D, D, w2_ptr + i * D * D, rows, rmask, cols, cmask, D, BM, BN, BK, PREC, ACC)
    a2 = acc + tl.load(b2_ptr + i * D + cols, mask=cmask, other=0.0)[None, :]
    a2 += tl.load(x_ptr + (rows[:, None] * N + i) * D + cols[None, :], mask=m2, other=0.0).to(ACC)
    offs = srow[:, None] * D + cols[None, :]
    if SAVE:
        tl.store(a2_ptr + offs, a2.to(a2_ptr.dtype.element_ty), mask=m2)
    yh2, mean2, rstd2 = _gn_fwd(a2, cmask[None, :], DG, eps)
    u = yh2 * tl.load(g2w_ptr + i * D + cols, mask=cmask)[None, :] + tl.load(g2b_ptr + i * D + cols, mask=cmask)[None, :]
    zrow = rows[:, None] * (N + 1) * D + i * D + cols[None, :]
    u += tl.load(z_ptr + zrow, mask=m2, other=0.0).to(ACC)
    if SAVE:
        tl.store(u_ptr + offs, u.to(u_ptr.dtype.element_ty), mask=m2)
        _store_tile_stats(st2_ptr, srow, rmask, tl.program_id(1), G, mean2, rstd2)
    yh3, mean3, rstd3 = _gn_fwd(tl.maximum(u, 0.0), cmask[None, :], DG, eps)
    zn = yh3 * tl.load(g3w_ptr + i * D + cols, mask=cmask)[None, :] + tl.load(g3b_ptr + i * D + cols, mask=cmask)[None, :]
    tl.store(out_ptr + zrow, zn.to(out_ptr.dtype.element_ty), mask=m2)
    if SAVE:
        _store_tile_stats(st3_ptr, srow, rmask, tl.program_id(1), G, mean3, rstd3)


@triton.jit
def _gate_input_kernel(out_ptr, z_ptr, s_ptr, B, N, D, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """s = sum_i z_i+ + N z_f for one row b = program_id(0) (z_i+ = out[b, i], z_f = z[b, N])."""
    b = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BLOCK):
        c = d0 + tl.arange(0, BLOCK)
        m = c < D
        acc = N * tl.load(z_ptr + (b * (N + 1) + N) * D + c, mask=m, other=0.0).to(ACC)
        for i in range(N):
            acc += tl.load(out_ptr + (b * (N + 1) + i) * D + c, mask=m, other=0.0).to(ACC)
        tl.store(s_ptr + b * D + c, acc.to(s_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gate_kernel(s_ptr, wg_ptr, bg_ptr, z_ptr, q_ptr, ga_ptr, B, N, D,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                 ACC: tl.constexpr, SAVE: tl.constexpr):
    """q = z_f * ga with ga = s W_g^T + N b_g (the N gate terms folded into one GEMM)."""
    rows, rmask = _tile_rows(B, BM)
    cols, cmask = _block_cols(D, BN)
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
    """z_f+ = GN_f(ReLU(q W_f^T + b_f + x_f)) -> out[:, N]."""
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


# ---------------------------------------------------------------- VJP J^T gbar (same saved dict)
# Weights arrive transposed (w*t_ptr = W^T, row-major), so every product is a K-major A @ W'^T.
@triton.jit
def _tile_stats(st_ptr, srow, rmask, g, G):
    return (tl.load(st_ptr + (srow * G + g) * 2, mask=rmask, other=0.0),
            tl.load(st_ptr + (srow * G + g) * 2 + 1, mask=rmask, other=0.0))


@triton.jit
def _vjp_q_kernel(da3_ptr, wft_ptr, zf_ptr, ldz, ga_ptr, dga_ptr, of_ptr, B, D,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """dq = da3 W_f; dga = dq * z_f -> [B, D]; of = dq * ga (the fused state's own term) -> [B, D]."""
    rows, rmask = _tile_rows(B, BM)
    cols, cmask = _block_cols(D, BN)
    m2 = rmask[:, None] & cmask[None, :]
    dq = _mm(da3_ptr, D, wft_ptr, rows, rmask, cols, cmask, D, BM, BN, BK, PREC, ACC)
    offs = rows[:, None] * D + cols[None, :]
    zf = tl.load(zf_ptr + rows[:, None] * ldz + cols[None, :], mask=m2, other=0.0).to(ACC)
    ga = tl.load(ga_ptr + offs, mask=m2, other=0.0).to(ACC)
    tl.store(dga_ptr + offs, (dq * zf).to(dga_ptr.dtype.element_ty), mask=m2)
    tl.store(of_ptr + offs, (dq * ga).to(of_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _vjp_s_kernel(dga_ptr, wgt_ptr, of_ptr, out_ptr, ds_ptr, B, N, D,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """ds = dga W_g -> [B, D]; out[:, N] = of + N ds."""
    rows, rmask = _tile_rows(B, BM)
    cols, cmask = _block_cols(D, BN)
    m2 = rmask[:, None] & cmask[None, :]
    ds = _mm(dga_ptr, D, wgt_ptr, rows, rmask, cols, cmask, D, BM, BN, BK, PREC, ACC)
    offs = rows[:, None] * D + cols[None, :]
    of = tl.load(of_ptr + offs, mask=m2, other=0.0).to(ACC)
    tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=m2)
    tl.store(out_ptr + rows[:, None] * (N + 1) * D + N * D + cols[None, :], (of + N * ds).to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _vjp_h_kernel(da2_ptr, w2t_ptr, a1_ptr, st1_ptr, g1w_ptr, g1b_ptr, da1_ptr, B, D, DG, G,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """dh_i = da2_i W2_i (one group, modality program_id(2)); da1 = GN1_i^T(dh * (GN1_i(a1) > 0))."""
    rows, rmask = _tile_rows(B, BM)
    cols, cmask = _group_cols(DG, BN)
    g = tl.program_id(1)
    i = tl.program_id(2)
    m2 = rmask[:, None] & cmask[None, :]
    dh = _mm(da2_ptr + i * B * D, D, w2t_ptr + i * D * D, rows, rmask, cols, cmask, D, BM, BN, BK, PREC, ACC)
    srow = i * B + rows
    offs = srow[:, None] * D + cols[None, :]
    a1 = tl.load(a1_ptr + offs, mask=m2, other=0.0).to(ACC)
    mu1, rs1 = _tile_stats(st1_ptr, srow, rmask, g, G)
    yh1 = tl.where(m2, (a1 - mu1[:, None]) * rs1[:, None], 0.0)
    gamma = tl.load(g1w_ptr + i * D + cols, mask=cmask, other=0.0)[None, :]
    on = yh1 * gamma + tl.load(g1b_ptr + i * D + cols, mask=cmask, other=0.0)[None, :] > 0
    da1 = _gn_bwd(tl.where(on, dh, 0.0), gamma, yh1, rs1, cmask[None, :], DG)
    tl.store(da1_ptr + offs, da1.to(da1_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _vjp_z_kernel(da1_ptr, w1t_ptr, du_ptr, out_ptr, B, N, D,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """out[:, i] = du_i + da1_i W1_i (modality program_id(2); du: [B, N+1, D] like out)."""
    rows, rmask = _tile_rows(B, BM)
    cols, cmask = _block_cols(D, BN)
    i = tl.program_id(2)
    m2 = rmask[:, None] & cmask[None, :]
    acc = _mm(da1_ptr + i * B * D, D, w1t_ptr + i * D * D, rows, rmask, cols, cmask, D, BM, BN, BK, PREC, ACC)
    acc += tl.load(du_ptr + (rows[:, None] * (N + 1) + i) * D + cols[None, :], mask=m2, other=0.0).to(ACC)
    tl.store(out_ptr + rows[:, None] * (N + 1) * D + i * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)


def _interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs(bn, group_tile=True):
    """Autotuning candidates (GPU) by tile width BN; the first is the untuned default. group_tile: the
    program owns a whole GroupNorm group (heavier epilogue). Chosen from the sm_90 register report and
    SASS (tests/triton_aot.py): group tiles stay spill-free with 32-row tiles on 8 warps, but those
    compile to mma.sync (HMMA); 64-row tiles get wgmma (HGMMA) and spill ~0.3 KB/thread at BN = 128,
    ~1 KB at 256 in L2 and the VJP's H. Both kinds are candidates: only timing can choose. 128-row
    tiles spill everywhere."""
    if bn >= 128 and group_tile:
        cands = [(32, 32, 8, 4), (32, 32, 8, 3), (64, 32, 8, 3), (64, 32, 8, 4)]
    elif bn >= 128:
        cands = [(64, 64, 8, 3), (64, 32, 8, 3), (32, 32, 8, 4), (64, 32, 4, 3)]
    else:
        cands = [(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)]
    return [triton.Config(dict(BM=bm, BK=bk), num_warps=w, num_stages=st) for bm, bk, w, st in cands]


def _fixed_config(prec, bn, group_tile=True):
    """The config when not autotuning: the interpreter (timing it would be meaningless), the fp64 FMA
    path (a test path: a [BM, BK, BN] product per step, so small tiles), or autotuning off
    (deqfuse.set_triton_autotune(False): the GPU tests, dozens of tiny shapes each of which would be tuned): the
    first autotuning candidate."""
    if _interpreted():
        return dict(BM=32, BK=32)
    if prec == "fma":
        return dict(BM=16, BK=8, num_warps=4)
    c = _configs(bn, group_tile)[0]
    return dict(**c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


_TUNED = {}


_AUTOTUNE_IN_INTERPRETER = False  # tests flip it to run the autotuning path itself on the CPU


def _quick_bench(kernel_call, quantiles=None, **_):
    """The autotuner's timer, shorter than its default (25 + 100 ms per config): a sweep tunes ~10
    kernels at each of dozens of shapes. Under the interpreter: one timed call."""
    if _interpreted():
        t0 = time.perf_counter()
        kernel_call()
        ms = 1e3 * (time.perf_counter() - t0)
        return [ms, ms, ms] if quantiles else ms
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _autotuned(kernel, bn):
    """kernel under triton.autotune, keyed on the shape arguments it has (Triton rejects others)."""
    key = [k for k in ("B", "D", "N", "SAVE") if k in kernel.arg_names]
    configs = _configs(bn, "DG" in kernel.arg_names)
    try:
        return triton.autotune(configs, key=key, do_bench=_quick_bench)(kernel)
    except TypeError:  # a Triton without autotune(do_bench=...): its default timer
        return triton.autotune(configs, key=key)(kernel)


def _launch(kernel, grid, bn, *args, **meta):
    """Launch with a config picked by triton.autotune on a GPU (cached per shape key), else a fixed one.
    Every kernel here is a pure function of its inputs (no read-modify-write of an output), so the
    autotuner may run it repeatedly."""
    fixed = (_interpreted() and not _AUTOTUNE_IN_INTERPRETER) or not _backend.triton_autotune()
    if fixed or meta["PREC"] == "fma":
        cfg = _fixed_config(meta["PREC"], bn, "DG" in kernel.arg_names)
        kernel[grid(cfg)](*args, BN=bn, **cfg, **meta)
        return
    key = (kernel, bn)
    if key not in _TUNED:
        _TUNED[key] = _autotuned(kernel, bn)
    _TUNED[key][grid](*args, BN=bn, **meta)


def _gemm_meta(dt, on_gpu):
    """PREC / ACC constexprs for a GEMM in dtype dt (see _mm)."""
    if dt == torch.float64:
        prec = "fma"
    elif dt == torch.float32:
        prec = "tf32" if on_gpu and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        prec = "upcast" if _interpreted() else "ieee"
    return dict(PREC=prec, ACC=tl.float64 if dt == torch.float64 else tl.float32)


def _weights(p, dt):
    """W1, W2, W_g, W_f in the GEMM dtype (no copy when they already are)."""
    return [w.to(dt).contiguous() for w in (p.w1, p.w2, p.wg, p.wf)]


def fused_supported(D: int, groups: int) -> bool:
    return D % groups == 0 and D // groups <= MAX_GROUP_WIDTH


def _tile_widths(D, groups, who):
    """(BN of the group tiles, BN of the plain D/BN tiles); raises if the groups are too wide."""
    if not fused_supported(D, groups):
        raise ValueError(f"{who}: D / groups = {D // groups} exceeds {MAX_GROUP_WIDTH}; use the kernels/cell.py path")
    return max(16, triton.next_power_of_2(D // groups)), min(128, max(16, triton.next_power_of_2(D)))  # tl.dot: >= 16


def cell_forward_fused(z, x, xf, p, groups: int = 4, save: bool = False):
    """f(z) with the GEMM epilogues fused (no autograd graph). Same contract and saved dict as
    kernels.cell.cell_forward_triton. z: [B, N+1, D], x: [B, N, D], xf: [B, D] -> [B, N+1, D]."""
    _check(z, x, xf, groups)
    B, N1, D = z.shape
    N, DG = N1 - 1, D // groups
    bn, bn_full = _tile_widths(D, groups, "cell_forward_fused")
    z, x, xf = z.contiguous(), x.contiguous(), xf.contiguous()
    dt = z.dtype
    w1, w2, wg, wf = _weights(p, dt)
    meta = dict(**_gemm_meta(dt, z.is_cuda), SAVE=bool(save))
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
    hint(z, cell_macs(B, N, D))  # its GEMMs are Triton's: told to torch.utils.flop_counter (deqfuse/flops.py)
    _launch(_l1_kernel, lambda M: (rows(M), groups, N), bn, z, w1, p.b1, p.gn1_w, p.gn1_b, h, a1, st1,
            B, N, D, DG, groups, EPS, **meta)
    _launch(_l2_kernel, lambda M: (rows(M), groups, N), bn, h, w2, p.b2, x, z, p.gn2_w, p.gn2_b, p.gn3_w, p.gn3_b,
            out, a2, u, st2, st3, B, N, D, DG, groups, EPS, **meta)
    _gate_input_kernel[(B,)](out, z, s, B, N, D, BLOCK=min(1024, triton.next_power_of_2(D)), ACC=meta["ACC"])
    _launch(_gate_kernel, lambda M: (rows(M), triton.cdiv(D, bn_full)), bn_full, s, wg, p.bg, z, q, ga, B, N, D, **meta)
    _launch(_fusion_kernel, lambda M: (rows(M), groups), bn, q, wf, p.bf, xf, p.gnf_w, p.gnf_b, out, a3, stf,
            B, N, D, DG, groups, EPS, **meta)
    if not save:
        return out
    return out, dict(triton=True, a1=a1, st1=st1, a2=a2, u=u, st2=st2, st3=st3, zf=z[:, N], ga=ga, a3=a3, stf=stf)


def cell_vjp_fused(gbar, saved, p, groups: int = 4):
    """J^T gbar from what either Triton forward saved, with the GroupNorm-1 backward in a GEMM epilogue:
    2 row kernels + 4 GEMMs (kernels.cell.cell_vjp_triton: ~8 row/elementwise + 4 cuBLAS).
    Adds the transposed weights to `saved` on first use. gbar: [B, N+1, D] -> [B, N+1, D]."""
    gbar = gbar.contiguous()
    B, N1, D = gbar.shape
    N, DG = N1 - 1, D // groups
    bn, bn_full = _tile_widths(D, groups, "cell_vjp_fused")
    dt = saved["a1"].dtype
    if saved.get("_wT_dtype") != dt:  # W^T copies, made once per saved point (an adjoint solve reuses them)
        saved["_wT"] = [w.transpose(-1, -2).contiguous() for w in _weights(p, dt)]
        saved["_wT_dtype"] = dt
    w1t, w2t, wgt, wft = saved["_wT"]
    meta = _gemm_meta(dt, gbar.is_cuda)
    hint(gbar, cell_macs(B, N, D))
    kw = dict(dtype=dt, device=gbar.device)
    rmeta, _ = _meta(D, groups, dt)
    da3 = torch.empty(B, D, **kw)
    _fusion_bwd_kernel[(B,)](gbar, saved["a3"], saved["stf"], p.gnf_w, da3, N, D, DG, groups, **rmeta)
    dga, of, ds = (torch.empty(B, D, **kw) for _ in range(3))
    da2, da1 = (torch.empty(N, B, D, **kw) for _ in range(2))
    du = torch.empty_like(gbar)                      # [B, N+1, D]; slot N unused
    out = torch.empty_like(gbar)
    zf = saved["zf"]
    rows = lambda M: triton.cdiv(B, M["BM"])  # noqa: E731
    cols = lambda M: triton.cdiv(D, bn_full)  # noqa: E731
    _launch(_vjp_q_kernel, lambda M: (rows(M), cols(M)), bn_full, da3, wft, zf, zf.stride(0), saved["ga"], dga, of,
            B, D, **meta)
    _launch(_vjp_s_kernel, lambda M: (rows(M), cols(M)), bn_full, dga, wgt, of, out, ds, B, N, D, **meta)
    _modality_bwd_kernel[(N * B,)](gbar, ds, saved["u"], saved["a2"], saved["st2"], saved["st3"], p.gn2_w, p.gn3_w,
                                   du, da2, B, N, D, DG, groups, **rmeta)
    _launch(_vjp_h_kernel, lambda M: (rows(M), groups, N), bn, da2, w2t, saved["a1"], saved["st1"], p.gn1_w, p.gn1_b,
            da1, B, D, DG, groups, **meta)
    _launch(_vjp_z_kernel, lambda M: (rows(M), cols(M), N), bn_full, da1, w1t, du, out, B, N, D, **meta)
    return out
