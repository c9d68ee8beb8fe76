"""Batched root solvers for z = f(z) with per-sample residuals, best iterate and freezing.

Every solver takes ``f: [B, L] -> [B, L]`` and ``x0: [B, L]`` and returns ``(z, SolverStats)``.
Nothing in the loop syncs with the host unless ``check_every > 0`` (then one ``.all()`` every k steps),
so a fixed-``max_iter`` solve is CUDA-graph capturable. Converged samples are frozen: their state
stops changing, although f is still evaluated on the whole batch (fixed shapes).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import backend as _backend
from .reference.anderson import REL_EPS


@dataclass
class SolverStats:
    """Device tensors; nothing here forces a sync until you read it.

    abs_trace/rel_trace: [T, B] residual of each sample at each step (NaN once frozen);
    best_res: [B] residual of the returned iterate (by stop_mode); nstep: [B] step it came from;
    converged: [B] bool; steps: steps run (host int).
    """
    abs_trace: torch.Tensor
    rel_trace: torch.Tensor
    best_res: torch.Tensor
    nstep: torch.Tensor
    converged: torch.Tensor
    steps: int
    tol: float
    stop_mode: str

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def summary(self) -> dict:
        """Host-side digest (one sync)."""
        return dict(steps=self.steps, converged=int(self.converged.sum()), batch=self.converged.numel(),
                    max_res=float(self.best_res.max()), mean_nstep=float(self.nstep.float().mean()),
                    stop_mode=self.stop_mode, tol=self.tol)


class _Tracker:
    """Residuals, best iterate, freezing: the bookkeeping shared by the Broyden and fixed-point loops."""

    def __init__(self, x0, max_iter, tol, stop_mode):
        B = x0.shape[0]
        dev = x0.device
        self.tol, self.stop_rel = tol, stop_mode == "rel"
        self.best_x = x0.clone()
        self.best_res = torch.full((B,), float("inf"), device=dev)
        self.nstep = torch.zeros(B, dtype=torch.int32, device=dev)
        self.converged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.abs_trace = torch.full((max_iter, B), float("nan"), device=dev)
        self.rel_trace = torch.full((max_iter, B), float("nan"), device=dev)

    def update(self, k, x, fx):
        """Record the residual of x (whose image is fx); returns the mask of samples still moving."""
        g = (fx - x).float()
        absr = g.norm(dim=1)
        relr = absr / (fx.float().norm(dim=1) + REL_EPS)
        res = relr if self.stop_rel else absr
        active = ~self.converged
        self.abs_trace[k] = torch.where(active, absr, self.abs_trace[k])
        self.rel_trace[k] = torch.where(active, relr, self.rel_trace[k])
        better = active & (res < self.best_res)
        self.best_res = torch.where(better, res, self.best_res)
        self.best_x = torch.where(better[:, None], x, self.best_x)
        self.nstep = torch.where(better, torch.full_like(self.nstep, k + 1), self.nstep)
        self.converged = self.converged | (active & (res < self.tol))
        return ~self.converged

    def stats(self, steps, stop_mode):
        return SolverStats(self.abs_trace[:steps], self.rel_trace[:steps], self.best_res, self.nstep,
                           self.converged, steps, self.tol, stop_mode)


def _check(x0, max_iter, tol, stop_mode):
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"x0 must be a [B, L] tensor, got {getattr(x0, 'shape', type(x0))}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")


def _should_stop(k, check_every, converged):
    return check_every > 0 and (k + 1) % check_every == 0 and bool(converged.all())


class AndersonState:
    """Device buffers of one Anderson solve (see reference.anderson for the step contract)."""

    def __init__(self, x0, m, max_iter, history_dtype=None):
        B, L = x0.shape
        dev, hd = x0.device, history_dtype or x0.dtype
        acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
        self.x = x0.clone()
        self.X = torch.zeros(B, m, L, dtype=hd, device=dev)
        self.G = torch.zeros(B, m, L, dtype=hd, device=dev)
        self.GG = torch.zeros(B, m, m, dtype=acc, device=dev)
        self.best_x = x0.clone()
        self.best_res = torch.full((B,), float("inf"), dtype=acc, device=dev)
        self.converged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.nstep = torch.zeros(B, dtype=torch.int32, device=dev)
        self.abs_trace = torch.full((max_iter, B), float("nan"), dtype=acc, device=dev)
        self.rel_trace = torch.full((max_iter, B), float("nan"), dtype=acc, device=dev)

    def step(self, step_fn, fx, k, beta, lam, tol, stop_rel):
        step_fn(self.x, fx, self.X, self.G, self.GG, self.best_x, self.best_res, self.converged,
                self.nstep, self.abs_trace[k], self.rel_trace[k], k, beta, lam, tol, stop_rel)


def anderson(f: Callable, x0: torch.Tensor, *, m: int = 5, lam: float = 1e-4, beta: float = 1.0,
             max_iter: int = 50, tol: float = 1e-4, stop_mode: str = "rel", check_every: int = 0,
             history_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
    """Anderson acceleration (bordered least-squares form), one fused step per iteration.

    m: history size; lam: Tikhonov term on the Gram matrix; beta: mixing (1 = use f(x) only);
    history_dtype: dtype of the [B, m, L] ring buffers (e.g. bf16 to halve their traffic).
    """
    _check(x0, max_iter, tol, stop_mode)
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    step_fn = _backend.anderson_step_fn(backend, x0)
    st = AndersonState(x0, m, max_iter, history_dtype)
    steps = 0
    for k in range(max_iter):
        fx = f(st.x)
        if k == 0 and (fx.shape != x0.shape or fx.dtype != x0.dtype or fx.device != x0.device):
            raise ValueError(f"f(x) must match x0: got {tuple(fx.shape)} {fx.dtype} {fx.device}, "
                             f"x0 is {tuple(x0.shape)} {x0.dtype} {x0.device}")
        st.step(step_fn, fx, k, beta, lam, tol, stop_mode == "rel")
        steps = k + 1
        if _should_stop(k, check_every, st.converged):
            break
    stats = SolverStats(st.abs_trace[:steps], st.rel_trace[:steps], st.best_res, st.nstep,
                        st.converged, steps, tol, stop_mode)
    return st.best_x, stats


def fixed_point(f: Callable, x0: torch.Tensor, *, tau: float = 1.0, max_iter: int = 50,
                tol: float = 1e-4, stop_mode: str = "rel", check_every: int = 0):
    """Damped fixed-point iteration x <- (1 - tau) x + tau f(x), frozen per sample once converged."""
    _check(x0, max_iter, tol, stop_mode)
    tr = _Tracker(x0, max_iter, tol, stop_mode)
    x, steps = x0, 0
    for k in range(max_iter):
        fx = f(x)
        active = tr.update(k, x, fx)
        x = torch.where(active[:, None], (1 - tau) * x + tau * fx, x)
        steps = k + 1
        if _should_stop(k, check_every, tr.converged):
            break
    return tr.best_x, tr.stats(steps, stop_mode)


def broyden(f: Callable, x0: torch.Tensor, *, m: int = 30, max_iter: int = 50, tol: float = 1e-4,
            stop_mode: str = "rel", check_every: int = 0):
    """Limited-memory ("good") Broyden on g(x) = f(x) - x, inverse Jacobian started at -I.

    The low-rank factors live in rings of m columns per sample: Us [B, L, m], VTs [B, m, L].
    """
    _check(x0, max_iter, tol, stop_mode)
    B, L = x0.shape
    tr = _Tracker(x0, max_iter, tol, stop_mode)
    Us = x0.new_zeros(B, L, m)
    VTs = x0.new_zeros(B, m, L)

    def matvec(v):  # J^-1 v with J^-1 = -I + Us VTs ; v: [B, L]
        return -v + torch.einsum("blm,bm->bl", Us, torch.einsum("bml,bl->bm", VTs, v))

    def rmatvec(v):  # v^T J^-1
        return -v + torch.einsum("bm,bml->bl", torch.einsum("bl,blm->bm", v, Us), VTs)

    x = x0
    fx = f(x)
    gx = fx - x
    steps = 0
    for k in range(max_iter):
        active = tr.update(k, x, fx)
        steps = k + 1
        if k == max_iter - 1 or _should_stop(k, check_every, tr.converged):
            break
        dx = torch.where(active[:, None], -matvec(gx), torch.zeros_like(x))
        x_new = x + dx
        fx_new = f(x_new)
        gx_new = fx_new - x_new
        dg = gx_new - gx
        vT = rmatvec(dx)
        denom = (vT * dg).sum(1, keepdim=True)
        ok = active[:, None] & (denom.abs() > 1e-30)
        u = torch.where(ok, (dx - matvec(dg)) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
        slot = k % m
        Us[:, :, slot] = torch.where(ok, u, Us[:, :, slot])
        VTs[:, slot] = torch.where(ok, vT, VTs[:, slot])
        x, fx, gx = x_new, fx_new, gx_new
    return tr.best_x, tr.stats(steps, stop_mode)


SOLVERS = {"anderson": anderson, "broyden": broyden, "fixed_point": fixed_point}


def solve(name: str, f: Callable, x0: torch.Tensor, **kw):
    """Dispatch by name ('anderson' | 'broyden' | 'fixed_point')."""
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    return SOLVERS[name](f, x0, **kw)
