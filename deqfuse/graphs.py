"""CUDA-graph capture of a DEQFusion layer's two solves (forward fixed point, adjoint fixed point).

At small batches the solves are launch-bound (tens of small kernels per iteration, each costing more
host time than GPU time); one graph replay per solve removes that. Both solves have fixed shapes and
fixed iteration counts and never sync with the host, so they capture whole. Graphs are cached per
(batch, dtype, device); parameters are read in place, so optimizer steps need no re-capture (replacing
a parameter tensor, e.g. by `.to()`, does: call `reset()`).
"""
import torch

from .solvers import SolverStats, solve


def _clone_stats(st: SolverStats) -> SolverStats:
    return SolverStats(st.abs_trace.clone(), st.rel_trace.clone(), st.best_res.clone(), st.nstep.clone(),
                       st.converged.clone(), st.steps, st.tol, st.stop_mode)


def _capture(body):
    """Warm `body` up on a side stream (JIT compiles, cuBLAS handles), then capture it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        body()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        out = body()
    return g, out


class GraphedSolves:
    def __init__(self, layer):
        self.layer = layer
        self.cache = {}

    def reset(self):
        self.cache.clear()

    def _key(self, kind, x):
        ptrs = tuple(p.data_ptr() for p in self.layer.parameters())
        return (kind, x.shape[0], x.dtype, x.device, ptrs)

    def forward(self, x, xf):
        """z* and stats of the forward solve. x: [B, N, D], xf: [B, D] -> ([B, (N+1) D], SolverStats)."""
        layer, B = self.layer, x.shape[0]
        key = self._key("fwd", x)
        if key not in self.cache:
            xs, xfs = x.detach().clone(), xf.detach().clone()

            def body():
                z0 = xs.new_zeros(B, (layer.n + 1) * layer.dim)
                return solve(layer.solver, layer._flat_cell(xs, xfs, B), z0, **layer.f_kw)
            self.cache[key] = (xs, xfs, *_capture(body))
        xs, xfs, g, (z, st) = self.cache[key]
        xs.copy_(x)
        xfs.copy_(xf)
        g.replay()
        return z.clone(), _clone_stats(st)

    def adjoint(self, z_star, x, xf, stats_box=None):
        """grad -> g with g = J^T g + grad at z*, as one graph replay (the fused VJP needs the kernel
        forward's saved tensors, so that forward is inside the graph too)."""
        layer = self.layer
        key = self._key("bwd", x)
        if key not in self.cache:
            zs, xs, xfs = z_star.detach().clone(), x.detach().clone(), xf.detach().clone()
            grad_s = torch.zeros_like(zs)

            def body():
                vjp = layer.saved_vjp(zs, xs, xfs)
                return solve(layer.solver, lambda y: vjp(y) + grad_s, grad_s.clone(), **layer.b_kw)
            self.cache[key] = (zs, xs, xfs, grad_s, *_capture(body))
        zs, xs, xfs, grad_s, g, (out, st) = self.cache[key]
        z_star, x, xf = z_star.detach(), x.detach(), xf.detach()

        def run(grad):
            zs.copy_(z_star)
            xs.copy_(x)
            xfs.copy_(xf)
            grad_s.copy_(grad)
            g.replay()
            if stats_box is not None:
                stats_box[:] = [_clone_stats(st)]
            return out.clone()
        return run
