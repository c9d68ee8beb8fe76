"""Gradients through a fixed point z* = f(z*): implicit differentiation, phantom gradient, and the
Hutchinson Jacobian regulariser. Independent of the cell: everything works on flat [B, L] states.
"""
import warnings
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from . import profiling
from ._validate import check_choice
from .rowwise import PlusRows, is_rowwise
from .solvers import solve


def warn_if_not_converged(stats, what: str, tol_name: str):
    """One host sync: a RuntimeWarning if some samples of the solve did not reach the tolerance."""
    if stats.all_converged:
        return
    s = stats.summary()
    warnings.warn(f"{what}: {s['batch'] - s['converged']}/{s['batch']} samples did not reach {tol_name}="
                  f"{s['tol']} ({s['stop_mode']} residual) in {s['steps']} steps (max residual {s['max_res']:.3g}); "
                  f"returning each sample's best iterate", RuntimeWarning, stacklevel=3)


class ImplicitAdjoint(torch.autograd.Function):
    """Identity on f(z*) in the forward; in the backward replaces the incoming gradient `grad` by
    adjoint(grad), the solution g of the adjoint fixed point g = J^T g + grad (J = df/dz at z*).
    Once differentiable: the adjoint solve runs without a graph, so a second-order gradient through it
    would be wrong; a double backward raises instead (grad='unrolled' or 'phantom' are differentiable
    twice)."""

    @staticmethod
    def forward(ctx, fz, adjoint: Callable):
        ctx.adjoint = adjoint
        return fz.view_as(fz)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        with torch.no_grad(), profiling.range("adjoint_solve"):
            return ctx.adjoint(grad.contiguous()), None


def adjoint_solver(vjp: Callable, solver: str = "anderson", stats_box=None, warn: bool = False, init: str = "grad",
                   **solver_kw):
    """grad -> g solving g = vjp(g) + grad per sample with a batched solver (vjp: [B, L] -> [B, L],
    e.g. a fused kernel on saved tensors; if vjp is row-wise (deqfuse.rowwise) the adjoint solve can
    shrink its batch to the unconverged rows). The solver's stats land in stats_box[0] if a list is
    given; warn: a RuntimeWarning when samples do not converge (one host sync); init: the initial guess,
    'grad' (the solution of the Jacobian-free approximation) or 'zeros' (the official code's)."""
    check_choice("init", init, ("grad", "zeros"))

    def adjoint(grad):
        f = PlusRows(vjp, grad) if is_rowwise(vjp) else (lambda y: vjp(y) + grad)
        # the solvers never write x0 (their iterate and best iterate are copies): grad serves as x0 itself
        g, stats = solve(solver, f, grad if init == "grad" else torch.zeros_like(grad), **solver_kw)
        if stats_box is not None:
            stats_box[:] = [stats]
        if warn:
            warn_if_not_converged(stats, "DEQFusion adjoint (backward) solve", "b_tol")
        return g
    return adjoint


def implicit_grad(fz, vjp: Callable, solver: str = "anderson", stats_box=None, warn: bool = False, init: str = "grad",
                  **solver_kw):
    """Attach the implicit gradient to fz = f(z*) ([B, L], computed with grad enabled)."""
    return ImplicitAdjoint.apply(fz, adjoint_solver(vjp, solver, stats_box, warn, init, **solver_kw))


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
