"""DEQFusion: the deep-equilibrium multimodal fusion layer (Ni et al.), and its unrolled ablation."""
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import profiling
from .cell import (ExtCellRows, FusionCell, cell_path, cell_vjp_apply, ext_cell_with_grad, ext_jacobian_reg,
                   ext_vjp_anderson_solve)
from .graphs import GraphedSolves
from .implicit import ImplicitAdjoint, implicit_grad, jacobian_reg, phantom_grad, warn_if_not_converged
from .reference.cell import fuse_inputs
from .rowwise import RowwiseFn
from ._validate import (check_bool, check_choice, check_feature_values, check_features, check_float, check_int,
                        host_sync_allowed)
from .backend import BACKENDS, resolve
from .solvers import SOLVERS, SolverStats, check_options, solve, solver_options

# solver options the layer sets itself (from its own arguments), so solver_kw must not
_LAYER_SET = {"max_iter": "f_max_iter / b_max_iter", "tol": "f_tol / b_tol", "stop_mode": "stop_mode",
              "backend": "backend"}


@dataclass
class DEQInfo:
    forward_stats: Optional[SolverStats]
    jac_loss: torch.Tensor
    backward_stats: list  # filled by the backward pass (implicit mode): [SolverStats]


DEFAULT_TOL = 1e-4        # f_tol / b_tol left as None, float32/float64 solves
LOW_PRECISION_TOL = 1e-3  # ... under torch.autocast or with bf16/fp16 parameters


class DEQFusion(nn.Module):
    """Fuse N modality features [B, D] into one [B, D] at the joint fixed point z* = f(z*, x).

    Args:
      dim, num_modalities, groups: width D, N, GroupNorm groups (D % groups == 0).
      solver: 'anderson' | 'broyden' | 'fixed_point' for both the forward and the adjoint solve.
      f_max_iter/b_max_iter, f_tol/b_tol: limits of the forward / adjoint solve. Tolerances default
        (None) to DEFAULT_TOL = 1e-4 for float32/64 solves and LOW_PRECISION_TOL = 1e-3 for a forward
        under torch.autocast or a module cast to bf16/fp16 (chosen from the training-gradient error
        against cost on BRCA, benchmarks/grad_accuracy.py and RESULTS.md: 1e-3 -> 1e-4 takes the
        gradient error from 0.4-1.3% to 0.03-0.07% for +17-22% time; a bf16/fp16 solve cannot reach 1e-4).
      stop_mode, b_stop_mode: residual of the forward / adjoint stopping rule ('rel' or 'abs'). The
        adjoint's is relative by default: its right-hand side is the incoming gradient, whose scale is
        the loss's, so an absolute rule would make the gradient depend on how the loss is scaled.
      grad: 'implicit' (adjoint fixed point) | 'phantom' (k damped steps) | 'unrolled' (no solve:
        `unrolled_steps` weight-tied applications with full backprop; the paper's ablation).
      jac_reg: Hutchinson samples for the Jacobian-norm loss in training (0 = off; info.jac_loss), taken at
        the fixed point (grad='implicit' or 'phantom'; 'unrolled' has none and raises). On the C++ CPU path
        its gradient is one exact op (cell_jac_backward), else autograd's double backward.
      backend: 'auto' | 'triton' | 'cuda' | 'reference' for the kernels used inside the solves.
      solver_kw: further options of the solver, for both solves (e.g. m, lam, beta for Anderson;
        check_every / compact for adaptive compute: by default a solve stops once every sample has
        converged and shrinks its batch to the unconverged samples, see deqfuse/solvers.py).
      on_nonconvergence: 'warn' (one host sync per forward) | 'ignore' (read info.forward_stats).
      triton_cell: Triton cell variant of the 'triton' backend: 'cublas' | 'fused' (deqfuse.cell.TRITON_CELLS;
        None: DEQFUSE_CELL_GEMM or 'cublas').
      cuda_graph: on CUDA, run each solve (forward, and the adjoint in training) as one CUDA-graph
        replay, captured on first use per batch size (see graphs.py; needs grad='implicit' to graph
        the backward). The biggest win at small batches, where the solves are launch-bound.
    forward(features) -> [B, D]; with return_info=True -> ([B, D], DEQInfo).

    Mixed precision (torch.autocast): only the cell's GEMMs run in the autocast dtype, and only where the
    cell goes through ATen (backend='reference', the Triton cell); the C++ CPU cell op computes in the
    parameters' dtype regardless. Everything a solve accumulates stays in the parameters' dtype (keep
    them float32): features that an autocast layer produced in bf16/fp16 are cast up, the fused input,
    the iterate, the Anderson histories (unless solver_kw=dict(history_dtype=...)), the Gram matrices
    and mixing solves, norms, residuals and tolerances; the adjoint solve runs in backward(), outside
    autocast. Low-precision GEMMs put a floor under the residual (about 2e-4 relative at B=32, D=64),
    so the default tolerance there is LOW_PRECISION_TOL = 1e-3 (an explicit f_tol should be >= 5e-4).
    Measured against float64 (tests/test_training_stack.py): outputs within 1.2x and gradients within
    0.8x of PyTorch's own error in the same precision.
    A module cast to bf16/fp16 keeps its solver state in that dtype too (f_tol >= 3e-3 for bf16).
    """

    def __init__(self, dim: int, num_modalities: int, groups: int = 4, solver: str = "anderson",
                 f_max_iter: int = 55, b_max_iter: int = 56, f_tol: Optional[float] = None,
                 b_tol: Optional[float] = None,
                 stop_mode: str = "rel", grad: str = "implicit", phantom_steps: int = 5,
                 phantom_lam: float = 0.8, unrolled_steps: int = 6, jac_reg: int = 0,
                 backend: str = "auto", solver_kw: Optional[dict] = None,
                 on_nonconvergence: str = "warn", cuda_graph: bool = False, b_stop_mode: str = "rel",
                 triton_cell: Optional[str] = None):
        super().__init__()
        # every argument is checked here, with the argument's own name in the message
        check_choice("grad", grad, ("implicit", "phantom", "unrolled"))
        check_choice("on_nonconvergence", on_nonconvergence, ("warn", "ignore"))
        check_choice("solver", solver, sorted(SOLVERS))
        check_choice("backend", backend, BACKENDS)
        check_int("num_modalities", num_modalities, 1)
        check_int("phantom_steps", phantom_steps, 1)
        check_float("phantom_lam", phantom_lam, 0, 1, lo_open=True)
        check_int("unrolled_steps", unrolled_steps, 1)
        check_int("jac_reg", jac_reg, 0)
        if jac_reg > 0 and grad == "unrolled":
            raise ValueError("jac_reg: the Jacobian loss is taken at the fixed point, and grad='unrolled' solves for "
                             "none; use grad='implicit' or 'phantom' with it")
        check_bool("cuda_graph", cuda_graph)
        if solver_kw is not None and not isinstance(solver_kw, dict):
            raise ValueError(f"solver_kw must be a dict of solver options, got {type(solver_kw).__name__}")
        kw = dict(solver_kw or {})
        for k in kw:
            if k in _LAYER_SET:
                raise ValueError(f"solver_kw[{k!r}]: set it with DEQFusion's {_LAYER_SET[k]} argument")
            if k not in solver_options(solver):
                raise ValueError(f"solver_kw[{k!r}]: not an option of solver {solver!r} "
                                 f"(options: {sorted(solver_options(solver) - set(_LAYER_SET))})")
        check_options(solver, {k: f"solver_kw[{k!r}]" for k in kw}, **kw)
        self._tol_defaulted = (f_tol is None, b_tol is None)  # resolved per forward by precision
        f_tol = DEFAULT_TOL if f_tol is None else f_tol
        b_tol = DEFAULT_TOL if b_tol is None else b_tol
        check_options(solver, dict(max_iter="f_max_iter", tol="f_tol", stop_mode="stop_mode"),
                      max_iter=f_max_iter, tol=f_tol, stop_mode=stop_mode)
        check_options(solver, dict(max_iter="b_max_iter", tol="b_tol", stop_mode="b_stop_mode"),
                      max_iter=b_max_iter, tol=b_tol, stop_mode=b_stop_mode)
        self.cell = FusionCell(dim, num_modalities, groups, triton_cell)
        self.dim, self.n = dim, num_modalities
        self.weights = nn.Parameter(torch.ones(num_modalities))  # x_f = sum_i w_i x_i + b
        self.bias = nn.Parameter(torch.zeros(1))
        self.solver, self.grad, self.backend = solver, grad, backend
        self.f_kw = dict(max_iter=f_max_iter, tol=f_tol, stop_mode=stop_mode, **kw)
        self.b_kw = dict(max_iter=b_max_iter, tol=b_tol, stop_mode=b_stop_mode, **kw)
        if solver == "anderson":
            self.f_kw["backend"] = self.b_kw["backend"] = backend
        self.phantom_steps, self.phantom_lam = phantom_steps, phantom_lam
        self.unrolled_steps, self.jac_reg = unrolled_steps, jac_reg
        self.on_nonconvergence = on_nonconvergence
        if cuda_graph and solver == "anderson_official":
            raise ValueError("cuda_graph=True needs a graph-capturable solver; 'anderson_official' syncs every step")
        self.cuda_graph = cuda_graph
        self.adjoint_init = "zeros" if solver == "anderson_official" else "grad"
        self._graphs = GraphedSolves(self)
        self.info: Optional[DEQInfo] = None

    def __getstate__(self):
        """Copies and pickles leave out the transient state: info (graph-attached tensors of the last
        forward) and the CUDA-graph cache (re-captured on first use)."""
        state = self.__dict__.copy()
        state["info"], state["_graphs"] = None, None
        return state

    def __setstate__(self, state):
        state.setdefault("_tol_defaulted", (False, False))  # pickled by an older version: tolerances as given
        super().__setstate__(state)
        self._graphs = GraphedSolves(self)

    def _flat_cell(self, x, xf):
        """f as a row-wise map of flat states [b, (N+1) D] (the solvers may evaluate it on a subset of
        rows); the kernel path and the parameters are bound once per solve."""
        p, path = self.cell.params(), cell_path(self.backend, x)
        fn, shape = self.cell.bind(self.backend, x, p, path), (self.n + 1, self.dim)

        def rows(z, x, xf):
            # under torch.autocast the cell's GEMMs may return a lower precision: the solver state keeps
            # the features' dtype (see "Mixed precision" in the class docstring)
            return fn(z.view(z.shape[0], *shape), x, xf).view(z.shape[0], -1).to(z.dtype)
        if path == "ext":  # the C++ cell: its whole Anderson solve is one call
            return ExtCellRows(rows, x, xf, list(p), self.cell.groups)
        return RowwiseFn(rows, x, xf)

    def forward(self, features, return_info: bool = False):
        B = check_features(features, self.n, self.dim, self.weights, check_finite=False)
        x = torch.stack(list(features), 1)  # [B, N, D]
        if x.dtype != self.weights.dtype:  # autocast outputs cast up
            x = x.to(self.weights.dtype)
        if host_sync_allowed(x):  # finite and within range: one reduction over the stacked features
            check_feature_values(x.detach(), self.weights.dtype)
        xf = fuse_inputs(x, self.weights, self.bias)         # [B, D]
        f = self._flat_cell(x, xf)
        z0 = x.new_zeros(B, (self.n + 1) * self.dim)
        jac = None
        fstats, bstats = None, []
        if self.grad == "unrolled":
            z = z0
            for _ in range(self.unrolled_steps):
                z = f(z)
        else:
            graphed = self.cuda_graph and x.is_cuda
            with profiling.range("forward_solve"):
                if graphed:
                    z_star, fstats = self._graphs.forward(x, xf)
                else:
                    with torch.no_grad():
                        z_star, fstats = solve(self.solver, f, z0, **self._solve_kw(0, x))
            # a host sync: skipped while a CUDA graph is captured and under torch.compile (read
            # info.forward_stats there)
            if self.on_nonconvergence == "warn" and host_sync_allowed(z0):
                warn_if_not_converged(fstats, "DEQFusion forward solve", "f_tol")
            z = z_star
            if self.training and torch.is_grad_enabled():
                with profiling.range("attach_grad"):
                    z, jac = self._attach_grad(z_star, x, xf, B, bstats, graphed, isinstance(f, ExtCellRows))
        # (object.__setattr__: nn.Module's costs ~3 us a forward; info is a plain attribute)
        object.__setattr__(self, "info", DEQInfo(fstats, x.new_zeros(()) if jac is None else jac, bstats))
        out = z.narrow(1, self.n * self.dim, self.dim).contiguous()  # the fused state [B, D]; not a view: FSDP2
        # hooks, in-place safe
        return (out, self.info) if return_info else out

    def _solve_kw(self, which: int, x: torch.Tensor) -> dict:
        """The forward (0) / adjoint (1) solve's options; a defaulted tolerance becomes LOW_PRECISION_TOL
        when this forward's GEMMs run in bf16/fp16 (autocast on x's device, or bf16/fp16 parameters)."""
        kw = (self.f_kw, self.b_kw)[which]
        if self._tol_defaulted[which] and (x.dtype in (torch.float16, torch.bfloat16)
                                           or torch.is_autocast_enabled(x.device.type)):
            kw = dict(kw, tol=max(kw["tol"], LOW_PRECISION_TOL))
        return kw

    def _attach_grad(self, z_star, x, xf, B, bstats, graphed=False, ext=None):
        """z_star with the training gradient attached, and the Jacobian loss (None when jac_reg = 0).
        ext: whether the cell runs as the C++ op here (cell_path(backend, z_star) == 'ext'; None: look it up)."""
        jac = None
        zs = z_star.detach().view(B, self.n + 1, self.dim)
        if ext is None:
            ext = cell_path(self.backend, zs) == "ext"
        if self.grad == "phantom":
            if self.jac_reg > 0:
                jac = self._jacobian_loss(zs, x, xf, ext)
            return phantom_grad(self._flat_cell(x, xf), z_star, self.phantom_steps, self.phantom_lam), jac
        if ext:
            # C++ forward + backward for the parameter gradients; its saved tensors serve the adjoint and
            # the Jacobian loss (C++ VJP and its exact backward, no double backward through a graph)
            fz, ext_saved = ext_cell_with_grad(zs, x, xf, list(self.cell.params()), self.cell.groups)
            saved = dict(ext=ext_saved)
            if self.jac_reg > 0:
                jac = self._jacobian_loss(zs, x, xf, ext, ext_saved)
        else:  # reference autograd (double-differentiable: the Jacobian regulariser needs create_graph)
            zs = zs.requires_grad_(self.jac_reg > 0)
            fz, saved = self.cell(zs, x, xf, "reference", save=True)
            if self.jac_reg > 0:
                jac = jacobian_reg(fz, zs, self.jac_reg)
        fz = fz.reshape(B, -1)
        if graphed:
            return ImplicitAdjoint.apply(fz, self._graphs.adjoint(z_star, x, xf, bstats,
                                                                  warn=self.on_nonconvergence == "warn")), jac
        z_star, x, xf = z_star.detach(), x.detach(), xf.detach()
        if "ext" in saved:
            vjp = SavedVJP(self, z_star, x, xf, saved)
        elif resolve(self.backend, z_star.device, "cell") == "reference":  # reuse the grad forward's tensors
            saved = {k: (tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach())
                     for k, v in saved.items()}
            vjp = SavedVJP(self, z_star, x, xf, saved)
        else:  # one extra no-grad kernel forward saves what the fused VJP kernels read
            vjp = self.saved_vjp(z_star, x, xf)
        return implicit_grad(fz, vjp, self.solver, stats_box=bstats, warn=self.on_nonconvergence == "warn",
                             init=self.adjoint_init, **self._solve_kw(1, x)), jac

    def _jacobian_loss(self, zs, x, xf, ext: bool, ext_saved=None):
        """The Hutchinson Jacobian loss (jac_reg probes) at the fixed point zs ([B, N+1, D], detached):
        through the C++ ops when the cell runs there (ext_saved: a C++ forward's saved tensors at zs, else
        one no-grad C++ forward saves them), else by autograd's double backward through the reference cell."""
        if ext:
            p = list(self.cell.params())
            if ext_saved is None:
                with torch.no_grad():
                    ext_saved = torch.ops.deqfuse.cell_forward.default(zs, x.detach(), xf.detach(), p,
                                                                       self.cell.groups, True)[1]
            return ext_jacobian_reg(zs, x, xf, p, self.cell.groups, ext_saved, self.jac_reg)
        z = zs.detach().requires_grad_(True)
        fz, _ = self.cell(z, x, xf, "reference", save=True)
        return jacobian_reg(fz, z, self.jac_reg)

    # ---------------------------------------------------------------- the official code's semantics
    @classmethod
    def official(cls, dim: int, num_modalities: int, **kw) -> "DEQFusion":
        """The settings of the official DEQ-fusion code (jinhong-ni/DEQFusion, BRCA script): its Anderson
        solver with whole-batch stopping and an absolute Tikhonov term (solvers.anderson_official, m=6),
        forward 'abs' 1e-3 over the batch in 55 steps, adjoint 'rel' 1e-3 in 56 steps from zeros. kw
        overrides any of them (e.g. jac_reg). For faithful reproduction beside deqfuse's defaults."""
        cfg = dict(solver="anderson_official", f_max_iter=55, b_max_iter=56, f_tol=1e-3, b_tol=1e-3, stop_mode="abs",
                   b_stop_mode="rel", solver_kw=dict(m=6, lam=1e-4))
        cfg.update(kw)
        return cls(dim, num_modalities, **cfg)

    def load_official_state_dict(self, state_dict: dict, prefix: Optional[str] = None):
        """Load the weights of an official `DEQ_fusion.DEQFusion` module (keys func_.branches.<i>.conv1 /
        conv2 / gn1 / gn2 / gn3 of the N modality blocks, func_.branches.<N>.gate / fuse / gn3 of the fusion
        block, weights.<i>, bias), e.g. from a checkpoint of the official BRCA model (prefix 'deq_fusion.'
        -- found automatically when None)."""
        if prefix is None:
            hits = [k[: -len("func_.branches.0.conv1.weight")] for k in state_dict if k.endswith("func_.branches.0.conv1.weight")]
            if len(hits) != 1:
                raise ValueError(f"state_dict: expected one official DEQFusion (a '...func_.branches.0.conv1.weight' "
                                 f"key), found {len(hits)}")
            prefix = hits[0]
        N = self.n
        get = lambda k: state_dict[prefix + k]  # noqa: E731
        c = self.cell
        names = dict(w1="conv1.weight", b1="conv1.bias", w2="conv2.weight", b2="conv2.bias", gn1_w="gn1.weight",
                     gn1_b="gn1.bias", gn2_w="gn2.weight", gn2_b="gn2.bias", gn3_w="gn3.weight", gn3_b="gn3.bias")
        with torch.no_grad():
            for ours, theirs in names.items():
                stacked = torch.stack([get(f"func_.branches.{i}.{theirs}") for i in range(N)])
                if stacked.shape != getattr(c, ours).shape:
                    raise ValueError(f"state_dict: func_.branches.*.{theirs} has shape {list(stacked.shape[1:])}, "
                                     f"this layer needs {list(getattr(c, ours).shape[1:])} (dim={self.dim})")
                getattr(c, ours).copy_(stacked)
            for ours, theirs in dict(wg="gate.weight", bg="gate.bias", wf="fuse.weight", bf="fuse.bias",
                                     gnf_w="gn3.weight", gnf_b="gn3.bias").items():
                getattr(c, ours).copy_(get(f"func_.branches.{N}.{theirs}"))
            if prefix + "weights.0" in state_dict:
                self.weights.copy_(torch.cat([get(f"weights.{i}").reshape(1) for i in range(N)]))
                self.bias.copy_(get("bias").reshape(1))
            else:  # the BRCA model sums the features: x_f = sum_i x_i
                self.weights.fill_(1.0)
                self.bias.zero_()
        return self

    def saved_vjp(self, z_star, x, xf):
        """g [B, L] -> J^T g at z* [B, L], from one no-grad forward of this layer's backend that saves
        what its VJP reads (so each adjoint iteration replays no autograd graph)."""
        return SavedVJP(self, z_star, x, xf)


class SavedVJP:
    """g [b, L] -> J^T g at z* for a block of b rows (z* [b, L], x [b, N, D], xf [b, D], all detached),
    from the tensors one forward of the layer's backend saved (computed here unless given). Row-wise:
    subset(idx) re-saves on those rows only (one cell forward of len(idx) rows), so the adjoint solve
    can shrink its batch like the forward solve. The parameters are gathered once (read in place)."""

    def __init__(self, layer: DEQFusion, z_star, x, xf, saved=None):
        self.layer, self.z, self.x, self.xf = layer, z_star, x, xf
        cell = layer.cell
        if saved is None:
            with torch.no_grad():
                _, saved = cell(self._shaped(z_star), x, xf, layer.backend, save=True)
        self.saved, self.params = saved, cell.params()
        if "ext" in saved:  # the C++ op: call it directly, and let it add the adjoint's right-hand side
            op, plist, G = torch.ops.deqfuse.cell_vjp.default, list(self.params), cell.groups
            self._ext = profiling.wrap(lambda g, c: op(self._shaped(g), saved["ext"], plist, G,
                                                       None if c is None else self._shaped(c)).view(g.shape[0], -1),
                                       "cell_vjp[ext]")
            self.call_plus = self._ext
            self.anderson_solve_plus = functools.partial(ext_vjp_anderson_solve, saved["ext"], plist, G)
        elif profiling.enabled():
            self._apply = profiling.wrap(self._apply, "cell_vjp")

    def _shaped(self, t):
        return t.view(t.shape[0], self.layer.n + 1, self.layer.dim)

    def __call__(self, g):
        if "ext" in self.saved:
            return self._ext(g, None)
        return self._apply(g)

    def _apply(self, g):
        cell = self.layer.cell
        return cell_vjp_apply(self._shaped(g), self.saved, self.params, cell.groups, self.layer.backend,
                              cell.triton_cell).reshape(g.shape[0], -1)

    def subset(self, idx):
        return SavedVJP(self.layer, self.z.index_select(0, idx), self.x.index_select(0, idx),
                        self.xf.index_select(0, idx))
