"""Gradients through a fixed point z* = f(z*): implicit differentiation, phantom gradient, and the
Hutchinson Jacobian regulariser. Independent of the cell: everything works on flat [B, L] states.
"""
from typing import Callable

import torch

from . import profiling
from ._validate import check_choice
from .errors import ConvergenceError, ConvergenceWarning, warn
from .rowwise import plus_rows, is_rowwise
from .solvers import solve


NONCONVERGENCE = ("warn", "ignore", "raise")


def check_converged(stats, mode: str, what: str, tol_name: str, iter_name: str, max_iter: int, module=None):
    """What a solve that left samples above its tolerance does, by mode: 'warn' a ConvergenceWarning (stable
    text, attributed to the caller: see deqfuse.errors), 'raise' a ConvergenceError with the counts, 'ignore'
    nothing (read the stats). One host sync unless 'ignore'. A solve whose residuals are not finite because
    `module` holds non-finite parameters raises a ValueError naming them (in 'warn' and 'raise' modes)."""
    if mode == "ignore" or stats.all_converged:
        return
    if module is not None and not bool(torch.isfinite(stats.best_res).all()):
        bad = [n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(f"{what}: the layer's parameters {bad} hold NaN or Inf (an optimiser step diverged?); "
                             f"every output would be non-finite")
    if mode == "raise":
        s = stats.summary()
        raise ConvergenceError(f"{what}: {s['batch'] - s['converged']}/{s['batch']} samples did not reach "
                               f"{tol_name}={stats.tol:g} ({stats.stop_mode} residual) in {s['steps']} steps "
                               f"(largest residual {s['max_res']:.3g})")
    warn(f"{what}: some samples did not reach {tol_name}={stats.tol:g} ({stats.stop_mode} residual) within "
         f"{iter_name}={max_iter} steps; each returns its best iterate (counts: the layer's info, "
         f"return_info=True; in training, jac_reg=1 with info.jac_loss added to the loss keeps the fixed point "
         f"easy)", ConvergenceWarning)


SECOND_ORDER = ("DEQFusion(grad='implicit') is differentiable once: its adjoint solve has no graph, so a "
                "second-order gradient (create_graph=True: gradient penalties, hvp, hessian, "
                "torch.autograd.functional.jvp) through it would be wrong. Use grad='unrolled' (differentiable twice "
                "on every backend) or grad='phantom' for such losses")


class ImplicitAdjoint(torch.autograd.Function):
    """Identity on f(z*) in the forward; in the backward replaces the incoming gradient `grad` by
    adjoint(grad), the solution g of the adjoint fixed point g = J^T g + grad (J = df/dz at z*).
    Once differentiable: the adjoint solve runs without a graph, so a second-order gradient through it
    would be wrong; a backward with create_graph=True raises (SECOND_ORDER) instead of returning a
    gradient whose own derivative would miss the adjoint's."""

    @staticmethod
    def forward(ctx, fz, adjoint: Callable):
        ctx.adjoint = adjoint
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(SECOND_ORDER)
        with torch.no_grad(), profiling.range("adjoint_solve"):
            return ctx.adjoint(grad.contiguous()), None


def adjoint_solver(vjp: Callable, solver: str = "anderson", stats_box=None, on_nonconvergence: str = "ignore",
                   init: str = "grad", **solver_kw):
    """grad -> g solving g = vjp(g) + grad per sample with a batched solver (vjp: [B, L] -> [B, L],
    e.g. a fused kernel on saved tensors; if vjp is row-wise (deqfuse.rowwise) the adjoint solve can
    shrink its batch to the unconverged rows). The solver's stats land in stats_box[0] if a list is
    given; on_nonconvergence: check_converged's mode (b_tol, b_max_iter); init: the initial guess,
    'grad' (the solution of the Jacobian-free approximation) or 'zeros' (the official code's)."""
    check_choice("init", init, ("grad", "zeros"))

    def adjoint(grad):
        getattr(vjp, "check_versions", lambda: None)()
        if init == "zeros":  # the official formulation: g = J^T g + grad from g = 0, residuals of g
            g, stats = solve(solver, plus(vjp, grad), torch.zeros_like(grad), **solver_kw)
        else:
            # y = J^T (y + grad) = J^T y + J^T grad, g = y + grad: the residuals of g = J^T g + grad (the problem
            # shifted by grad), but the relative residual is measured against J^T g, the part of the gradient
            # the solve computes (against g it would call a solve converged once grad dominates, before J^T g
            # is accurate). From y = J^T grad: one Picard step from g = grad. (The solvers never write x0.)
            c = vjp(grad)
            y, stats = solve(solver, plus(vjp, c), c, **solver_kw)
            g = y + grad
        if stats_box is not None:
            stats_box[:] = [stats]
        check_converged(stats, on_nonconvergence, "DEQFusion adjoint (backward) solve", "b_tol", "b_max_iter",
                        solver_kw.get("max_iter", 50))
        return g
    return adjoint


def plus(vjp: Callable, c: torch.Tensor):
    """y -> vjp(y) + c, row-wise (deqfuse.rowwise) when vjp is."""
    return plus_rows(vjp, c) if is_rowwise(vjp) else (lambda y: vjp(y) + c)


def implicit_grad(fz, vjp: Callable, solver: str = "anderson", stats_box=None, on_nonconvergence: str = "ignore",
                  init: str = "grad", **solver_kw):
    """Attach the implicit gradient to fz = f(z*) ([B, L], computed with grad enabled)."""
    return ImplicitAdjoint.apply(fz, adjoint_solver(vjp, solver, stats_box, on_nonconvergence, init, **solver_kw))


def autograd_vjp(fz, z):
    """vjp through autograd (graph replay each call); z must be the leaf fz was computed from."""
    return lambda g: torch.autograd.grad(fz, z, g, retain_graph=True)[0]


def phantom_grad(f: Callable, z_star, steps: int = 5, lam: float = 0.8):
    """Phantom gradient: k damped steps z <- (1-lam) z + lam f(z) from z* with the graph kept."""
    if steps < 1:
        raise ValueError(f"phantom steps must be >= 1, got {steps}")
    z = z_star.detach()
    for _ in range(steps):
        z = (1 - lam) * z + lam * f(z)
    return z


def jacobian_reg(fz, z, n_samples: int = 1):
    """Hutchinson estimate of ||J||_F^2 / numel(z) with J = dfz/dz (differentiable: create_graph)."""
    total = fz.new_zeros(())
    for _ in range(n_samples):
        v = torch.randn_like(z)
        vj = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=True)[0]
        total = total + vj.square().sum()
    return total / (n_samples * z.numel())
