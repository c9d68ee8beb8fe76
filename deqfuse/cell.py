"""The fusion cell as an nn.Module (parameters) plus backend dispatch of its forward and VJP.

Layout: z: [B, N+1, D] (N modality states then the fused state), x: [B, N, D], x_f: [B, D].
"""
import math
from typing import Optional

import torch
from torch import nn

from . import backend as _backend
from . import profiling
from .precision import no_autocast
from ._validate import check_choice, check_dim_groups, check_int
from .reference.cell import CellParams, cell_forward, cell_vjp
from .rowwise import RowwiseFn, WholeSolve, WholeSolvePlus


class FusionCell(nn.Module):
    """Parameters of the official DEQ fusion cell for N modalities of width D (GroupNorm(groups, D)).
    triton_cell: which Triton cell variant the 'triton' backend runs (TRITON_CELLS; None: 'cublas').
    out_gain: the initial gain of the last
    GroupNorms (GN3_i, GN_f), which scales the state and so the map's contraction (official: 1)."""

    def __init__(self, dim: int, num_modalities: int, groups: int = 4, triton_cell: Optional[str] = None,
                 out_gain: float = 1.0):
        super().__init__()
        check_dim_groups(dim, groups)
        check_int("num_modalities", num_modalities, 1)
        self.triton_cell = resolve_triton_cell(triton_cell, dim, groups)
        self.dim, self.n, self.groups = dim, num_modalities, groups
        N, D = num_modalities, dim
        self.w1, self.w2 = nn.Parameter(torch.empty(N, D, D)), nn.Parameter(torch.empty(N, D, D))
        self.b1, self.b2 = nn.Parameter(torch.empty(N, D)), nn.Parameter(torch.empty(N, D))
        for name in ("gn1", "gn2", "gn3"):
            setattr(self, f"{name}_w", nn.Parameter(torch.ones(N, D)))
            setattr(self, f"{name}_b", nn.Parameter(torch.zeros(N, D)))
        self.wg, self.wf = nn.Parameter(torch.empty(D, D)), nn.Parameter(torch.empty(D, D))
        self.bg, self.bf = nn.Parameter(torch.empty(D)), nn.Parameter(torch.empty(D))
        self.gnf_w, self.gnf_b = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))
        self.out_gain = out_gain
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's default init
        for p in (self.w1, self.w2, self.wg, self.wf, self.b1, self.b2, self.bg, self.bf):
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():
            for p in (self.gn1_w, self.gn2_w):
                p.fill_(1.0)
            for p in (self.gn3_w, self.gnf_w):
                p.fill_(self.out_gain)
            for p in (self.gn1_b, self.gn2_b, self.gn3_b, self.gnf_b):
                p.zero_()

    def params(self) -> CellParams:
        # straight from _parameters (nn.Module.__getattr__ costs ~1 us per name; this runs every forward),
        # unless something moved a parameter out of it (torch.func.functional_call, parametrizations)
        d = self._parameters
        try:
            return CellParams(*(d[f] for f in CellParams._fields))
        except KeyError:
            return CellParams(*(getattr(self, f) for f in CellParams._fields))

    def forward(self, z, x, xf, backend: str = "reference", save: bool = False):
        """f(z). z: [B, N+1, D] -> [B, N+1, D]; save=True also returns what vjp() needs."""
        return cell_apply(z, x, xf, self.params(), self.groups, backend, save, self.triton_cell)

    def vjp(self, gbar, saved, backend: str = "reference"):
        """J^T gbar at the point saved by forward(save=True). gbar: [B, N+1, D]."""
        return cell_vjp_apply(gbar, saved, self.params(), self.groups, backend, self.triton_cell)

    def bind(self, backend: str, like: torch.Tensor, params: Optional[CellParams] = None, path: Optional[str] = None):
        """f(z, x, xf) -> f(z) [b, N+1, D] for a solver loop: the kernel path is chosen once (for tensors
        like `like`) and the parameters are gathered once, so an iteration costs one call of the path
        (the parameters are read in place: optimizer steps between solves are seen). With grad enabled
        it runs the reference (autograd) path, like forward(). params / path: self.params() and
        cell_path(backend, like) when the caller has them already."""
        p = self.params() if params is None else params
        G, variant = self.groups, self.triton_cell
        path = cell_path(backend, like) if path is None else path
        if path == "reference":
            f = lambda z, x, xf: cell_forward(z, x, xf, p, G)  # noqa: E731
        elif path == "ext":
            op, plist = torch.ops.deqfuse.cell_forward.default, list(p)

            def f(z, x, xf):
                if torch.is_grad_enabled():  # unrolled / phantom gradients: the C++ backward
                    return ext_cell_with_grad(z, x, xf, plist, G)[0]
                return op(z, x, xf, plist, G, False)[0]
        else:
            f = lambda z, x, xf: cell_apply(z, x, xf, p, G, backend, triton_cell=variant)  # noqa: E731
        return profiling.wrap(f, f"cell_forward[{path}]")


class ExtCellRows(RowwiseFn, WholeSolve):
    """f(z) = fn(z, x, xf) on flat states [b, (N+1) D] served by the C++ cell op (a RowwiseFn), plus its
    compiled whole Anderson solve (torch.ops.deqfuse.anderson_cell_solve, csrc/solve_cpu.cpp), which the
    solver runs instead of its per-iteration loop where the registry selects it (solvers.whole_solve).
    params: the 16 cell parameter tensors (read in place), groups: GroupNorm groups."""

    def __init__(self, fn, x, xf, params, groups: int):
        super().__init__(fn, x, xf)
        self.params, self.groups = params, groups

    def subset(self, idx: torch.Tensor) -> "ExtCellRows":
        x, xf = (t.index_select(0, idx) for t in self.inputs)
        return ExtCellRows(self.fn, x, xf, self.params, self.groups)

    def solve_plan(self) -> str:
        return ext_solve_plan(self.params, self.groups, self.inputs[0].shape[0])

    def anderson_solve(self, z0, results, *, m, beta, lam, tol, stop_rel, max_iter):
        x, xf = self.inputs
        return torch.ops.deqfuse.anderson_cell_solve(z0, x, xf, self.params, self.groups, *results.buffers(), m, beta,
                                                     lam, tol, stop_rel, max_iter)


def cell_rows(fn, x, xf, params: CellParams, groups: int, path: str) -> RowwiseFn:
    """The solver's map z [b, (N+1) D] -> fn(z, x, xf) over the rows of x [b, N, D], xf [b, D], on the cell
    path `path` (cell_path): with the C++ cell's compiled whole solve on the 'ext' path."""
    return ExtCellRows(fn, x, xf, list(params), groups) if path == "ext" else RowwiseFn(fn, x, xf)


def ext_solve_plan(params, groups: int, batch: int = 0) -> str:
    """SolverStats.plan of the C++ whole solves of a cell with these parameters (w1 [N, D, D] first) on
    `batch` samples."""
    return "C++ whole solve: " + _backend.cpu_plan(params[0].shape[-1], groups, params[0].dtype, batch)


def ext_vjp_anderson_solve(saved, params, groups: int, add, g0, results, *, m, beta, lam, tol, stop_rel, max_iter):
    """The adjoint fixed point g = J^T g + add solved by one compiled call (torch.ops.deqfuse.
    anderson_vjp_solve) from the C++ cell's saved tensors; results: a solvers.Results, updated in place."""
    return torch.ops.deqfuse.anderson_vjp_solve(g0, add, saved, params, groups, *results.buffers(), m, beta, lam, tol,
                                                stop_rel, max_iter)


def cell_path(backend: str, z: torch.Tensor) -> str:
    """Which implementation of the no-grad cell forward serves `backend` for tensors like z: 'ext' (the
    compiled C++ op: CPU, float32/float64), 'triton' (a Triton variant, TRITON_CELLS), or 'reference'."""
    b = _backend.select("cell", backend, z.device, z.dtype)
    return "ext" if b == "cuda" else b


# The two Triton cell variants (one name each, everywhere): 'cublas' = cuBLAS GEMMs + fused row-epilogue
# kernels (kernels/cell.py); 'fused' = Triton GEMMs with the GroupNorm steps in their epilogues
# (kernels/cell_fused.py; needs dim / groups <= 256). Both VJPs read either forward's saved tensors.
TRITON_CELLS = ("cublas", "fused")
FUSED_MAX_GROUP_WIDTH = 256  # kernels/cell_fused.py: a program holds a whole GroupNorm group in registers


DEFAULT_TRITON_CELL = "cublas"  # takes every width


def resolve_triton_cell(variant: Optional[str], dim: int, groups: int) -> str:
    """The variant for a cell of width dim (None: DEFAULT_TRITON_CELL); 'fused' beyond its group width raises."""
    if variant is None:
        return DEFAULT_TRITON_CELL
    check_choice("triton_cell", variant, TRITON_CELLS)
    if variant == "fused" and dim // groups > FUSED_MAX_GROUP_WIDTH:
        raise ValueError(f"triton_cell='fused' needs dim / groups <= {FUSED_MAX_GROUP_WIDTH}, got {dim // groups}")
    return variant


class _ExtCell(torch.autograd.Function):
    """The compiled C++ cell forward (save=True) with the C++ backward (gradients of z, x, xf and all 16
    parameters). Output: f(z), the one differentiable output; the 13 saved tensors (what the adjoint VJP
    reads) go to the caller through `box` (a list, extended in place), not as outputs: 13 more outputs
    of an autograd Function cost ~40 us of autograd bookkeeping per call (at B=128, D=64 a quarter of
    the op). Twice differentiable: a backward with create_graph=True (a second-order gradient through
    grad='unrolled' / 'phantom') recomputes the cell by the reference path and differentiates that."""

    @staticmethod
    def forward(ctx, z, x, xf, groups, box, *params):
        out, saved = torch.ops.deqfuse.cell_forward.default(z, x, xf, list(params), groups, True)
        ctx.save_for_backward(z, x, xf, *params, *saved)
        ctx.groups, ctx.n_params = groups, len(params)
        box.extend(saved)
        return out

    @staticmethod
    def backward(ctx, gout):
        z, x, xf, *rest = ctx.saved_tensors
        params, saved = rest[:ctx.n_params], rest[ctx.n_params:]
        if torch.is_grad_enabled():  # create_graph=True: a graph of the reference cell's backward
            # recomputed from aliases (views) of the inputs: the inner grad stops at them (through z's own
            # history it would reach x and the parameters again), and the result stays differentiable
            every = [z, x, xf, *params]
            alias = [t.view_as(t) if t.requires_grad else t for t in every]
            out = cell_forward(*alias[:3], CellParams(*alias[3:]), ctx.groups)
            need = [a for a, t in zip(alias, every) if t.requires_grad]
            got = iter(torch.autograd.grad(out, need, gout, create_graph=True, allow_unused=True) if need else ())
            grads = [next(got) if t.requires_grad else None for t in every]
            return (*grads[:3], None, None, *grads[3:])
        dz, dx, dxf, dp = torch.ops.deqfuse.cell_backward.default(gout.contiguous(), z, list(saved), list(params),
                                                                  ctx.groups)
        return (dz, dx, dxf, None, None, *dp)


def ext_cell_with_grad(z, x, xf, params, groups: int):
    """f(z) with autograd through the C++ ops (CPU, float32/float64). Returns (out [B, N+1, D], saved list:
    what torch.ops.deqfuse.cell_vjp reads)."""
    if not _backend.ext_has(torch.device("cpu")):  # a constant under torch.compile (no pybind call)
        raise RuntimeError(f"the C++ cell op is unavailable: {_backend.extension_status()[1]}")
    saved = []
    out = _ExtCell.apply(z, x, xf, groups, saved, *params)
    return out, saved


class _ExtJacLoss(torch.autograd.Function):
    """The Hutchinson Jacobian loss sum_k ||J^T v_k||^2 / (n numel) at a C++ forward's saved point, with
    its gradient w.r.t. x, xf and the 16 parameters from torch.ops.deqfuse.cell_jac_backward (exact, ReLU
    masks fixed: what autograd's double backward through the reference cell gives, without its graph of
    small ops). vs: [n, B, N+1, D] probes; z: the point [B, N+1, D] (not differentiated: the layers pass
    a detached fixed point). Once differentiable: a backward with create_graph=True raises."""

    @staticmethod
    def forward(ctx, vs, z, x, xf, groups, saved, *params):
        vjp, plist = torch.ops.deqfuse.cell_vjp.default, list(params)
        ws = [vjp(v, saved, plist, groups) for v in vs]
        scale = 1.0 / (len(ws) * z.numel())
        ctx.save_for_backward(vs, z, *params, *ws, *saved)
        ctx.groups, ctx.n_params, ctx.n_ws, ctx.scale = groups, len(params), len(ws), scale
        return torch.stack([w.square().sum() for w in ws]).sum() * scale

    @staticmethod
    def backward(ctx, gloss):
        if torch.is_grad_enabled():
            raise RuntimeError("the Jacobian loss (jac_reg) on the C++ CPU cell is differentiable once; a "
                               "create_graph=True backward through it needs backend='reference'")
        vs, z, *rest = ctx.saved_tensors
        params, ws, saved = (rest[:ctx.n_params], rest[ctx.n_params:ctx.n_params + ctx.n_ws],
                             rest[ctx.n_params + ctx.n_ws:])
        op, c = torch.ops.deqfuse.cell_jac_backward.default, 2 * ctx.scale * gloss
        dx = dxf = dp = None
        for v, w in zip(vs, ws):
            _, gx, gxf, gp = op(v, w * c, z, list(saved), list(params), ctx.groups)
            dx, dxf = (gx, gxf) if dx is None else (dx + gx, dxf + gxf)
            dp = gp if dp is None else [a + b for a, b in zip(dp, gp)]
        return (None, None, dx, dxf, None, None, *dp)


def ext_jacobian_reg(z, x, xf, params, groups: int, saved, n_samples: int = 1):
    """implicit.jacobian_reg through the C++ ops: Hutchinson ||J||_F^2 / numel(z) with J = df/dz at z
    ([B, N+1, D], detached), from the tensors a C++ cell_forward(save=True) at z saved. The probes are
    drawn as jacobian_reg draws them (randn of z's flat shape, one after another), so both give the same
    estimate from the same RNG state. Differentiable once, w.r.t. x, xf and params."""
    vs = torch.stack([torch.randn_like(z.reshape(z.shape[0], -1)) for _ in range(n_samples)]).view(n_samples, *z.shape)
    return _ExtJacLoss.apply(vs, z.detach(), x, xf, groups, list(saved), *params)


def cell_apply(z, x, xf, p: CellParams, groups: int, backend: str = "reference", save: bool = False,
               triton_cell: str = "cublas"):
    """Dispatch the cell forward (the one place that maps a backend to a cell implementation). The
    kernel paths (Triton, the compiled C++ op) are forward-only (no autograd graph): they run inside the
    no-grad solver loops; with grad enabled the reference path runs so parameters get gradients."""
    if torch.is_grad_enabled():
        return cell_forward(z, x, xf, p, groups, save)
    path = cell_path(backend, z)
    if path == "ext":
        out, saved = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), groups, save)
        return (out, dict(ext=saved)) if save else out
    if path == "reference":
        return cell_forward(z, x, xf, p, groups, save)
    with no_autocast(z):  # the kernel paths compute in their inputs' dtype (DEQFusion: mixed precision)
        if triton_cell == "fused":
            from .kernels.cell_fused import cell_forward_fused
            return cell_forward_fused(z, x, xf, p, groups, save)
        from .kernels.cell import cell_forward_triton
        return cell_forward_triton(z, x, xf, p, groups, save)


def cell_vjp_apply(gbar, saved, p: CellParams, groups: int, backend: str = "reference", triton_cell: str = "cublas"):
    """J^T gbar from the tensors the forward of the same path saved (the saved dict says which)."""
    if "ext" in saved:
        return torch.ops.deqfuse.cell_vjp(gbar, saved["ext"], list(p), groups)
    if "triton" in saved and cell_path(backend, gbar) == "triton":
        with no_autocast(gbar):
            if triton_cell == "fused":
                from .kernels.cell_fused import cell_vjp_fused
                return cell_vjp_fused(gbar, saved, p, groups)
            from .kernels.cell import cell_vjp_triton
            return cell_vjp_triton(gbar, saved, p, groups)
    return cell_vjp(gbar, saved, p, groups)


def cell_with_grad(cell: FusionCell, zs, x, xf, path: str, jac_reg: int = 0):
    """At a fixed point zs [B, N+1, D] (detached), for the cell path `path` (cell_path): (f(zs) with autograd
    to x, xf and the parameters; what the adjoint's VJP can reuse (a saved dict for saved_vjp, or None where
    the VJP kernels need their own forward: the Triton paths); the Jacobian loss with jac_reg probes, None for
    0). On the 'ext' path by the C++ ops (its backward exact; the loss once differentiable); else by the
    reference cell's autograd (double-differentiable: the loss needs create_graph)."""
    if path == "ext":
        p = list(cell.params())
        fz, ext_saved = ext_cell_with_grad(zs, x, xf, p, cell.groups)
        jac = ext_jacobian_reg(zs, x, xf, p, cell.groups, ext_saved, jac_reg) if jac_reg else None
        return fz, dict(ext=ext_saved), jac
    from .implicit import jacobian_reg
    zs = zs.requires_grad_(jac_reg > 0)
    fz, saved = cell(zs, x, xf, "reference", save=True)
    jac = jacobian_reg(fz, zs, jac_reg) if jac_reg else None
    if path != "reference":
        return fz, None, jac
    return fz, {k: (tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach()) for k, v in saved.items()}, jac


def cell_jacobian_loss(cell: FusionCell, zs, x, xf, path: str, jac_reg: int):
    """The Hutchinson Jacobian loss (jac_reg probes) at zs [B, N+1, D] (detached) alone, on `path` as
    cell_with_grad (the 'ext' path saves its point with one no-grad C++ forward)."""
    if path == "ext":
        p = list(cell.params())
        with torch.no_grad():
            saved = torch.ops.deqfuse.cell_forward.default(zs, x.detach(), xf.detach(), p, cell.groups, True)[1]
        return ext_jacobian_reg(zs, x, xf, p, cell.groups, saved, jac_reg)
    return cell_with_grad(cell, zs.detach(), x, xf, "reference", jac_reg)[2]


class SavedVJP:
    """g [b, L] -> J^T g at z* for a block of b rows (z* [b, L], x [b, N, D], xf [b, D], all detached),
    from the tensors one forward of the cell's `backend` path saved (saved_vjp makes them). Row-wise:
    subset(idx) re-saves on those rows only (one cell forward of len(idx) rows), so the adjoint solve can
    shrink its batch like the forward solve. The parameters are gathered once (read in place)."""

    def __init__(self, cell: FusionCell, backend: str, z_star, x, xf, saved: dict):
        self.cell, self.backend, self.z, self.x, self.xf = cell, backend, z_star, x, xf
        self.saved, self.params = saved, cell.params()
        self._versions = [t._version for t in self.params]
        if profiling.enabled():
            self._apply = profiling.wrap(self._apply, "cell_vjp")

    def _shaped(self, t):
        return t.view(t.shape[0], self.cell.n + 1, self.cell.dim)

    def check_versions(self):
        """Raise as autograd does if a parameter was changed in place since the forward saved this point
        (the VJP reads the parameters themselves)."""
        for name, t, v in zip(type(self.params)._fields, self.params, self._versions):
            if t._version != v:
                raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an "
                                   f"inplace operation: DEQFusion's parameter cell.{name} is at version {t._version}; "
                                   f"expected version {v} (the forward's). Step the optimiser after backward()")

    def __call__(self, g):
        return self._apply(g)

    def _apply(self, g):
        return cell_vjp_apply(self._shaped(g), self.saved, self.params, self.cell.groups, self.backend,
                              self.cell.triton_cell).reshape(g.shape[0], -1)

    def subset(self, idx):
        return saved_vjp(self.cell, self.backend, *(t.index_select(0, idx) for t in (self.z, self.x, self.xf)))


class ExtSavedVJP(SavedVJP, WholeSolvePlus):
    """SavedVJP on the C++ cell's saved tensors: torch.ops.deqfuse.cell_vjp adds the adjoint's right-hand
    side in its own epilogue (call_plus), and the adjoint fixed point has a compiled whole solve
    (torch.ops.deqfuse.anderson_vjp_solve)."""

    def __init__(self, *args):
        super().__init__(*args)
        op, self._plist = torch.ops.deqfuse.cell_vjp.default, list(self.params)
        ext, G = self.saved["ext"], self.cell.groups
        self._ext = profiling.wrap(lambda g, c: op(self._shaped(g), ext, self._plist, G,
                                                   None if c is None else self._shaped(c)).view(g.shape[0], -1),
                                   "cell_vjp[ext]")

    def __call__(self, g):
        return self._ext(g, None)

    def call_plus(self, y, c):
        return self._ext(y, c)

    def anderson_solve_plus(self, c, y0, results, **kw):
        return ext_vjp_anderson_solve(self.saved["ext"], self._plist, self.cell.groups, c, y0, results, **kw)

    def solve_plan(self) -> str:
        return ext_solve_plan(self._plist, self.cell.groups, self.z.shape[0])


def saved_vjp(cell: FusionCell, backend: str, z_star, x, xf, saved: Optional[dict] = None) -> SavedVJP:
    """The VJP at z* [b, L] (detached) from what a forward of `backend`'s path saved there (saved: one
    forward's saved dict, reused; None: one no-grad forward saves it here)."""
    if saved is None:
        with torch.no_grad():
            _, saved = cell(z_star.view(z_star.shape[0], cell.n + 1, cell.dim), x, xf, backend, save=True)
    return (ExtSavedVJP if "ext" in saved else SavedVJP)(cell, backend, z_star, x, xf, saved)
