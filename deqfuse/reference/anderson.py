"""Plain-PyTorch reference of one batched Anderson step (the contract the Triton/CUDA steps meet).

Per sample b that is not yet converged, with s = k mod m and n = min(k+1, m) filled ring slots:
  g = f(x) - x ; abs = ||g|| ; rel = abs / (||f(x)|| + REL_EPS) ; res = rel or abs (stop_mode)
  best_x/best_res/nstep <- x/res/k+1 where res improves ; converged <- res < tol (then frozen)
  otherwise: X[s] = x ; G[s] = g ; GG[s, :] = GG[:, s] = <G[j], g>   (one new Gram row)
  solve the bordered least squares  [[GG + lam' I, 1], [1^T, 0]] [a; mu] = [0; 1]
    with lam' = lam * max_j GG[j, j] + TINY: Tikhonov relative to the residual scale, so the step is
    scale-invariant and keeps converging when residuals are tiny (an absolute lam stalls there)
  x <- sum_j a_j (X[j] + beta G[j])    (= beta sum a F + (1-beta) sum a X)
Converged samples are left untouched (their trace entries stay NaN).
Shapes: x, fx, best_x: [B, L]; X, G: [B, m, L]; GG: [B, m, m]; best_res, abs_out, rel_out: [B] fp32;
converged: [B] bool; nstep: [B] int32. Ring buffers may be bf16/fp16; all math is fp32 (or fp64).
"""
import torch

from ..precision import full_precision

REL_EPS = 1e-8
TINY = 1e-30


def bordered_solve(GG, n_valid: int, lam: float):
    """Weights a: [B, m] of the bordered system, slots >= n_valid get weight 0. GG: [B, m, m]."""
    B, m, _ = GG.shape
    valid = torch.arange(m, device=GG.device) < n_valid
    H = GG.new_zeros(B, m + 1, m + 1)
    eye = torch.eye(m, dtype=GG.dtype, device=GG.device)
    mask2 = valid[:, None] & valid[None, :]
    diag = torch.where(valid, GG.diagonal(dim1=1, dim2=2), 0.0)
    lam_eff = lam * diag.amax(1) + TINY
    H[:, :m, :m] = torch.where(mask2, GG + lam_eff[:, None, None] * eye, eye)
    H[:, :m, m] = valid.to(GG.dtype)
    H[:, m, :m] = valid.to(GG.dtype)
    rhs = GG.new_zeros(B, m + 1, 1)
    rhs[:, m] = 1.0
    return torch.linalg.solve_ex(H, rhs)[0][:, :m, 0]  # solve_ex: no host sync (graph-capturable)


def record_residual_ref(x, fx, best_x, best_res, converged, nstep, abs_out, rel_out, k: int, tol: float,
                        stop_rel: bool):
    """The per-sample bookkeeping of step k shared by every solver (and met by the fused steps): the
    residuals of x, whose image is fx, into abs_out / rel_out (NaN for samples frozen before this step);
    best_x / best_res / nstep where the residual improves; converged where it drops below tol (a NaN
    residual never converges). In place. Returns (active: not converged before this step,
    now_converged: converged at this step, g = fx - x in the accumulation dtype)."""
    acc = best_res.dtype
    active = ~converged
    xa, fa = x.to(acc), fx.to(acc)
    g = fa - xa
    absr = g.norm(dim=1)
    relr = absr / (fa.norm(dim=1) + REL_EPS)
    res = relr if stop_rel else absr
    nan = torch.full_like(absr, float("nan"))
    abs_out.copy_(torch.where(active, absr, nan).to(abs_out.dtype))
    rel_out.copy_(torch.where(active, relr, nan).to(rel_out.dtype))
    better = active & (res < best_res)
    best_res.copy_(torch.where(better, res, best_res))
    best_x.copy_(torch.where(better[:, None], x, best_x))
    nstep.masked_fill_(better, k + 1)
    now_conv = active & (res < tol)
    converged.logical_or_(now_conv)
    return active, now_conv, g


@full_precision
def anderson_step_ref(x, fx, X, G, GG, best_x, best_res, converged, nstep, abs_out, rel_out,
                      k: int, beta: float = 1.0, lam: float = 1e-4, tol: float = 1e-4,
                      stop_rel: bool = True):
    """One step, in place on every buffer (see module docstring)."""
    if k < 0:
        raise ValueError(f"anderson_step: the step index k must be >= 0, got {k}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = X.shape[1]
    active, now_conv, g = record_residual_ref(x, fx, best_x, best_res, converged, nstep, abs_out, rel_out, k,
                                              tol, stop_rel)
    mix = active & ~now_conv
    s = k % m
    X[:, s] = torch.where(mix[:, None], x, X[:, s])
    G[:, s] = torch.where(mix[:, None], g.to(G.dtype), G[:, s])
    row = torch.einsum("bjl,bl->bj", G.to(acc), G[:, s].to(acc))
    GG[:, s, :] = torch.where(mix[:, None], row.to(GG.dtype), GG[:, s, :])
    GG[:, :, s] = GG[:, s, :]
    a = bordered_solve(GG.to(acc), min(k + 1, m), lam)
    x_new = torch.einsum("bj,bjl->bl", a, X.to(acc) + beta * G.to(acc))
    x.copy_(torch.where(mix[:, None], x_new.to(x.dtype), x))
