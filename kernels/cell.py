"""Triton path of the fusion cell: cuBLAS GEMMs (all N modalities in one batched call) with the
bias / GroupNorm / ReLU / residual / input-injection epilogues fused into row kernels, plus the VJP
J^T g built from the same pieces on tensors the forward saved (no autograd graph replay).

Forward (8 launches): baddbmm(W1) -> [gn_relu] -> bmm(W2) -> [modality epilogue: +b2+x_i, GN2, +z_i,
ReLU, GN3, and s = sum_i z_i+ + N z_f] -> addmm(W_g) * z_f -> mm(W_f) -> [fusion epilogue: +b_f+x_f,
ReLU, GN_f]. Math and names follow reference/cell.py. Row kernels keep a whole D-row in registers as a
[groups, D/groups] tile, so D up to a few thousand.
Layout: z, out: [B, N+1, D]; x: [B, N, D]; per-modality intermediates: [N, B, D]; GN stats: [rows, G, 2].
"""
import torch
import triton
import triton.language as tl

from deqfuse.reference.groupnorm import EPS


@triton.jit
def _tile(DG, GP: tl.constexpr, DGP: tl.constexpr, G):
    """Offsets [GP, DGP] of one D-row viewed as groups x (D/groups), and the validity mask."""
    g = tl.arange(0, GP)[:, None]
    c = tl.arange(0, DGP)[None, :]
    return g * DG + c, (g < G) & (c < DG)


@triton.jit
def _gn_fwd(y, mask, DG, eps):
    """Normalise a [GP, DGP] tile per group. Returns (yhat, mean [GP], rstd [GP])."""
    mean = tl.sum(tl.where(mask, y, 0.0), 1) / DG
    d = tl.where(mask, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / DG + eps)
    return d * rstd[:, None], mean, rstd


@triton.jit
def _gn_bwd(dout, gamma, yhat, rstd, mask, DG):
    """d(input) of GroupNorm on a tile, given d(output), gamma, yhat and rstd [GP]."""
    dyh = tl.where(mask, dout * gamma, 0.0)
    m1 = tl.sum(dyh, 1) / DG
    m2 = tl.sum(dyh * yhat, 1) / DG
    return rstd[:, None] * (dyh - m1[:, None] - yhat * m2[:, None])


@triton.jit
def _store_stats(ptr, row, mean, rstd, G, GP: tl.constexpr):
    g = tl.arange(0, GP)
    tl.store(ptr + (row * G + g) * 2, mean, mask=g < G)
    tl.store(ptr + (row * G + g) * 2 + 1, rstd, mask=g < G)


@triton.jit
def _load_stats(ptr, row, G, GP: tl.constexpr):
    g = tl.arange(0, GP)
    return (tl.load(ptr + (row * G + g) * 2, mask=g < G, other=0.0),
            tl.load(ptr + (row * G + g) * 2 + 1, mask=g < G, other=0.0))


@triton.jit
def _gn_relu_fwd_kernel(a_ptr, h_ptr, st_ptr, w_ptr, b_ptr, B, D, DG, G, eps,
                        GP: tl.constexpr, DGP: tl.constexpr, ACC: tl.constexpr, SAVE: tl.constexpr):
    """h = ReLU(GN(a)) on rows of a [N, B, D] tensor (modality n = row // B)."""
    row = tl.program_id(0).to(tl.int64)
    n = row // B
    offs, mask = _tile(DG, GP, DGP, G)
    a = tl.load(a_ptr + row * D + offs, mask=mask, other=0.0).to(ACC)
    yhat, mean, rstd = _gn_fwd(a, mask, DG, eps)
    y = yhat * tl.load(w_ptr + n * D + offs, mask=mask) + tl.load(b_ptr + n * D + offs, mask=mask)
    tl.store(h_ptr + row * D + offs, tl.maximum(y, 0.0).to(h_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        _store_stats(st_ptr, row, mean, rstd, G, GP)


@triton.jit
def _modality_fwd_kernel(a2_ptr, x_ptr, z_ptr, out_ptr, u_ptr, s_ptr, st2_ptr, st3_ptr,
                         b2_ptr, w2n_ptr, b2n_ptr, w3n_ptr, b3n_ptr, B, N, D, DG, G, eps,
                         GP: tl.constexpr, DGP: tl.constexpr, ACC: tl.constexpr, SAVE: tl.constexpr):
    """Per sample b, for each modality i: a2 += b2_i + x_i (kept for the VJP), u = GN2(a2) + z_i,
    z_i+ = GN3(ReLU(u)) -> out[b, i]; then s = sum_i z_i+ + N z_f -> s[b]."""
    b = tl.program_id(0).to(tl.int64)
    offs, mask = _tile(DG, GP, DGP, G)
    zrow = z_ptr + b * (N + 1) * D
    s = tl.zeros([GP, DGP], ACC)
    for i in range(N):
        r = i * B + b                                   # row in [N, B, D]
        a2 = tl.load(a2_ptr + r * D + offs, mask=mask, other=0.0).to(ACC)
        a2 += tl.load(b2_ptr + i * D + offs, mask=mask, other=0.0)
        a2 += tl.load(x_ptr + (b * N + i) * D + offs, mask=mask, other=0.0).to(ACC)
        if SAVE:
            tl.store(a2_ptr + r * D + offs, a2.to(a2_ptr.dtype.element_ty), mask=mask)
        yh2, m2, rs2 = _gn_fwd(a2, mask, DG, eps)
        u = yh2 * tl.load(w2n_ptr + i * D + offs, mask=mask) + tl.load(b2n_ptr + i * D + offs, mask=mask)
        u += tl.load(zrow + i * D + offs, mask=mask, other=0.0).to(ACC)
        if SAVE:
            tl.store(u_ptr + r * D + offs, u.to(u_ptr.dtype.element_ty), mask=mask)
        yh3, m3, rs3 = _gn_fwd(tl.maximum(u, 0.0), mask, DG, eps)
        zn = yh3 * tl.load(w3n_ptr + i * D + offs, mask=mask) + tl.load(b3n_ptr + i * D + offs, mask=mask)
        tl.store(out_ptr + (b * (N + 1) + i) * D + offs, zn.to(out_ptr.dtype.element_ty), mask=mask)
        s += zn
        if SAVE:
            _store_stats(st2_ptr, r, m2, rs2, G, GP)
            _store_stats(st3_ptr, r, m3, rs3, G, GP)
    s += N * tl.load(zrow + N * D + offs, mask=mask, other=0.0).to(ACC)
    tl.store(s_ptr + b * D + offs, s.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fusion_fwd_kernel(a3_ptr, xf_ptr, bf_ptr, w_ptr, bb_ptr, out_ptr, st_ptr, N, D, DG, G, eps,
                       GP: tl.constexpr, DGP: tl.constexpr, ACC: tl.constexpr, SAVE: tl.constexpr):
    """a3 += b_f + x_f (kept), z_f+ = GN_f(ReLU(a3)) -> out[b, N]."""
    b = tl.program_id(0).to(tl.int64)
    offs, mask = _tile(DG, GP, DGP, G)
    a3 = tl.load(a3_ptr + b * D + offs, mask=mask, other=0.0).to(ACC)
    a3 += tl.load(bf_ptr + offs, mask=mask, other=0.0) + tl.load(xf_ptr + b * D + offs, mask=mask, other=0.0).to(ACC)
    if SAVE:
        tl.store(a3_ptr + b * D + offs, a3.to(a3_ptr.dtype.element_ty), mask=mask)
    yh, m, rs = _gn_fwd(tl.maximum(a3, 0.0), mask, DG, eps)
    zf = yh * tl.load(w_ptr + offs, mask=mask) + tl.load(bb_ptr + offs, mask=mask)
    tl.store(out_ptr + (b * (N + 1) + N) * D + offs, zf.to(out_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        _store_stats(st_ptr, b, m, rs, G, GP)


@triton.jit
def _fusion_bwd_kernel(g_ptr, a3_ptr, st_ptr, w_ptr, da3_ptr, N, D, DG, G,
                       GP: tl.constexpr, DGP: tl.constexpr, ACC: tl.constexpr):
    """da3 = GN_f^T(gbar[b, N]) * (a3 > 0)."""
    b = tl.program_id(0).to(tl.int64)
    offs, mask = _tile(DG, GP, DGP, G)
    a3 = tl.load(a3_ptr + b * D + offs, mask=mask, other=0.0).to(ACC)
    m, rs = _load_stats(st_ptr, b, G, GP)
    yh = tl.where(mask, (tl.maximum(a3, 0.0) - m[:, None]) * rs[:, None], 0.0)
    dout = tl.load(g_ptr + (b * (N + 1) + N) * D + offs, mask=mask, other=0.0).to(ACC)
    d = _gn_bwd(dout, tl.load(w_ptr + offs, mask=mask, other=0.0), yh, rs, mask, DG)
    tl.store(da3_ptr + b * D + offs, tl.where(a3 > 0, d, 0.0).to(da3_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modality_bwd_kernel(g_ptr, ds_ptr, u_ptr, a2_ptr, st2_ptr, st3_ptr, w2n_ptr, w3n_ptr, out_ptr, da2_ptr,
                         B, N, D, DG, G, GP: tl.constexpr, DGP: tl.constexpr, ACC: tl.constexpr):
    """Row (i, b): du = GN3^T(gbar_i + ds) * (u > 0) -> out[b, i] (the residual part of dz_i);
    da2 = GN2^T(du) -> da2[i, b]."""
    r = tl.program_id(0).to(tl.int64)
    i = r // B
    b = r % B
    offs, mask = _tile(DG, GP, DGP, G)
    d = tl.load(g_ptr + (b * (N + 1) + i) * D + offs, mask=mask, other=0.0).to(ACC)
    d += tl.load(ds_ptr + b * D + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + r * D + offs, mask=mask, other=0.0).to(ACC)
    m3, rs3 = _load_stats(st3_ptr, r, G, GP)
    yh3 = tl.where(mask, (tl.maximum(u, 0.0) - m3[:, None]) * rs3[:, None], 0.0)
    du = _gn_bwd(d, tl.load(w3n_ptr + i * D + offs, mask=mask, other=0.0), yh3, rs3, mask, DG)
    du = tl.where(u > 0, du, 0.0)
    tl.store(out_ptr + (b * (N + 1) + i) * D + offs, du.to(out_ptr.dtype.element_ty), mask=mask)
    a2 = tl.load(a2_ptr + r * D + offs, mask=mask, other=0.0).to(ACC)
    m2, rs2 = _load_stats(st2_ptr, r, G, GP)
    yh2 = tl.where(mask, (a2 - m2[:, None]) * rs2[:, None], 0.0)
    da2 = _gn_bwd(du, tl.load(w2n_ptr + i * D + offs, mask=mask, other=0.0), yh2, rs2, mask, DG)
    tl.store(da2_ptr + r * D + offs, da2.to(da2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_relu_bwd_kernel(dh_ptr, a_ptr, st_ptr, w_ptr, b_ptr, B, D, DG, G,
                        GP: tl.constexpr, DGP: tl.constexpr, ACC: tl.constexpr):
    """In place on dh [N, B, D]: da1 = GN1^T(dh * (GN1(a1) > 0))."""
    row = tl.program_id(0).to(tl.int64)
    n = row // B
    offs, mask = _tile(DG, GP, DGP, G)
    a = tl.load(a_ptr + row * D + offs, mask=mask, other=0.0).to(ACC)
    m, rs = _load_stats(st_ptr, row, G, GP)
    yh = tl.where(mask, (a - m[:, None]) * rs[:, None], 0.0)
    gamma = tl.load(w_ptr + n * D + offs, mask=mask, other=0.0)
    on = yh * gamma + tl.load(b_ptr + n * D + offs, mask=mask, other=0.0) > 0
    dh = tl.where(on, tl.load(dh_ptr + row * D + offs, mask=mask, other=0.0).to(ACC), 0.0)
    tl.store(dh_ptr + row * D + offs, _gn_bwd(dh, gamma, yh, rs, mask, DG).to(dh_ptr.dtype.element_ty), mask=mask)


def _meta(D, groups, dtype):
    DG = D // groups
    DGP = triton.next_power_of_2(DG)
    GP = triton.next_power_of_2(groups)
    nw = 8 if GP * DGP >= 2048 else 4
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return dict(GP=GP, DGP=DGP, ACC=acc, num_warps=nw), DG


def _check(z, x, xf, groups):
    B, N1, D = z.shape
    if x.shape != (B, N1 - 1, D) or xf.shape != (B, D):
        raise ValueError(f"cell: x must be [B, N, D] = {[B, N1 - 1, D]} and xf [B, D]; got {list(x.shape)}, {list(xf.shape)}")
    if D % groups:
        raise ValueError(f"cell: D ({D}) must be a multiple of groups ({groups})")
    if z.device != x.device or z.device != xf.device:
        raise ValueError("cell: z, x and xf must be on one device")


def cell_forward_triton(z, x, xf, p, groups: int = 4, save: bool = False):
    """Forward-only f(z) (no autograd graph). Same contract as reference.cell_forward; GEMMs run in the
    input dtype (fp32: tf32 if torch.backends.cuda.matmul.allow_tf32), epilogues in fp32."""
    _check(z, x, xf, groups)
    z, x, xf = z.contiguous(), x.contiguous(), xf.contiguous()
    B, N1, D = z.shape
    N = N1 - 1
    meta, DG = _meta(D, groups, z.dtype)
    f32 = dict(dtype=torch.float64 if z.dtype == torch.float64 else torch.float32, device=z.device)
    save = bool(save)  # without it, the kernels skip storing intermediates and GN stats
    zm = z[:, :N].transpose(0, 1)                                          # [N, B, D] view
    a1 = torch.baddbmm(p.b1.unsqueeze(1).to(z.dtype), zm, p.w1.transpose(1, 2).to(z.dtype))
    h = torch.empty_like(a1)
    st1 = torch.empty(N * B, groups, 2, **f32)
    _gn_relu_fwd_kernel[(N * B,)](a1, h, st1, p.gn1_w, p.gn1_b, B, D, DG, groups, EPS, SAVE=save, **meta)
    a2 = torch.bmm(h, p.w2.transpose(1, 2).to(z.dtype))
    out = torch.empty_like(z)
    u = torch.empty_like(a2)
    s = torch.empty(B, D, dtype=z.dtype, device=z.device)
    st2 = torch.empty(N * B, groups, 2, **f32)
    st3 = torch.empty(N * B, groups, 2, **f32)
    _modality_fwd_kernel[(B,)](a2, x, z, out, u, s, st2, st3, p.b2, p.gn2_w, p.gn2_b, p.gn3_w, p.gn3_b,
                               B, N, D, DG, groups, EPS, SAVE=save, **meta)
    zf = z[:, N]
    ga = torch.addmm((N * p.bg).to(z.dtype), s, p.wg.T.to(z.dtype))
    a3 = torch.mm(zf * ga, p.wf.T.to(z.dtype))
    stf = torch.empty(B, groups, 2, **f32)
    _fusion_fwd_kernel[(B,)](a3, xf, p.bf, p.gnf_w, p.gnf_b, out, stf, N, D, DG, groups, EPS, SAVE=save, **meta)
    if not save:
        return out
    return out, dict(triton=True, a1=a1, st1=st1, a2=a2, u=u, st2=st2, st3=st3, zf=zf, ga=ga, a3=a3, stf=stf)


def cell_vjp_triton(gbar, saved, p, groups: int = 4):
    """J^T gbar from what cell_forward_triton(save=True) kept. gbar: [B, N+1, D] -> [B, N+1, D]."""
    gbar = gbar.contiguous()
    B, N1, D = gbar.shape
    N = N1 - 1
    dt = saved["a1"].dtype
    meta, DG = _meta(D, groups, dt)
    da3 = torch.empty(B, D, dtype=dt, device=gbar.device)
    _fusion_bwd_kernel[(B,)](gbar, saved["a3"], saved["stf"], p.gnf_w, da3, N, D, DG, groups, **meta)
    dq = torch.mm(da3, p.wf.to(dt))
    ds = torch.mm(dq * saved["zf"], p.wg.to(dt))
    out = torch.empty_like(gbar)
    out[:, N] = dq * saved["ga"] + N * ds
    da2 = torch.empty(N, B, D, dtype=dt, device=gbar.device)
    _modality_bwd_kernel[(N * B,)](gbar, ds, saved["u"], saved["a2"], saved["st2"], saved["st3"],
                                   p.gn2_w, p.gn3_w, out, da2, B, N, D, DG, groups, **meta)
    dh = torch.bmm(da2, p.w2.to(dt))
    _gn_relu_bwd_kernel[(N * B,)](dh, saved["a1"], saved["st1"], p.gn1_w, p.gn1_b, B, D, DG, groups, **meta)
    out[:, :N] += torch.bmm(dh, p.w1.to(dt)).transpose(0, 1)
    return out
