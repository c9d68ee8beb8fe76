"""CUDA-graph capture of a DEQFusion layer's two solves (forward fixed point, adjoint fixed point),
chunked so that graphed solves stop early too.

At small batches the solves are launch-bound (tens of small kernels per iteration, each costing more
host time than GPU time); graph replays remove that. A solve of `max_iter` steps is captured as a
sequence of graphs of `chunk` steps each (chunk = the solver's early-exit interval,
solvers.resolve_check_every; check_every=0 gives one graph of max_iter steps and no host sync).
A solve replays the chunk graphs in order and syncs once after each to ask whether every sample has
converged, so it stops at the first chunk boundary after the last sample converged. The first chunk
graph also holds the prologue: the reset of the solver state from the static inputs and, for the
adjoint, the kernel forward that saves what the VJP reads. Shapes are fixed: graphed solves exit early
but do not compact their batch (eager solves do).

Graphs are cached per (kind, batch, dtype, device, parameter pointers); parameters are read in place,
so optimizer steps need no re-capture (replacing a parameter tensor, e.g. by `.to()`, does: `reset()`).
"""
from typing import Callable, List

import torch

from .implicit import check_converged
from .rowwise import plus_rows
from .solvers import STATES, SolverStats, resolve_check_every

DRIVER_KEYS = ("check_every", "compact")  # solver options of the driver, not of the state


def cuda_capture(bodies: List[Callable]) -> List[Callable]:
    """Capture each body() in its own CUDA graph (one shared memory pool: they replay in order) after
    one warm-up pass over all of them on a side stream (JIT compiles, cuBLAS workspaces). Returns the
    replay functions."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for body in bodies:
            body()
    torch.cuda.current_stream().wait_stream(s)
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for body in bodies:
        g = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(g, pool=pool):
            body()
        graphs.append(g)
    return [g.replay for g in graphs]


class ChunkedSolve:
    """One solve as replayable chunks of steps over a fixed solver state.

    state: a solvers._State whose buffers persist across replays; prologue() -> f resets the state
    (in place) and returns the map to iterate (built from static buffers). capture: list of bodies ->
    list of replays (cuda_capture; tests pass an eager stand-in to check the chunk logic on the CPU).
    """

    def __init__(self, state, prologue: Callable, max_iter: int, chunk: int, capture=cuda_capture):
        self.state, self.prologue, self.max_iter = state, prologue, max_iter
        self.bounds = [(k0, min(k0 + chunk, max_iter)) for k0 in range(0, max_iter, chunk)]
        self.f = None
        self.replays = capture([self._body(j) for j in range(len(self.bounds))])

    def _body(self, j):
        def body():
            if j == 0:
                self.f = self.prologue()
            for k in range(*self.bounds[j]):
                self.state.iterate(self.f, k)
        return body

    def run(self) -> int:
        """Replay chunks until every sample converged or max_iter; returns the steps run."""
        steps = 0
        for replay, (_, k1) in zip(self.replays, self.bounds):
            replay()
            steps = k1
            if k1 < self.max_iter and bool(self.state.res.converged.all()):  # one host sync per chunk
                break
        return steps

    def stats(self, steps: int, tol: float, stop_mode: str) -> SolverStats:
        r = self.state.res  # cloned: the next replay overwrites these buffers
        return SolverStats(r.abs_trace[:steps].clone(), r.rel_trace[:steps].clone(), r.best_res.clone(),
                           r.nstep.clone(), r.converged.clone(), steps, tol, stop_mode,
                           rows=self.state.batch * steps, plan="CUDA graph replay")


def _solve_parts(solver: str, kw: dict, x0):
    """(state over x0, chunk length) for a solver's keyword options (the layer's f_kw / b_kw)."""
    state_kw = {k: v for k, v in kw.items() if k not in DRIVER_KEYS}
    ce = resolve_check_every(kw.get("check_every"), x0)
    return STATES[solver](x0, **state_kw), ce or kw["max_iter"]


class GraphedSolves:
    def __init__(self, layer, capture=cuda_capture):
        self.layer, self.capture = layer, capture
        self.cache = {}

    def reset(self):
        self.cache.clear()

    def _key(self, kind, x):
        """One capture per (solve, batch size, dtype, device, parameter storage, autocast state): a graph
        bakes in the GEMM precision autocast chose and the tolerance that follows from it."""
        ptrs = tuple(p.data_ptr() for p in self.layer.parameters())
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return (kind, x.shape[0], x.dtype, x.device, ptrs, amp)

    def _chunked(self, kw, x0, prologue):
        state, chunk = _solve_parts(self.layer.solver, kw, x0)
        return ChunkedSolve(state, lambda: prologue(state), kw["max_iter"], chunk, self.capture)

    def forward(self, x, xf):
        """z* and stats of the forward solve. x: [B, N, D], xf: [B, D] -> ([B, (N+1) D], SolverStats)."""
        layer, B = self.layer, x.shape[0]
        key = self._key("fwd", x)
        if key not in self.cache:
            xs, xfs = x.detach().clone(), xf.detach().clone()
            z0 = xs.new_zeros(B, (layer.n + 1) * layer.dim)

            def prologue(state):
                state.reset(z0)
                return layer._flat_cell(xs, xfs)
            self.cache[key] = (xs, xfs, self._chunked(layer._solve_kw(0, x), z0, prologue))
        xs, xfs, cs = self.cache[key]
        xs.copy_(x)
        xfs.copy_(xf)
        steps = cs.run()
        kw = layer._solve_kw(0, x)
        return cs.state.res.best_x.clone(), cs.stats(steps, kw["tol"], kw["stop_mode"])

    def adjoint(self, z_star, x, xf, stats_box=None, on_nonconvergence: str = "ignore"):
        """grad -> g with g = J^T g + grad at z*, as chunk replays of implicit.adjoint_solver's form y = J^T y +
        J^T grad, g = y + grad (the fused VJP needs the kernel forward's saved tensors, so that forward and
        c = J^T grad are inside the first chunk's graph)."""
        layer = self.layer
        key = self._key("bwd", x)
        if key not in self.cache:
            zs, xs, xfs = z_star.detach().clone(), x.detach().clone(), xf.detach().clone()
            grad_s = torch.zeros_like(zs)
            c_s = torch.zeros_like(zs)

            def prologue(state):
                vjp = layer.saved_vjp(zs, xs, xfs)
                c_s.copy_(vjp(grad_s))
                state.reset(c_s)
                return plus_rows(vjp, c_s)
            self.cache[key] = (zs, xs, xfs, grad_s, self._chunked(layer._solve_kw(1, x), c_s, prologue))
        zs, xs, xfs, grad_s, cs = self.cache[key]
        z_star, x, xf = z_star.detach(), x.detach(), xf.detach()
        kw = layer._solve_kw(1, x)

        def run(grad):
            zs.copy_(z_star)
            xs.copy_(x)
            xfs.copy_(xf)
            grad_s.copy_(grad)
            steps = cs.run()
            st = cs.stats(steps, kw["tol"], kw["stop_mode"])
            if stats_box is not None:
                stats_box[:] = [st]
            check_converged(st, on_nonconvergence, "DEQFusion adjoint (backward) solve", "b_tol", "b_max_iter",
                            kw["max_iter"])
            return cs.state.res.best_x + grad
        return run
