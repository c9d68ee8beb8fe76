"""The fusion cell as an nn.Module (parameters) plus backend dispatch of its forward and VJP.

Layout: z: [B, N+1, D] (N modality states then the fused state), x: [B, N, D], x_f: [B, D].
"""
import math
import os

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import backend as _backend
from ._validate import check_dim_groups
from .reference.cell import CellParams, cell_forward, cell_vjp


class FusionCell(nn.Module):
    """Parameters of the official DEQ fusion cell for N modalities of width D (GroupNorm(groups, D))."""

    def __init__(self, dim: int, num_modalities: int, groups: int = 4):
        super().__init__()
        check_dim_groups(dim, groups)
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
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
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's default init
        for p in (self.w1, self.w2, self.wg, self.wf, self.b1, self.b2, self.bg, self.bf):
            nn.init.uniform_(p, -bound, bound)

    def params(self) -> CellParams:
        return CellParams(*(getattr(self, f) for f in CellParams._fields))

    def forward(self, z, x, xf, backend: str = "reference", save: bool = False):
        """f(z). z: [B, N+1, D] -> [B, N+1, D]; save=True also returns what vjp() needs."""
        return cell_apply(z, x, xf, self.params(), self.groups, backend, save)

    def vjp(self, gbar, saved, backend: str = "reference"):
        """J^T gbar at the point saved by forward(save=True). gbar: [B, N+1, D]."""
        return cell_vjp_apply(gbar, saved, self.params(), self.groups, backend)

    def bind(self, backend: str, like: torch.Tensor):
        """f(z, x, xf) -> f(z) [b, N+1, D] for a solver loop: the kernel path is chosen once (for tensors
        like `like`) and the parameters are gathered once, so an iteration costs one call of the path
        (the parameters are read in place: optimizer steps between solves are seen). With grad enabled
        it runs the reference (autograd) path, like forward()."""
        p, G = self.params(), self.groups
        path = cell_path(backend, like)
        if path == "reference":
            return lambda z, x, xf: cell_forward(z, x, xf, p, G)
        if path == "ext":
            op, plist = torch.ops.deqfuse.cell_forward.default, list(p)

            def f(z, x, xf):
                if torch.is_grad_enabled():  # unrolled / phantom gradients: the C++ backward
                    return ext_cell_with_grad(z, x, xf, plist, G)[0]
                return op(z, x, xf, plist, G, False)[0]
            return f
        return lambda z, x, xf: cell_apply(z, x, xf, p, G, backend)


def _kernel_ok(backend, device, op):
    return _backend.resolve(backend, device, op) == "triton"


EXT_CELL_DTYPES = (torch.float32, torch.float64)


def cell_path(backend: str, z: torch.Tensor) -> str:
    """Which implementation of the no-grad cell forward serves `backend` for tensors like z:
    'ext' (the compiled C++ op: CPU, float32/float64), 'triton', or 'reference'."""
    b = _backend.resolve(backend, z.device, "cell")
    if b == "cuda":
        return "ext" if z.dtype in EXT_CELL_DTYPES else "reference"
    return b


CELL_GEMMS = ("cublas", "fused")


def cell_gemm(dim: int, groups: int) -> str:
    """Which Triton cell forward and VJP run: 'cublas' (cuBLAS GEMMs + fused row-epilogue kernels: 8
    launches forward, ~12 VJP; the path measured in benchmarks/RESULTS.md) or 'fused' (Triton GEMMs
    with the GroupNorm steps in their epilogues: 5 forward, 6 VJP; needs dim / groups <= 256).
    Chosen by DEQFUSE_CELL_GEMM (default cublas)."""
    want = os.environ.get("DEQFUSE_CELL_GEMM", "cublas")
    if want not in CELL_GEMMS:
        raise ValueError(f"DEQFUSE_CELL_GEMM must be one of {CELL_GEMMS}, got {want!r}")
    from .kernels.cell_fused import fused_supported
    return "fused" if want == "fused" and fused_supported(dim, groups) else "cublas"


class _ExtCell(torch.autograd.Function):
    """The compiled C++ cell forward (save=True) with the C++ backward (gradients of z, x, xf and all 16
    parameters). Outputs: f(z) and the 13 saved tensors (non-differentiable; the adjoint VJP reads them).
    Once differentiable: a double backward (e.g. the Jacobian regulariser's create_graph) raises; the
    layers use the reference path there."""

    @staticmethod
    def forward(ctx, z, x, xf, groups, *params):
        out, saved = torch.ops.deqfuse.cell_forward.default(z, x, xf, list(params), groups, True)
        ctx.save_for_backward(z, *params, *saved)
        ctx.groups, ctx.n_params = groups, len(params)
        ctx.mark_non_differentiable(*saved)
        return (out, *saved)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout, *_):
        z, *rest = ctx.saved_tensors
        params, saved = rest[:ctx.n_params], rest[ctx.n_params:]
        dz, dx, dxf, dp = torch.ops.deqfuse.cell_backward.default(gout.contiguous(), z, list(saved), list(params),
                                                                  ctx.groups)
        return (dz, dx, dxf, None, *dp)


def ext_cell_with_grad(z, x, xf, params, groups: int):
    """f(z) with autograd through the C++ ops (CPU, float32/float64). Returns (out [B, N+1, D], saved list:
    what torch.ops.deqfuse.cell_vjp reads)."""
    if _backend.extension_status()[0] is None:
        raise RuntimeError(f"the C++ cell op is unavailable: {_backend.extension_status()[1]}")
    out, *saved = _ExtCell.apply(z, x, xf, groups, *params)
    return out, saved


def cell_apply(z, x, xf, p: CellParams, groups: int, backend: str = "reference", save: bool = False):
    """Dispatch the cell forward. The kernel paths (Triton, the compiled C++ op) are forward-only (no
    autograd graph): they run inside the no-grad solver loops; with grad enabled the reference path runs
    so parameters get gradients."""
    if torch.is_grad_enabled():
        return cell_forward(z, x, xf, p, groups, save)
    if cell_path(backend, z) == "ext":
        out, saved = torch.ops.deqfuse.cell_forward(z, x, xf, list(p), groups, save)
        return (out, dict(ext=saved)) if save else out
    if not _kernel_ok(backend, z.device, "cell"):
        return cell_forward(z, x, xf, p, groups, save)
    if cell_gemm(z.shape[-1], groups) == "fused":
        from .kernels.cell_fused import cell_forward_fused
        return cell_forward_fused(z, x, xf, p, groups, save)
    from .kernels.cell import cell_forward_triton
    return cell_forward_triton(z, x, xf, p, groups, save)


def cell_vjp_apply(gbar, saved, p: CellParams, groups: int, backend: str = "reference"):
    """J^T gbar from the tensors the forward of the same path saved (the saved dict says which)."""
    if "ext" in saved:
        return torch.ops.deqfuse.cell_vjp(gbar, saved["ext"], list(p), groups)
    if "triton" in saved and _kernel_ok(backend, gbar.device, "cell"):
        if cell_gemm(gbar.shape[-1], groups) == "fused":
            from .kernels.cell_fused import cell_vjp_fused
            return cell_vjp_fused(gbar, saved, p, groups)
        from .kernels.cell import cell_vjp_triton
        return cell_vjp_triton(gbar, saved, p, groups)
    return cell_vjp(gbar, saved, p, groups)
