"""Row-wise functions: what lets a solver shrink its batch to the samples that still need work.

A map f: [B, L] -> [B, L] is *row-wise* when row b of f(z) depends only on row b of z and on row b of
per-sample inputs (the modality features, the incoming gradient, ...). Such an f can be evaluated on a
subset of rows: `f.subset(idx)` returns the same map for the rows `idx` of the batch (inputs gathered
once, not per call). The solvers compact their active set only for callables that have `subset`;
a plain callable gets early exit but is always evaluated on its whole batch.
"""
from typing import Callable

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


class PlusRows:
    """y -> g(y) + c with c: [B, L] (the adjoint fixed point g = J^T g + grad). Row-wise if g is.
    If g has call_plus(y, c) (a kernel that adds c in its own epilogue), that is used."""

    def __init__(self, g: Callable, c: torch.Tensor):
        self.g, self.c = g, c
        self._fused = getattr(g, "call_plus", None)
        solve_plus = getattr(g, "anderson_solve_plus", None)
        if solve_plus is not None:  # g's compiled whole solve of y = g(y) + c (solvers.whole_solve)
            self.anderson_solve = lambda y0, results, **kw: solve_plus(self.c, y0, results, **kw)
            if hasattr(g, "solve_plan"):
                self.solve_plan = g.solve_plan

    def __call__(self, y):
        if self._fused is not None:
            return self._fused(y, self.c)
        return self.g(y) + self.c

    def subset(self, idx: torch.Tensor) -> "PlusRows":
        if not is_rowwise(self.g):
            raise TypeError("PlusRows.subset needs a row-wise g (one with a subset(idx) method)")
        return PlusRows(self.g.subset(idx), self.c.index_select(0, idx))
