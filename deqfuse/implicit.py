"""Gradients through a fixed point z* = f(z*): implicit differentiation, phantom gradient, and the
Hutchinson Jacobian regulariser. Independent of the cell: everything works on flat [B, L] states.
"""
from typing import Callable

import torch

from .solvers import solve


class ImplicitAdjoint(torch.autograd.Function):
    """Identity on f(z*) in the forward; in the backward replaces the incoming gradient `grad` by the
    adjoint fixed point g = J^T g + grad (J = df/dz at z*), solved per sample with a batched solver.

    vjp: g [B, L] -> J^T g [B, L] (no autograd graph needed, e.g. a fused kernel on saved tensors).
    The solver's stats of the last backward are stored on `stats_box[0]` when a list is given.
    """

    @staticmethod
    def forward(ctx, fz, vjp: Callable, solver: str, solver_kw: dict, stats_box):
        ctx.vjp, ctx.solver, ctx.solver_kw, ctx.stats_box = vjp, solver, solver_kw, stats_box
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        with torch.no_grad():
            g, stats = solve(ctx.solver, lambda y: ctx.vjp(y) + grad, grad.clone(), **ctx.solver_kw)
        if ctx.stats_box is not None:
            ctx.stats_box[:] = [stats]
        return g, None, None, None, None


def implicit_grad(fz, vjp: Callable, solver: str = "anderson", stats_box=None, **solver_kw):
    """Attach the implicit gradient to fz = f(z*) ([B, L], computed with grad enabled)."""
    return ImplicitAdjoint.apply(fz, vjp, solver, solver_kw, stats_box)


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
