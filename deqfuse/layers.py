"""DEQFusion: the deep-equilibrium multimodal fusion layer (Ni et al.), and its unrolled ablation."""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from . import profiling
from .cell import FusionCell, SavedVJP, cell_jacobian_loss, cell_path, cell_rows, cell_with_grad, saved_vjp
from .graphs import GraphedSolves
from .implicit import (NONCONVERGENCE, ImplicitAdjoint, check_converged, implicit_grad, phantom_grad)
from .reference.cell import fuse_inputs
from ._validate import (check_bool, check_choice, check_feature_values, check_float, check_int, check_rows,
                        host_sync_allowed)
from .backend import BACKENDS
from .solvers import SOLVERS, SolverStats, check_options, solve, solver_options

# solver options the layer sets itself (from its own arguments), so solver_kw must not
_LAYER_SET = {"max_iter": "f_max_iter / b_max_iter", "tol": "f_tol / b_tol", "stop_mode": "stop_mode",
              "backend": "backend"}


@dataclass(repr=False)
class DEQInfo:
    """What one DEQFusion forward did. forward_stats: the forward solve's SolverStats (None for
    grad='unrolled' and when every row was masked); jac_loss: the Jacobian loss (0 unless jac_reg > 0 in
    training); backward_stats: the adjoint solve's SolverStats once backward() has run (grad='implicit'),
    else None. summary(): numbers only, for a metrics logger."""
    forward_stats: Optional[SolverStats]
    jac_loss: torch.Tensor
    _backward: list = field(default_factory=list)  # filled by the backward pass: [SolverStats]

    @property
    def backward_stats(self) -> Optional[SolverStats]:
        return self._backward[0] if self._backward else None

    def summary(self) -> dict:
        """{'forward/steps', 'forward/converged_frac', ..., 'backward/...' (after backward), 'jac_loss'}: one
        host sync; every value an int or float."""
        out = {}
        for name, st in (("forward", self.forward_stats), ("backward", self.backward_stats)):
            if st is not None:
                out.update({f"{name}/{k}": v for k, v in st.summary().items()})
        out["jac_loss"] = float(self.jac_loss)
        return out

    def __repr__(self):
        return (f"DEQInfo(forward_stats={self.forward_stats!r}, backward_stats={self.backward_stats!r}, "
                f"jac_loss={float(torch.as_tensor(self.jac_loss).detach()):.4g})")


DEFAULT_TOL = 1e-4        # f_tol / b_tol left as None, float32/float64 solves
LOW_PRECISION_TOL = 1e-3  # ... under torch.autocast or with fp16 parameters
BF16_STATE_TOL = 1e-2     # ... with bf16 parameters: the solver state itself is bf16 (8 significant bits: a
                          # relative residual of 1e-3 is below its rounding; 5e-3 converges, 1e-2 with margin)
INPUT_GAIN = 2.0          # input_norm: the LayerNorms' gain at init ...
INPUT_BIAS = 1.5          # ... and their biases +-1.5, alternating: a zero or constant feature still injects a signal
OUT_GAIN = 0.4            # init='contractive': the cell's last GroupNorm gains (GN3_i, GN_f) at init
INITS = ("contractive", "official")


class DEQFusion(nn.Module):
    """Fuse N modality features into one at the joint fixed point z* = f(z*, x) (Ni et al.).

    What it takes: features[i] of shape [B, *, D_i] (vectors [B, D_i], tokens [B, T, D_i], channel-last
    maps [B, H, W, D_i]; every modality the same leading dims [B, *], size-1 dims broadcast), in the
    parameters' dtype (or an autocast dtype). D_i = `dim`, or in_dims[i] when in_dims is given. Each row
    of the leading dims is fused on its own: it has its own solve, stops when it converges, and masked
    rows (mask [B, *] bool, True = a real row: the opposite of nn.Transformer's src_key_padding_mask) are
    never evaluated and come back as zeros.
    What it returns: [B, *, dim] (with return_info=True: (that, DEQInfo)). With autograd on (training, or
    eval mode with inputs or parameters that need gradients) the output is f(z*), one more application of
    the cell, which carries the gradient (it equals z* to the solve's tolerance).
    What it does to the features before the solve: with in_dims, a Linear(D_i, dim) per modality; with
    input_norm (default), a LayerNorm(dim) per modality (gain initialised to INPUT_GAIN = 2), so the
    encoders' output scale does not decide whether the solve converges, and biases of +-INPUT_BIAS = 1.5
    (alternating), so that a zero or constant feature (a missing modality) still injects a signal;
    init='contractive' (default) starts the cell's last GroupNorm gains at OUT_GAIN = 0.4, so the first
    solves converge (in ~10 steps at tol 1e-4 for random inputs, ~14 for zero ones). input_norm=False, init='official' is the paper's cell exactly
    (DEQFusion.official also takes the official solver settings).

    Args:
      dim, num_modalities: width D of the fused state and N.
      in_dims: widths D_i of the raw features (each gets a Linear to dim); None: every feature has width dim.
      groups: GroupNorm groups of the cell (dim % groups == 0).
      input_norm, init: see above.
      solver: 'anderson' | 'broyden' | 'fixed_point' | 'anderson_official' for the forward and adjoint solves.
      f_max_iter/b_max_iter, f_tol/b_tol: limits of the forward / adjoint solve. Tolerances default
        (None) to DEFAULT_TOL = 1e-4 for float32/64 solves, LOW_PRECISION_TOL = 1e-3 for a forward
        under torch.autocast or a module cast to fp16 (chosen from the training-gradient error against
        cost on BRCA, benchmarks/grad_accuracy.py; a bf16/fp16 solve cannot reach 1e-4), and
        BF16_STATE_TOL = 1e-2 for a module cast to bf16 (its solver state is bf16).
      stop_mode, b_stop_mode: residual of the forward / adjoint stopping rule ('rel' or 'abs'). The
        adjoint's is relative by default: its right-hand side is the incoming gradient, whose scale is
        the loss's, so an absolute rule would make the gradient depend on how the loss is scaled.
      grad: 'implicit' (adjoint fixed point) | 'phantom' (k damped steps) | 'unrolled' (no solve:
        `unrolled_steps` weight-tied applications with full backprop; the paper's ablation).
      jac_reg: Hutchinson samples for the Jacobian-norm loss in training (0 = off; info.jac_loss, add it to
        your loss with a weight), taken at the fixed point (grad='implicit' or 'phantom').
      backend: 'auto' | 'triton' | 'cuda' | 'reference' for the kernels used inside the solves.
      solver_kw: further options of the solver, for both solves (e.g. m, lam, beta for Anderson;
        check_every / compact for adaptive compute, see deqfuse/solvers.py).
      on_nonconvergence: a solve that leaves rows above its tolerance: 'warn' (a deqfuse.ConvergenceWarning
        with a stable text, once per calling line by Python's default filter; one host sync per solve),
        'raise' (a deqfuse.ConvergenceError) or 'ignore' (read info.forward_stats / backward_stats).
      triton_cell: Triton cell variant of the 'triton' backend: 'cublas' | 'fused' (None: the default).
      cuda_graph: on CUDA, run each solve as CUDA-graph replays captured per row count (graphs.py).
    forward(features, mask=None, return_info=False).

    Optimiser: no_weight_decay() names the gains and biases (the cell's are stacked [N, D], so the usual
    "ndim < 2" rule would decay them); deqfuse.param_groups(model, weight_decay) builds AdamW groups.

    Mixed precision (torch.autocast): only the cell's GEMMs (and the projections) run in the autocast
    dtype, and only where the cell goes through ATen (backend='reference', the Triton cell); the C++ CPU
    cell computes in the parameters' dtype. Everything a solve accumulates stays in the parameters' dtype
    (keep them float32): the fused input, the iterate, the Anderson histories, Gram matrices, norms and
    residuals; the adjoint solve runs in backward(), outside autocast. Low-precision GEMMs put a floor
    under the residual (about 2e-4 relative at B=32, D=64), so the default tolerance there is 1e-3.
    Measured against float64 (tests/test_training_stack.py): outputs within 1.2x and gradients within
    0.8x of PyTorch's own error in the same precision.
    """

    def __init__(self, dim: int, num_modalities: int, in_dims: Optional[Sequence[int]] = None, *, groups: int = 4,
                 input_norm: bool = True, init: str = "contractive", solver: str = "anderson",
                 f_max_iter: int = 55, b_max_iter: int = 56, f_tol: Optional[float] = None,
                 b_tol: Optional[float] = None, stop_mode: str = "rel", grad: str = "implicit",
                 phantom_steps: int = 5, phantom_lam: float = 0.8, unrolled_steps: int = 6, jac_reg: int = 0,
                 backend: str = "auto", solver_kw: Optional[dict] = None, on_nonconvergence: str = "warn",
                 cuda_graph: bool = False, b_stop_mode: str = "rel", triton_cell: Optional[str] = None):
        super().__init__()
        # every argument is checked here, with the argument's own name in the message
        check_int("num_modalities", num_modalities, 1)
        if in_dims is not None:
            if isinstance(in_dims, (bool, int)) or not isinstance(in_dims, Sequence):
                raise ValueError(f"in_dims must be a list of {num_modalities} feature widths (or None), got "
                                 f"{in_dims!r} (groups and the other options are keyword arguments)")
            if len(in_dims) != num_modalities:
                raise ValueError(f"in_dims must give one width per modality ({num_modalities}), got {len(in_dims)}")
            in_dims = [check_int(f"in_dims[{i}]", d, 1) for i, d in enumerate(in_dims)]
        check_bool("input_norm", input_norm)
        check_choice("init", init, INITS)
        check_choice("grad", grad, ("implicit", "phantom", "unrolled"))
        check_choice("on_nonconvergence", on_nonconvergence, NONCONVERGENCE)
        check_choice("solver", solver, sorted(SOLVERS))
        check_choice("backend", backend, BACKENDS)
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
        if cuda_graph and solver == "anderson_official":
            raise ValueError("cuda_graph=True needs a graph-capturable solver; 'anderson_official' syncs every step")
        self.cell = FusionCell(dim, num_modalities, groups, triton_cell,
                               out_gain=OUT_GAIN if init == "contractive" else 1.0)
        self.dim, self.n, self.in_dims = dim, num_modalities, in_dims
        self.input_norm, self.init = input_norm, init
        self.proj = None if in_dims is None else nn.ModuleList(nn.Linear(d, dim) for d in in_dims)
        self.norms = None
        if input_norm:
            self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_modalities))
            for ln in self.norms:
                nn.init.constant_(ln.weight, INPUT_GAIN)
                with torch.no_grad():
                    ln.bias.copy_(INPUT_BIAS * (1 - 2 * (torch.arange(dim) % 2)))
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
        self.cuda_graph = cuda_graph
        self.adjoint_init = "zeros" if solver == "anderson_official" else "grad"
        self._graphs = GraphedSolves(self)
        self.info: Optional[DEQInfo] = None  # the last forward's (each call also returns its own)

    def _option(which: int, key: str):
        """A solve option as a settable attribute (f_max_iter, b_tol, ...): read from and written to the solve's
        kw, checked as the constructor checks it (tol None: the default for the input's precision)."""
        name = "fb"[which] + "_" + key

        def get(self):
            if key == "tol" and self._tol_defaulted[which]:
                return None
            return (self.f_kw, self.b_kw)[which][key]

        def set(self, value):
            v = DEFAULT_TOL if key == "tol" and value is None else value
            check_options(self.solver, {key: name}, **{key: v})
            (self.f_kw, self.b_kw)[which][key] = v
            if key == "tol":
                d = list(self._tol_defaulted)
                d[which] = value is None
                self._tol_defaulted = tuple(d)
        return property(get, set, doc=f"the {'forward' if which == 0 else 'adjoint'} solve's {key} (settable)")

    f_max_iter, b_max_iter = _option(0, "max_iter"), _option(1, "max_iter")
    f_tol, b_tol = _option(0, "tol"), _option(1, "tol")
    del _option

    def extra_repr(self) -> str:
        tol = lambda i, v: "default" if self._tol_defaulted[i] else f"{v:g}"  # noqa: E731
        return (f"dim={self.dim}, num_modalities={self.n}, in_dims={self.in_dims}, groups={self.cell.groups}, "
                f"input_norm={self.input_norm}, init={self.init!r}, solver={self.solver!r}, grad={self.grad!r}, "
                f"f_tol={tol(0, self.f_kw['tol'])}, b_tol={tol(1, self.b_kw['tol'])}, "
                f"f_max_iter={self.f_kw['max_iter']}, b_max_iter={self.b_kw['max_iter']}, jac_reg={self.jac_reg}, "
                f"backend={self.backend!r}, on_nonconvergence={self.on_nonconvergence!r}")

    def no_weight_decay(self) -> set:
        """Names (relative to this module) of the parameters weight decay should skip: every gain and bias
        (the cell's GroupNorm gains/biases and Linear biases, the input mixing weights, the projections'
        biases, the LayerNorms). The timm convention; deqfuse.param_groups uses it."""
        keep = {"cell.w1", "cell.w2", "cell.wg", "cell.wf"} | {f"proj.{i}.weight" for i in range(self.n)}
        return {name for name, _ in self.named_parameters() if name not in keep}

    def __getstate__(self):
        """Copies and pickles leave out the transient state: info (graph-attached tensors of the last
        forward) and the CUDA-graph cache (re-captured on first use)."""
        state = self.__dict__.copy()
        state["info"], state["_graphs"] = None, None
        return state

    def __setstate__(self, state):
        state.setdefault("_tol_defaulted", (False, False))  # pickled by an older version: tolerances as given
        for k, v in dict(in_dims=None, input_norm=False, init="official").items():
            state.setdefault(k, v)
        for k in ("proj", "norms"):
            state["_modules"].setdefault(k, None)
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
        return cell_rows(rows, x, xf, p, self.cell.groups, path)

    def forward(self, features, mask: Optional[torch.Tensor] = None, return_info: bool = False):
        """features: N tensors [B, *, D_i]; mask: None or bool [B, *] (True = a real row). -> [B, *, dim]
        (and the call's DEQInfo with return_info=True)."""
        _check_runnable(self)
        widths = self.in_dims or [self.dim] * self.n
        lead = check_rows(features, self.n, widths, self.weights, mask, "in_dims" if self.in_dims else "dim")
        rows, idx = _flatten_rows(features, lead, mask)
        if rows[0].shape[0] and host_sync_allowed(rows[0]):  # finite and within range (the kept rows): one sync
            check_feature_values(rows if len(rows) > 1 else rows[0][:, None], self.weights.dtype)
        x = self._embed(rows)                                            # [r, N, D]
        out, info = self._fuse_rows(x)                                   # [r, D]
        object.__setattr__(self, "info", info)  # (nn.Module's __setattr__ costs ~3 us a forward)
        if idx is not None:
            out = out.new_zeros(mask.numel(), self.dim).index_copy(0, idx, out)
        if len(lead) != 1:
            out = out.view(*lead, self.dim)
        return (out, info) if return_info else out

    def _embed(self, rows):
        """The solve's input x [r, N, D] in the parameters' dtype from the N row blocks [r, D_i]: projected
        (in_dims) and normalised (input_norm)."""
        if self.proj is not None:
            rows = [p(f) for p, f in zip(self.proj, rows)]
        if self.norms is not None:
            rows = [ln(f) for ln, f in zip(self.norms, rows)]
        x = torch.stack(rows, 1)
        return x if x.dtype == self.weights.dtype else x.to(self.weights.dtype)  # autocast outputs cast up

    def _fuse_rows(self, x):
        """The fixed point's fused state [r, D] for the inputs x [r, N, D], and this call's DEQInfo."""
        B = x.shape[0]
        info = DEQInfo(None, x.new_zeros(()))
        if B == 0:  # every row masked: nothing to solve (x's graph kept: backward() works as usual)
            return x[:, 0] * 0, info
        xf = fuse_inputs(x, self.weights, self.bias)         # [B, D]
        f = self._flat_cell(x, xf)
        z0 = x.new_zeros(B, (self.n + 1) * self.dim)
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
            info.forward_stats = fstats
            # a host sync: skipped while a CUDA graph is captured and under torch.compile (read
            # info.forward_stats there)
            if host_sync_allowed(z0):
                check_converged(fstats, self.on_nonconvergence, "DEQFusion forward solve", "f_tol", "f_max_iter",
                                self.f_kw["max_iter"], self)
            z = z_star
            # the gradient is attached whenever autograd will ask for it (eval mode too: saliency maps,
            # adversarial inputs); the Jacobian loss is a training loss only
            if torch.is_grad_enabled() and (self.training or x.requires_grad or xf.requires_grad):
                with profiling.range("attach_grad"):
                    z, jac = self._attach_grad(z_star, x, xf, B, info._backward, graphed)
                if jac is not None:
                    info.jac_loss = jac
        return z.narrow(1, self.n * self.dim, self.dim).contiguous(), info  # not a view: FSDP2 hooks, in-place safe

    def _solve_kw(self, which: int, x: torch.Tensor) -> dict:
        """The forward (0) / adjoint (1) solve's options; a defaulted tolerance becomes BF16_STATE_TOL when
        the solver state is bf16 (bf16 parameters), LOW_PRECISION_TOL when this forward's GEMMs run in
        bf16/fp16 otherwise (autocast on x's device, or fp16 parameters)."""
        kw = (self.f_kw, self.b_kw)[which]
        if not self._tol_defaulted[which]:
            return kw
        if x.dtype == torch.bfloat16:
            return dict(kw, tol=max(kw["tol"], BF16_STATE_TOL))
        if x.dtype == torch.float16 or torch.is_autocast_enabled(x.device.type):
            return dict(kw, tol=max(kw["tol"], LOW_PRECISION_TOL))
        return kw

    def _attach_grad(self, z_star, x, xf, B, bstats, graphed=False):
        """z_star with the training gradient attached, and the Jacobian loss (None when jac_reg = 0)."""
        zs = z_star.detach().view(B, self.n + 1, self.dim)
        path = cell_path(self.backend, zs)
        jac_reg = self.jac_reg if self.training else 0
        if self.grad == "phantom":
            jac = cell_jacobian_loss(self.cell, zs, x, xf, path, jac_reg) if jac_reg else None
            return phantom_grad(self._flat_cell(x, xf), z_star, self.phantom_steps, self.phantom_lam), jac
        # the cell at z* with autograd (the parameter gradients); what it saved serves the adjoint's VJP
        fz, saved, jac = cell_with_grad(self.cell, zs, x, xf, path, jac_reg)
        fz = fz.reshape(B, -1)
        if graphed:
            return ImplicitAdjoint.apply(fz, self._graphs.adjoint(z_star, x, xf, bstats, self.on_nonconvergence)), jac
        z_star, x, xf = z_star.detach(), x.detach(), xf.detach()
        vjp = saved_vjp(self.cell, self.backend, z_star, x, xf, saved)
        return implicit_grad(fz, vjp, self.solver, stats_box=bstats, on_nonconvergence=self.on_nonconvergence,
                             init=self.adjoint_init, **self._solve_kw(1, x)), jac

    # ---------------------------------------------------------------- the official code's semantics
    @classmethod
    def official(cls, dim: int, num_modalities: int, **kw) -> "DEQFusion":
        """The settings of the official DEQ-fusion code (jinhong-ni/DEQFusion, BRCA script): its Anderson
        solver with whole-batch stopping and an absolute Tikhonov term (solvers.anderson_official, m=6),
        forward 'abs' 1e-3 over the batch in 55 steps, adjoint 'rel' 1e-3 in 56 steps from zeros, and its cell
        exactly (no input normalisation, the official init). kw overrides any of them (e.g. jac_reg)."""
        cfg = dict(solver="anderson_official", f_max_iter=55, b_max_iter=56, f_tol=1e-3, b_tol=1e-3, stop_mode="abs",
                   b_stop_mode="rel", solver_kw=dict(m=6, lam=1e-4), input_norm=False, init="official")
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

    def saved_vjp(self, z_star, x, xf) -> SavedVJP:
        """g [B, L] -> J^T g at z* [B, L], from one no-grad forward of this layer's backend that saves
        what its VJP reads (so each adjoint iteration replays no autograd graph)."""
        return saved_vjp(self.cell, self.backend, z_star, x, xf)


def _flatten_rows(features, lead, mask):
    """The N features [*lead, D_i] as row blocks [r, D_i] (size-1 leading dims broadcast), only the rows
    mask [*lead] keeps; and the kept rows' flat indices (None without a mask)."""
    R = 1
    for d in lead:
        R *= d
    rows = [f if f.dim() == 2 and f.shape[0] == R else f.expand(*lead, f.shape[-1]).reshape(R, f.shape[-1])
            for f in features]
    if mask is None:
        return rows, None
    idx = mask.reshape(R).nonzero().squeeze(1)
    return [f.index_select(0, idx) for f in rows], idx


def _check_runnable(layer: DEQFusion):
    """Clear errors, before any work, for what the solves cannot do: parameters on the meta device, and
    torch.func transforms (vmap / grad / jacrev / jvp), whose wrapped tensors the solver loops and compiled
    ops cannot take."""
    if layer.weights.is_meta:
        raise RuntimeError("DEQFusion's parameters are on the meta device: materialise them first "
                           "(module.to_empty(device=...) and load or re-initialise the weights)")
    if _functorch_active():
        raise RuntimeError("DEQFusion does not run under torch.func transforms (vmap, grad, jacrev, jvp): its "
                           "solves stop per sample on data-dependent tests. Use torch.autograd.grad (first-order; "
                           "grad='unrolled' is differentiable twice), or call the layer per sample in a loop")


def _functorch_active() -> bool:
    if torch.compiler.is_compiling():  # (dynamo traces the solves' ops itself)
        return False
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None
