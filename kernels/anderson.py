"""Fused Anderson step: one Triton program per sample, no host sync (contract: reference/anderson.py).

Pass 1 streams x, f(x) and the G ring once: residual norms and the new Gram row <G_j, g>.
Then, in registers: Gram row/column update, the (m+1)x(m+1) bordered solve (Gauss-Jordan; the
border sits last so every pivot is non-zero without pivoting), freezing and best-iterate flags.
Pass 2 streams x, f(x), X and G again: writes the new ring slot, best_x (if improved) and x_{k+1}.
"""
import torch
import triton
import triton.language as tl

from deqfuse.flops import anderson_macs, hint
from deqfuse.reference import anderson as _ref

# Triton reads module globals inside kernels only when they are constexpr
REL_EPS = tl.constexpr(_ref.REL_EPS)
TINY = tl.constexpr(_ref.TINY)


@triton.jit
def _anderson_step_kernel(x_ptr, fx_ptr, X_ptr, G_ptr, GG_ptr, bx_ptr, bres_ptr, conv_ptr, nstep_ptr,
                          abs_ptr, rel_ptr, L, k, slot, n_valid, lam, tol,
                          M: tl.constexpr, MP: tl.constexpr, BLOCK: tl.constexpr,
                          STOP_REL: tl.constexpr, ACC: tl.constexpr, HD: tl.constexpr, BETA: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    if tl.load(conv_ptr + b) == 0:
        hd = HD
        i = tl.arange(0, MP)
        ring = (i < n_valid) & (i != slot) & (i < M)     # ring slots read from memory
        row_x = x_ptr + b * L
        row_f = fx_ptr + b * L
        ring_base = b * M * L
        # ---- pass 1: norms and Gram row
        g2 = tl.zeros([BLOCK], ACC)
        f2 = tl.zeros([BLOCK], ACC)
        gr2 = tl.zeros([BLOCK], ACC)
        dots = tl.zeros([MP, BLOCK], ACC)
        for l0 in range(0, L, BLOCK):
            offs = l0 + tl.arange(0, BLOCK)
            lm = offs < L
            xv = tl.load(row_x + offs, mask=lm, other=0.0).to(ACC)
            fv = tl.load(row_f + offs, mask=lm, other=0.0).to(ACC)
            g = fv - xv
            gr = g.to(hd).to(ACC)
            g2 += g * g
            f2 += fv * fv
            gr2 += gr * gr
            Gt = tl.load(G_ptr + ring_base + i[:, None] * L + offs[None, :],
                         mask=ring[:, None] & lm[None, :], other=0.0).to(ACC)
            dots += Gt * gr[None, :]
        absr = tl.sqrt(tl.sum(g2, 0))
        relr = absr / (tl.sqrt(tl.sum(f2, 0)) + REL_EPS)
        res = relr if STOP_REL else absr
        tl.store(abs_ptr + b, absr)
        tl.store(rel_ptr + b, relr)
        better = res < tl.load(bres_ptr + b)
        if better:
            tl.store(bres_ptr + b, res)
            tl.store(nstep_ptr + b, k + 1)
        now_conv = res < tol      # a NaN residual never converges: it keeps mixing, best_x stays finite
        if now_conv:
            tl.store(conv_ptr + b, 1)
        mix = now_conv == 0
        # ---- Gram row/column `slot`, bordered solve in registers
        row = tl.where(i == slot, tl.sum(gr2, 0), tl.sum(dots, 1))
        r2 = i[:, None]
        c2 = i[None, :]
        gmask = (r2 < M) & (c2 < M)
        gg_ptrs = GG_ptr + b * M * M + r2 * M + c2
        GG = tl.load(gg_ptrs, mask=gmask, other=0.0).to(ACC)
        GG = tl.where(r2 == slot, row[None, :], tl.where(c2 == slot, row[:, None], GG))
        if mix:
            tl.store(gg_ptrs, GG, mask=gmask)
        valid_r = r2 < n_valid
        valid_c = c2 < n_valid
        diag = tl.where(valid_r & (r2 == c2), GG, 0.0)
        lam_eff = lam * tl.max(tl.max(diag, 1), 0) + TINY
        A = tl.where(valid_r & valid_c, GG + tl.where(r2 == c2, lam_eff, 0.0), 0.0)
        A = tl.where((r2 == M) & valid_c, 1.0, A)
        A = tl.where((c2 == M) & valid_r, 1.0, A)
        A = tl.where((r2 == c2) & (r2 >= n_valid) & (r2 != M), 1.0, A)   # unused slots, padding
        rhs = tl.where(i == M, 1.0, 0.0).to(ACC)
        for kk in tl.static_range(MP):
            rowk = tl.sum(tl.where(r2 == kk, A, 0.0), 0)
            colk = tl.sum(tl.where(c2 == kk, A, 0.0), 1)
            piv = tl.sum(tl.where(i == kk, rowk, 0.0), 0)
            rk = tl.sum(tl.where(i == kk, rhs, 0.0), 0)
            fac = tl.where(i == kk, 0.0, colk / piv)
            A = A - fac[:, None] * rowk[None, :]
            rhs = rhs - fac * rk
        sol = rhs / tl.sum(tl.where(r2 == c2, A, 0.0), 1)
        alpha = tl.where(ring, sol, 0.0)
        a_s = tl.sum(tl.where(i == slot, sol, 0.0), 0)
        # ---- pass 2: new ring slot, best iterate, mixing
        if mix | better:
            for l0 in range(0, L, BLOCK):
                offs = l0 + tl.arange(0, BLOCK)
                lm = offs < L
                xn = tl.load(row_x + offs, mask=lm, other=0.0)
                if better:
                    tl.store(bx_ptr + b * L + offs, xn, mask=lm)
                if mix:
                    xv = xn.to(ACC)
                    g = tl.load(row_f + offs, mask=lm, other=0.0).to(ACC) - xv
                    ptrs = ring_base + i[:, None] * L + offs[None, :]
                    m2 = ring[:, None] & lm[None, :]
                    Xt = tl.load(X_ptr + ptrs, mask=m2, other=0.0).to(ACC)
                    Gt = tl.load(G_ptr + ptrs, mask=m2, other=0.0).to(ACC)
                    new = tl.sum(alpha[:, None] * (Xt + BETA * Gt), 0)
                    new += a_s * (xv.to(hd).to(ACC) + BETA * g.to(hd).to(ACC))
                    tl.store(X_ptr + ring_base + slot * L + offs, xv.to(hd), mask=lm)
                    tl.store(G_ptr + ring_base + slot * L + offs, g.to(hd), mask=lm)
                    tl.store(row_x + offs, new.to(xn.dtype), mask=lm)


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}


def _check_step_args(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out):
    B, L = x.shape
    m = X.shape[1]
    for name, t, shape in (("fx", fx, (B, L)), ("X", X, (B, m, L)), ("G", G, (B, m, L)), ("GG", GG, (B, m, m)),
                           ("best_x", best_x, (B, L)), ("best_res", best_res, (B,)),
                           ("converged", converged, (B,)), ("nstep", nstep, (B,)),
                           ("abs_out", abs_out, (B,)), ("rel_out", rel_out, (B,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"anderson_step: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"anderson_step: {name} is on {t.device}, x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"anderson_step: {name} must be contiguous")
    if converged.dtype != torch.bool or nstep.dtype != torch.int32:
        raise TypeError("anderson_step: converged must be bool and nstep int32")
    if fx.dtype != x.dtype or best_x.dtype != x.dtype:
        raise TypeError(f"anderson_step: fx/best_x dtype must equal x's ({x.dtype})")


def anderson_step_triton(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out,
                         k: int, beta: float = 1.0, lam: float = 1e-4, tol: float = 1e-4,
                         stop_rel: bool = True, block: int = 0, num_warps: int = 0, check: bool = True):
    """Same arguments and in-place semantics as reference.anderson_step_ref.
    check=False skips the Python-side argument checks (~tens of us): for solvers whose buffers are
    valid by construction and that check fx once."""
    if k < 0:
        raise ValueError(f"anderson_step: the step index k must be >= 0, got {k}")
    if check:
        _check_step_args(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out)
    fx = fx.contiguous()
    B, L = x.shape
    m = X.shape[1]
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    hd = _TL_DTYPES[X.dtype]
    block = block or min(1024, triton.next_power_of_2(L))
    num_warps = num_warps or (8 if block >= 1024 else 4)
    hint(x, anderson_macs(B, m, L))  # for torch.utils.flop_counter (deqfuse/flops.py)
    _anderson_step_kernel[(B,)](
        x, fx, X, G, GG, best_x, best_res, converged.view(torch.uint8), nstep, abs_out, rel_out,
        L, k, k % m, min(k + 1, m), float(lam), float(tol),
        M=m, MP=triton.next_power_of_2(m + 1), BLOCK=block, STOP_REL=bool(stop_rel), ACC=acc, HD=hd, BETA=float(beta),  # constexpr: a float arg would be fp32
        num_warps=num_warps)
