"""Row-wise functions: what lets a solver shrink its batch to the samples that still need work.

A map f: [B, L] -> [B, L] is *row-wise* when row b of f(z) depends only on row b of z and on row b of
per-sample inputs (the modality features, the incoming gradient, ...). Such an f can be evaluated on a
subset of rows: `f.subset(idx)` returns the same map for the rows `idx` of the batch (inputs gathered
once, not per call). The solvers compact their active set only for callables that have `subset`;
a plain callable gets early exit but is always evaluated on its whole batch.

A map may also have a compiled whole Anderson solve (WholeSolve): the 'cuda' implementation of the
registry's 'anderson_solve' op (backend.REGISTRY), which solvers.anderson runs in place of its loop where
backend.select picks it. A VJP whose adjoint fixed point y = g(y) + c has one is a WholeSolvePlus;
plus_rows(g, c) then gives a WholeSolve.
"""
from typing import Callable, Tuple

import torch


def is_rowwise(f) -> bool:
    return callable(getattr(f, "subset", None))


class RowwiseFn:
    """f(z) = fn(z, *inputs) where every input is a tensor with the batch on dim 0.

    fn: (z [b, L], *inputs [b, ...]) -> [b, L] for any b (the rows of z and of the inputs correspond).
    """

    def __init__(self, fn: Callable, *inputs: torch.Tensor):
        self.fn, self.inputs = fn, inputs

    def __call__(self, z):
        return self.fn(z, *self.inputs)

    def subset(self, idx: torch.Tensor) -> "RowwiseFn":
        """The map restricted to rows idx (int64 [b'], indices into this map's batch)."""
        return RowwiseFn(self.fn, *(t.index_select(0, idx) for t in self.inputs))


class WholeSolve:
    """A map with a compiled whole Anderson solve of x = f(x) (solvers.whole_solve decides when it runs)."""

    def anderson_solve(self, x0: torch.Tensor, results, *, m: int, beta: float, lam: float, tol: float,
                       stop_rel: bool, max_iter: int) -> Tuple[int, int]:
        """Solve from x0 [B, L] into results (a solvers.Results, updated in place) -> (steps run, rows evaluated)."""
        raise NotImplementedError

    def solve_plan(self) -> str:
        """What runs the solve (SolverStats.plan)."""
        raise NotImplementedError


class WholeSolvePlus:
    """A map g with a kernel for g(y) + c (call_plus) and a compiled whole solve of y = g(y) + c."""

    def call_plus(self, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def anderson_solve_plus(self, c: torch.Tensor, y0: torch.Tensor, results, **kw) -> Tuple[int, int]:
        raise NotImplementedError

    def solve_plan(self) -> str:
        raise NotImplementedError


class PlusRows:
    """y -> g(y) + c with c: [B, L] (the adjoint fixed point g = J^T g + grad). Row-wise if g is."""

    def __init__(self, g: Callable, c: torch.Tensor):
        self.g, self.c = g, c

    def __call__(self, y):
        return self.g(y) + self.c

    def subset(self, idx: torch.Tensor) -> "PlusRows":
        if not is_rowwise(self.g):
            raise TypeError("PlusRows.subset needs a row-wise g (one with a subset(idx) method)")
        return plus_rows(self.g.subset(idx), self.c.index_select(0, idx))


class WholeSolvePlusRows(PlusRows, WholeSolve):
    """PlusRows of a WholeSolvePlus g: g's kernel adds c in its own epilogue, and the solve is g's."""

    def __call__(self, y):
        return self.g.call_plus(y, self.c)

    def anderson_solve(self, x0, results, **kw):
        return self.g.anderson_solve_plus(self.c, x0, results, **kw)

    def solve_plan(self) -> str:
        return self.g.solve_plan()


def plus_rows(g: Callable, c: torch.Tensor) -> PlusRows:
    """y -> g(y) + c as a PlusRows (a WholeSolve when g is a WholeSolvePlus)."""
    return WholeSolvePlusRows(g, c) if isinstance(g, WholeSolvePlus) else PlusRows(g, c)
